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

from finetuning.resources import one_line, resolve_model_dir
from finetuning.settings import Settings
from finetuning.training import engines
from finetuning.training.averaging import average_for_export, protected_steps
from finetuning.training.best import BestExport
from finetuning.training.callbacks import ExportCallback, ExportHook
from finetuning.training.checkpointing import (
    StopRequest,
    load_training_state,
    output_dir_lock,
    resolve_resume,
    run_identity,
    save_training_state,
    saved_states,
)
from finetuning.training.clone import CloneExamples, EpochIndices, build_reference_pool
from finetuning.training.conditioning import Conditioning, TrainingExamples
from finetuning.training.data import (
    Example,
    load_examples,
    load_training_examples,
    make_train_loader,
    speaker_languages,
)
from finetuning.training.export import RunExports, checkpoint_dtype, speaker_rows
from finetuning.training.guards import check_export_dir
from finetuning.training.lora import apply_lora, log_trainable_summary
from finetuning.training.losses import build_auxiliary_losses
from finetuning.training.optim import check_optimizer, make_optimizer, make_scheduler, optimizer_step
from finetuning.training.sampler import DurationBatchSampler
from finetuning.training.selection import Selection
from finetuning.training.speakers import compute_speaker_embeddings, freeze_speaker_encoder
from finetuning.training.speed import (
    ModelFlops,
    check_speed_options,
    compile_transformers,
    fused_cross_entropy,
    keep_freed_memory,
    peak_flops,
)
from finetuning.training.step import TalkerStep, sequence_length
from finetuning.training.streaming import StreamingBatches, stream_languages
from finetuning.training.tracking import MetricsLog, MetricWindow, SampleAudit, tracker_config
from finetuning.training.validation import validation_losses

logger = logging.getLogger(__name__)


MODEL_FILES = ("config.json",)  # what a Base model folder must hold before from_pretrained is tried


class TrainingError(RuntimeError):
    """Training cannot start or continue; the message says what to fix."""


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


def load_base_model(model_dir: Path, device: torch.device, settings: Settings):
    """The Base model to fine-tune, in float32 (master weights; autocast supplies mixed precision), with its
    speaker encoder frozen, ATTN_IMPLEMENTATION's attention and (TORCH_COMPILE) compiled transformers, and its text
    tokenizer. Fails before training (ExportError) when TRAIN_SPEAKERS do not fit the codec vocabulary,
    TrainingError when the folder does not load as a Qwen3-TTS model."""
    import qwen_tts

    try:
        wrapper = qwen_tts.Qwen3TTSModel.from_pretrained(
            str(model_dir), dtype=torch.float32, attn_implementation=settings.ATTN_IMPLEMENTATION
        )
    except Exception as error:  # missing or corrupt weights, foreign configs: transformers raises many types
        raise TrainingError(
            f"INIT_MODEL_PATH={model_dir} does not load as a Qwen3-TTS model ({type(error).__name__}: "
            f"{one_line(error)}); give a 12 Hz Base model folder or Hub id"
        ) from error
    model = wrapper.model
    if model.speaker_encoder is None:
        raise TrainingError(
            f"INIT_MODEL_PATH={model_dir} is a {model.tts_model_type!r} model without a speaker encoder; "
            "fine-tune a Base model (e.g. Qwen/Qwen3-TTS-12Hz-1.7B-Base)"
        )
    freeze_speaker_encoder(model)
    if settings.TRAINING_MODE == "custom_voice":  # a voice-clone export stays a Base model: no speaker rows
        speaker_rows(list(settings.TRAIN_SPEAKERS), model.config.talker_config.vocab_size)
    if settings.TORCH_COMPILE:
        compile_transformers(model)
    return model.to(device), wrapper.processor.tokenizer


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


def make_sampler(
    examples: list[Example], settings: Settings, talker_config, accelerator, dataset: TrainingExamples
) -> DurationBatchSampler:
    """The batch sampler over ``examples``, budgeting each epoch's samples as ``dataset`` draws them."""
    longest = [
        sequence_length(talker_config, e.text_ids.numel(), e.codes.shape[0], e.language, settings.TRAINING_LAYOUT)
        + _longest_reference(dataset, i)
        for i, e in enumerate(examples)
    ]
    return DurationBatchSampler(
        longest,
        [e.speaker for e in examples],
        batch_size=settings.BATCH_SIZE,
        max_batch_tokens=settings.MAX_BATCH_TOKENS,
        num_buckets=settings.NUM_BUCKETS,
        mixing=settings.SPEAKER_MIXING,
        mixing_alpha=settings.SPEAKER_MIXING_ALPHA,
        max_repeat=settings.SPEAKER_MAX_REPEAT,
        seed=settings.SEED,
        num_replicas=accelerator.num_processes,
        rank=accelerator.process_index,
        epoch_lengths=dataset.epoch_lengths if settings.MAX_BATCH_TOKENS else None,
    )


