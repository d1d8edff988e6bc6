"""The training loop: prepared speaker configs -> fine-tuned talker -> exported custom-voice or voice-clone checkpoint.

Reads top to bottom like accelerate's examples: settings -> model and speaker embeddings -> dataloader ->
``accelerator.prepare`` -> loop (accumulate, clip, step, log, validate, save) -> export. Run it through
``uv run accelerate launch finetuning/finetune.py`` (or ``python finetuning/finetune.py`` on one device).
What the loop reports lives in ``tracking``, the optimizer and its step in ``optim``, resumable states in
``checkpointing``, and in-training evaluation is a callback the command passes in (``callbacks``).
"""

from __future__ import annotations

import logging
import math
import shutil
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from finetuning.resources import resolve_model_dir
from finetuning.settings import Settings
from finetuning.training import engines
from finetuning.training.averaging import average_for_export, protected_steps
from finetuning.training.best import BestExport
from finetuning.training.callbacks import ExportCallback, ExportHook
from finetuning.training.checkpointing import (
    StopRequest,
    load_training_state,
    resolve_resume,
    run_identity,
    run_lock,
    save_training_state,
    saved_states,
)
from finetuning.training.data import (
    instruction_use,
    pin_dataset_revision,
)
from finetuning.training.export import RunExports, checkpoint_dtype
from finetuning.training.guards import check_export_dir
from finetuning.training.init_model import (
    MODEL_FILES,
    TrainingError,
    check_instructions,
    load_base_model,
)
from finetuning.training.lora import apply_lora, log_trainable_summary
from finetuning.training.losses import build_auxiliary_losses
from finetuning.training.modes import training_mode
from finetuning.training.optim import check_optimizer, make_optimizer, make_scheduler, optimizer_step
from finetuning.training.presets import PresetSpeakers, check_init_model
from finetuning.training.replay import replay_source
from finetuning.training.run_data import make_train_data
from finetuning.training.selection import Selection
from finetuning.training.speed import (
    ModelFlops,
    check_speed_options,
    fused_cross_entropy,
    keep_freed_memory,
    peak_flops,
)
from finetuning.training.step import TalkerStep
from finetuning.training.tracking import MetricsLog, MetricWindow, SampleAudit, tracker_config
from finetuning.training.validation import validation_losses

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a run did: optimizer steps taken, steps skipped for non-finite loss, last losses, export path
    (None when the run stopped early on a signal: its state is saved for RESUME_FROM=latest), whether early
    stopping ended it, and the best evaluation's export (``best/``; None when nothing was selected).

    The two step counts are saved with every training state (``state_dict``), so a resumed run counts on.
    """

    optimizer_steps: int = 0
    skipped_steps: int = 0
    interrupted: bool = False
    train_loss: float = float("nan")
    eval_loss: float | None = None
    export_dir: Path | None = None
    best_dir: Path | None = None
    early_stopped: bool = False
    history: list[dict] = field(default_factory=list)

    def state_dict(self) -> dict:
        return {"optimizer_steps": self.optimizer_steps, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer_steps, self.skipped_steps = int(state["optimizer_steps"]), int(state["skipped_steps"])


def make_accelerator(settings: Settings):
    """Accelerator with mixed precision, accumulation and the trackers REPORT_TO names (never silently none)."""
    import importlib.util
    import os

    trackers = [t for t in settings.REPORT_TO if t != "none"]
    for tracker in trackers:
        if importlib.util.find_spec(tracker) is None:
            raise TrainingError(
                f"REPORT_TO={','.join(settings.REPORT_TO)} needs the {tracker} package: `uv pip install {tracker}`, "
                "or set REPORT_TO=none to log only to metrics.jsonl"
            )
    if "wandb" in trackers:
        os.environ["WANDB_MODE"] = settings.WANDB_MODE
    return engines.make_accelerator(settings, trackers)


def build_step_module(model, settings: Settings, conditioning_table: torch.Tensor, aux_losses) -> TalkerStep:
    """The training step around ``model``: custom voice holds the (S, D) speaker rows; voice cloning holds no table
    (each batch brings its references' x-vectors, gathered from the one host copy by ``collate``); voice design
    has no speaker slot."""
    mode = training_mode(settings)
    return TalkerStep(
        model,
        conditioning_table if mode.speaker_rows else conditioning_table[:0],
        speaker_slot=mode.speaker_slot,
        layout=settings.TRAINING_LAYOUT,
        sub_talker_loss_weight=settings.SUB_TALKER_LOSS_WEIGHT,
        aux_losses=aux_losses,
        fused_cross_entropy=fused_cross_entropy(settings),
    )


def prepare_output_dir(settings: Settings, accelerator, held: ExitStack) -> Path | None:
    """The state to resume from (RESUME_FROM), or None for a new run, which must not mix with an earlier run's
    states; the run folder is created, locked for this run until ``held`` closes (FolderBusy while another run
    holds it), DATASET_DIR is held as a reader's share (FolderBusy while a preparation writes it), and the
    settings are saved in it."""
    output_dir = Path(settings.OUTPUT_DIR)
    try:  # on every process, so that all of them stop on an OUTPUT_DIR that cannot be created
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise TrainingError(f"OUTPUT_DIR={output_dir} cannot be created ({error.strerror}); choose another") from error
    held.enter_context(run_lock(accelerator, output_dir, "OUTPUT_DIR"))
    if not settings.HF_DATASET_REPO and Path(settings.DATASET_DIR).is_dir():  # read here: no preparation meanwhile
        held.enter_context(run_lock(accelerator, settings.DATASET_DIR, "DATASET_DIR", shared=True))
    resume_path = resolve_resume(settings.RESUME_FROM, output_dir)
    if resume_path is None and saved_states(output_dir):
        raise TrainingError(
            f"{output_dir} holds saved training states of an earlier run ({saved_states(output_dir)[-1].name}); "
            "set RESUME_FROM=latest to continue it, or use another OUTPUT_DIR (or delete its states/ folder)"
        )
    if accelerator.is_main_process:
        settings.save(output_dir / "training_settings.json")
    return resume_path


def train(settings: Settings, on_export: ExportCallback | None = None) -> TrainResult:
    """Fine-tune INIT_MODEL_PATH on TRAIN_SPEAKERS and export to ``settings.export_dir``.

    ``on_export(checkpoint_dir, step, accelerator)`` (the command passes generated-speech evaluation) is called on
    the main process with an export every EVAL_GENERATE_STEPS steps and with the final export; see ``callbacks``.
    Raises DataError / TrainingError / ResumeError / LoraError / ModelUnavailable / SpeedOptionError /
    OptimizerError with a message naming the fix.
    """
    accelerator = make_accelerator(settings)
    with ExitStack() as held:  # OUTPUT_DIR's lock, from the first write to the last
        result = _train(settings, on_export, accelerator, held)
    engines.finish(accelerator)  # the run's engine and process groups go now, not at interpreter exit
    return result


def _train(settings: Settings, on_export: ExportCallback | None, accelerator, held: ExitStack) -> TrainResult:
    from accelerate.utils import send_to_device, set_seed

    check_speed_options(settings, accelerator.device)
    check_optimizer(settings, accelerator.distributed_type.value)
    if settings.CPU_HEAP_CACHE and accelerator.device.type == "cpu" and keep_freed_memory():
        logger.info("CPU_HEAP_CACHE: freed tensor memory stays in the heap")
    set_seed(settings.SEED)
    token = settings.HF_TOKEN or None
    model_dir = resolve_model_dir(settings.INIT_MODEL_PATH, token=token, key="INIT_MODEL_PATH", required=MODEL_FILES)
    check_init_model(settings, model_dir)
    check_export_dir(settings, model_dir)  # before anything is written
    settings = pin_dataset_revision(settings, accelerator)  # every process reads one Hub commit, saved with the run
    resume_path = prepare_output_dir(settings, accelerator, held)  # OUTPUT_DIR usable and locked, DATASET_DIR shared
    instructions = instruction_use(settings)
    check_instructions(settings, model_dir, instructions)
    with engines.whole_model_loading(accelerator):
        model, tokenizer, stock = load_base_model(model_dir, accelerator.device, settings)
    presets = PresetSpeakers.from_model(model)
    make_replay = replay_source(settings, model_dir, stock, presets, tokenizer, accelerator.is_main_process)
    train_loader, sampler, languages, val_sets, speaker_embeds = make_train_data(
        settings, tokenizer, model, accelerator, checkpoint_dtype(model_dir), presets, make_replay
    )
    val_examples = val_sets[""]
    lora = apply_lora(model, settings)  # None for FINETUNE_METHOD=full
    exports = RunExports(
        model_dir, speaker_embeds, languages, settings, lora, model.speaker_encoder, presets, instructions
    )
    if not settings.DATA_STREAMING:  # a stream's batches are formed as it is read
        engines.check_zero3_batches(accelerator, [len(batch) for batch in sampler.plan(sampler.epoch)])
    aux_losses = build_auxiliary_losses(settings, model, model_dir, accelerator.device)
    engines.share_main_process_weights(accelerator, speaker_embeds, aux_losses)
    step_module = build_step_module(model, settings, speaker_embeds, aux_losses)
    engines.detach_speaker_encoder(model)  # frozen: outside the engine (the voice loss keeps its own reference)
    if settings.GRADIENT_CHECKPOINTING:
        engines.enable_gradient_checkpointing(model)
    optimizer = make_optimizer(model, settings)
    if accelerator.is_main_process:
        log_trainable_summary(model, settings.FINETUNE_METHOD)
    # Accumulation runs across epoch ends, so NUM_EPOCHS passes take ceil(epochs x batches / accumulation) steps.
    total_steps = settings.MAX_STEPS or math.ceil(
        settings.NUM_EPOCHS * len(sampler) / settings.GRADIENT_ACCUMULATION_STEPS
    )
    scheduler = make_scheduler(optimizer, settings, total_steps)
    step_module, optimizer = engines.prepare_engine(accelerator, step_module, optimizer)
    result = TrainResult()
    selection = Selection.from_settings(settings)  # saved with every state: a resumed run keeps its history
    identity = run_identity(settings, accelerator.num_processes, sampler.examples_per_speaker())
    accelerator.register_for_checkpointing(scheduler, sampler, result, selection)  # sampler: the data position
    log = MetricsLog(accelerator, settings.OUTPUT_DIR)
    if resume_path is not None:
        load_training_state(accelerator, resume_path, identity, settings.OUTPUT_DIR)
        logger.info("resumed from %s at step %d", resume_path, result.optimizer_steps)
        log.truncate(result.optimizer_steps)
    saved_step = result.optimizer_steps if resume_path is not None else None  # the step a state on disk holds
    aux_losses = accelerator.unwrap_model(step_module).aux_losses
    if aux_losses is not None:  # states are saved at optimizer steps: micro-batches so far = steps x accumulation
        aux_losses.training_calls = result.optimizer_steps * settings.GRADIENT_ACCUMULATION_STEPS
    if accelerator.is_main_process:
        accelerator.init_trackers("finetune", config=tracker_config(settings))

    hook = ExportHook(on_export, exports)
    best = BestExport(selection, exports, settings)
    cap = settings.EVAL_MAX_BATCHES
    audit = SampleAudit(settings, accelerator.process_index)
    bar = tqdm(
        total=total_steps, initial=result.optimizer_steps, desc="training", disable=not accelerator.is_main_process
    )
    window = MetricWindow(accelerator.device, result.optimizer_steps, ModelFlops(model), peak_flops(accelerator.device))
    step_module.train()
    parameters = list(step_module.parameters())  # what clipping reads, listed once
    with StopRequest() as stop:
        while result.optimizer_steps < total_steps and not result.interrupted and not selection.should_stop():
            for batch in train_loader:
                batch = send_to_device(batch, accelerator.device, non_blocking=True)
                with accelerator.accumulate(step_module):
                    loss, out = step_module(batch)
                    accelerator.backward(loss)
                    window.add(loss, out, batch)
                    if accelerator.sync_gradients:
                        grad_norm, stepped = optimizer_step(
                            accelerator,
                            parameters,
                            optimizer,
                            scheduler,
                            settings.MAX_GRAD_NORM,
                            result.optimizer_steps,
                        )
                        result.skipped_steps += 0 if stepped else 1
                    optimizer.zero_grad(set_to_none=True)
                sampler.batch_done()
                audit.batch(sampler.epoch, batch["id"])
                if not accelerator.sync_gradients:
                    continue
                result.optimizer_steps += 1
                step = result.optimizer_steps
                bar.update(1)
                if step % settings.LOGGING_STEPS == 0 or step == total_steps:
                    record = {"step": step, "epoch": sampler.epoch, **window.flush(accelerator, step)}
                    record.update({"train/lr": scheduler.get_last_lr()[0], "train/grad_norm": _float(grad_norm)})
                    record["train/skipped_steps"] = result.skipped_steps
                    bar.set_postfix(loss=f"{record['train/loss']:.3f}")
                    result.train_loss = record["train/loss"]
                    log.write(record)
                losses = None
                if val_examples and settings.EVAL_STEPS and step % settings.EVAL_STEPS == 0 and step != total_steps:
                    with window.paused():
                        losses = validation_losses(step_module, val_sets, settings, accelerator, cap)
                        selected = best.evaluated(accelerator, step_module, step, losses=losses)
                        log.write({"step": step, **losses, **selected})
                if hook.due(step, total_steps):
                    with window.paused():
                        speech = hook.export_and_call(accelerator, step_module, step)
                        extra = {}
                        if losses is None and val_examples and best.wants_losses:
                            losses = extra = validation_losses(step_module, val_sets, settings, accelerator, cap)
                        selected = best.evaluated(accelerator, step_module, step, losses, speech, hook.checkpoint_dir)
                        if speech:  # in metrics.jsonl for the curves; the callback sent them to the trackers
                            log.write({"step": step, **speech}, trackers=False)
                        if selected:
                            log.write({"step": step, **extra, **selected})
                stop_now = stop.on_any_process(accelerator)
                result.early_stopped = selection.should_stop()
                if (settings.SAVE_STEPS and step % settings.SAVE_STEPS == 0) or stop_now or result.early_stopped:
                    keep = settings.SAVE_TOTAL_LIMIT
                    save_training_state(
                        accelerator, settings.OUTPUT_DIR, step, keep, identity, protected_steps(settings, selection)
                    )
                    saved_step = step
                result.interrupted = stop_now
                if step >= total_steps or stop_now or result.early_stopped:
                    break
            else:
                sampler.set_epoch(sampler.epoch + 1)
    bar.close()
    result.history = log.history
    if result.interrupted:
        logger.warning("stopped on a signal at step %d; resume with RESUME_FROM=latest", result.optimizer_steps)
        return result
    final_state = None  # the last steps reach the disk before validation, export and merge can fail
    if saved_step != result.optimizer_steps:  # kept beside the SAVE_TOTAL_LIMIT states until the export is in place
        keep = settings.SAVE_TOTAL_LIMIT + 1
        final_state = save_training_state(
            accelerator,
            settings.OUTPUT_DIR,
            result.optimizer_steps,
            keep,
            identity,
            protected_steps(settings, selection),
        )
    audit.final(step_module.parameters())  # lets an audit confirm every process ends with the same weights
    result.early_stopped = selection.should_stop()  # also when a resumed state had already stopped
    if result.early_stopped:
        logger.info("early stopping at step %d: %s", result.optimizer_steps, selection.stop_reason())
    probe = None  # the final step's losses on the probe batches every evaluation scored (what selection compares)
    eval_metrics = {}  # logged with the final selection, after the export
    if val_examples:
        eval_metrics = validation_losses(step_module, val_sets, settings, accelerator)
        result.eval_loss = eval_metrics["eval/codec0_loss"]
        if best.wants_losses:
            probe = validation_losses(step_module, val_sets, settings, accelerator, cap) if cap else eval_metrics

    selected, state, info = {}, None, None
    if settings.AVERAGE_CHECKPOINTS:  # the final evaluation ranks too, so it comes before the export it may shape
        selected = best.evaluated(accelerator, step_module, result.optimizer_steps, probe)
        state, info = average_for_export(settings, selection, accelerator)
    accelerator.wait_for_everyone()
    result.export_dir = exports.export(
        accelerator, step_module, settings.export_dir, result.optimizer_steps, info=info, state_dict=state
    )
    if result.export_dir is not None:
        logger.info("exported %s", result.export_dir)
        if final_state is not None:
            shutil.rmtree(final_state, ignore_errors=True)
    step = result.optimizer_steps
    if not settings.AVERAGE_CHECKPOINTS and not selection.needs_speech:
        selected = best.evaluated(accelerator, step_module, step, probe, None, settings.export_dir)
    if eval_metrics or selected:  # before the speech callback, whose report draws the run's curves
        log.write({"step": step, **eval_metrics, **selected})
    speech = hook.call(accelerator, result.export_dir, step) if hook.active else None
    if speech:
        log.write({"step": step, **speech}, trackers=False)  # the callback logged them already
    if not settings.AVERAGE_CHECKPOINTS and selection.needs_speech:
        if selected := best.evaluated(accelerator, step_module, step, probe, speech, settings.export_dir):
            log.write({"step": step, **selected})
    if selection.best_step is not None:
        result.best_dir = best.path
    accelerator.wait_for_everyone()
    return result


def _float(value) -> float:
    return float("nan") if value is None else float(value)