def _longest_reference(dataset: TrainingExamples, index: int) -> int:
    """Positions the longest ICL reference example ``index`` can draw adds (0 without voice cloning): what its
    bucket is chosen by."""
    if not isinstance(dataset, CloneExamples) or dataset.icl_fraction == 0:
        return 0
    return dataset.pool.longest_reference(dataset.examples[index].speaker)


def make_train_data(settings: Settings, tokenizer, model, accelerator, xvector_dtype: torch.dtype):
    """(train batches, their sampler, each speaker's language, validation sets, conditioning): the conditioning is
    the (S, D) speaker embeddings, or with TRAINING_MODE=voice_clone every training clip's x-vector (C, D)
    (``training.clone``), computed once here by the frozen speaker encoder in ``xvector_dtype``. The validation
    sets are ``Conditioning.validation``'s (row languages, and "auto").

    Map-style: every example in memory (codes int16), batches chosen by ``DurationBatchSampler`` and collated by
    a DataLoader. ``DATA_STREAMING``: a ``StreamingBatches`` stream is both (memory bounded by its buffers)."""
    talker_config = model.config.talker_config
    conditioning = Conditioning.from_settings(settings)
    if settings.DATA_STREAMING:
        stream = StreamingBatches(
            settings, tokenizer, talker_config, accelerator.num_processes, accelerator.process_index
        )
        validation = conditioning.validation(load_examples(settings, tokenizer, "validation")[0])
        embeds = compute_speaker_embeddings(model, settings, xvector_dtype)
        return stream, stream, stream_languages(settings), validation, embeds
    train_examples, validation = load_training_examples(settings, tokenizer)
    languages = speaker_languages(train_examples, settings.TRAIN_SPEAKERS)
    pin_memory = accelerator.device.type == "cuda"
    if settings.TRAINING_MODE == "voice_clone":
        pool = build_reference_pool(model, settings, train_examples, xvector_dtype)
        dataset = CloneExamples(pool, settings.SEED, settings.CLONE_ICL_FRACTION, conditioning, talker_config)
        validation = dataset.validation(validation)
        conditioning_table = pool.xvectors
    else:
        dataset = TrainingExamples(train_examples, conditioning, talker_config)
        conditioning_table = compute_speaker_embeddings(model, settings, xvector_dtype)
    sampler = make_sampler(train_examples, settings, talker_config, accelerator, dataset)
    loader = make_train_loader(dataset, EpochIndices(sampler), settings.DATALOADER_WORKERS, pin_memory)
    return loader, sampler, languages, conditioning.validation(validation), conditioning_table


def build_step_module(model, settings: Settings, conditioning_table: torch.Tensor, aux_losses) -> TalkerStep:
    """The training step around ``model``: custom voice holds the (S, D) speaker rows; voice cloning holds no table
    (each batch brings its references' x-vectors, gathered from the one host copy by ``collate``)."""
    clone = settings.TRAINING_MODE == "voice_clone"
    return TalkerStep(
        model,
        conditioning_table[:0] if clone else conditioning_table,
        layout=settings.TRAINING_LAYOUT,
        sub_talker_loss_weight=settings.SUB_TALKER_LOSS_WEIGHT,
        aux_losses=aux_losses,
        fused_cross_entropy=fused_cross_entropy(settings),
    )


def prepare_output_dir(settings: Settings, accelerator, held: ExitStack) -> Path | None:
    """The state to resume from (RESUME_FROM), or None for a new run, which must not mix with an earlier run's
    states; the run folder is created, locked for this run until ``held`` closes (FolderBusy while another run
    holds it), and the settings are saved in it."""
    output_dir = Path(settings.OUTPUT_DIR)
    try:  # on every process, so that all of them stop on an OUTPUT_DIR that cannot be created
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise TrainingError(f"OUTPUT_DIR={output_dir} cannot be created ({error.strerror}); choose another") from error
    held.enter_context(output_dir_lock(accelerator, output_dir))
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
    check_export_dir(settings, model_dir)  # before anything is written
    resume_path = prepare_output_dir(settings, accelerator, held)
    with engines.whole_model_loading(accelerator):
        model, tokenizer = load_base_model(model_dir, accelerator.device, settings)
    train_loader, sampler, languages, val_sets, speaker_embeds = make_train_data(
        settings, tokenizer, model, accelerator, checkpoint_dtype(model_dir)
    )
    val_examples = val_sets[""]
    lora = apply_lora(model, settings)  # None for FINETUNE_METHOD=full
    exports = RunExports(model_dir, speaker_embeds, languages, settings, lora, model.speaker_encoder)
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
