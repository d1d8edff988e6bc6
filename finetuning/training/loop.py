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
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from finetuning.resources import resolve_model_dir
from finetuning.settings import Settings
from finetuning.training import engines
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
from finetuning.training.clone import CloneExamples, EpochIndices, build_reference_pool
from finetuning.training.conditioning import Conditioning, TrainingExamples
from finetuning.training.data import (
    Example,
    instruction_use,
    load_examples,
    load_training_examples,
    make_train_loader,
    pin_dataset_revision,
    speaker_languages,
)
from finetuning.training.export import RunExports, checkpoint_dtype
from finetuning.training.guards import check_export_dir
from finetuning.training.init_model import (
    MODEL_FILES,
    TrainingError,
    check_instructions,
    load_base_model,
    speaker_table,
)
from finetuning.training.lora import apply_lora, log_trainable_summary
from finetuning.training.losses import build_auxiliary_losses
from finetuning.training.modes import training_mode
from finetuning.training.optim import check_optimizer, make_optimizer, make_scheduler, optimizer_step
from finetuning.training.presets import PresetSpeakers, check_init_model
from finetuning.training.replay import ReplayMixed, replay_source
from finetuning.training.sampler import DurationBatchSampler
from finetuning.training.speed import (
    ModelFlops,
    check_speed_options,
    fused_cross_entropy,
    keep_freed_memory,
    peak_flops,
)
from finetuning.training.step import TalkerStep, sequence_length
from finetuning.training.streaming import StreamingBatches, stream_languages
from finetuning.training.tracking import MetricsLog, MetricWindow, SampleAudit, tracker_config
from finetuning.training.validation import validation_losses

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a run did: optimizer steps taken, steps skipped for non-finite loss, last losses, export path
    (None when the run stopped early on a signal: its state is saved for RESUME_FROM=latest).

    The two step counts are saved with every training state (``state_dict``), so a resumed run counts on.
    """

    optimizer_steps: int = 0
    skipped_steps: int = 0
    interrupted: bool = False
    train_loss: float = float("nan")
    eval_loss: float | None = None
    export_dir: Path | None = None
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


def make_sampler(
    examples: list[Example], settings: Settings, talker_config, accelerator, dataset: TrainingExamples
) -> DurationBatchSampler:
    """The batch sampler over ``examples``, budgeting each epoch's samples as ``dataset`` draws them."""
    longest = [
        sequence_length(
            talker_config,
            e.text_ids.numel(),
            e.codes.shape[0],
            e.language,
            settings.TRAINING_LAYOUT,
            instruct=e.instruct_size(),
        )
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


def make_train_data(
    settings: Settings,
    tokenizer,
    model,
    accelerator,
    xvector_dtype: torch.dtype,
    presets: PresetSpeakers | None = None,
    make_replay: Callable[[list[Example]], list[Example]] | None = None,
):
    """(train batches, their sampler, each speaker's language, validation sets, conditioning): the conditioning is
    the (S, D) speaker embeddings, or with TRAINING_MODE=voice_clone every training clip's x-vector (C, D)
    (``training.clone``), computed once here by the frozen speaker encoder in ``xvector_dtype``. The validation
    sets are ``Conditioning.validation``'s (row languages, and "auto"). A CustomVoice init's ``presets`` follow the
    new speakers' rows in the table, and ``make_replay(train examples)`` (REPLAY_FRACTION) gives the replay examples
    mixed into the training samples (``training.replay``).

    Map-style: every example in memory (codes int16), batches chosen by ``DurationBatchSampler`` and collated by
    a DataLoader. ``DATA_STREAMING``: a ``StreamingBatches`` stream is both (memory bounded by its buffers)."""
    talker_config = model.config.talker_config
    conditioning = Conditioning.from_settings(settings)
    mode = training_mode(settings)
    if settings.DATA_STREAMING:
        stream = StreamingBatches(
            settings, tokenizer, talker_config, accelerator.num_processes, accelerator.process_index
        )
        validation = conditioning.validation(load_examples(settings, tokenizer, "validation")[0])
        embeds = speaker_table(model, settings, xvector_dtype)
        return stream, stream, stream_languages(settings), validation, embeds
    train_examples, validation = load_training_examples(settings, tokenizer)
    languages = speaker_languages(train_examples, settings.TRAIN_SPEAKERS)
    pin_memory = accelerator.device.type == "cuda"
    if mode.references:
        pool = build_reference_pool(model, settings, train_examples, xvector_dtype)
        dataset = CloneExamples(pool, settings.SEED, settings.CLONE_ICL_FRACTION, conditioning, talker_config)
        validation = dataset.validation(validation)
        conditioning_table = pool.xvectors
    else:
        conditioning_table = speaker_table(model, settings, xvector_dtype)
        if presets is not None and presets.rows:  # replayed presets: speakers S .. S + P - 1 of the table
            conditioning_table = torch.cat([conditioning_table, presets.embeds.to(conditioning_table.dtype)])
        if make_replay is None:
            dataset = TrainingExamples(train_examples, conditioning, talker_config)
        else:
            replay = make_replay(train_examples)
            fraction = settings.REPLAY_FRACTION
            dataset = ReplayMixed(train_examples, conditioning, talker_config, replay, fraction, settings.SEED)
    sampler = make_sampler(train_examples, settings, talker_config, accelerator, dataset)
    loader = make_train_loader(dataset, EpochIndices(sampler), settings.DATALOADER_WORKERS, pin_memory)
    return loader, sampler, languages, conditioning.validation(validation), conditioning_table


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
    instructions = instruction_use(settings)
    check_instructions(settings, model_dir, instructions)
    resume_path = prepare_output_dir(settings, accelerator, held)
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
    identity = run_identity(settings, accelerator.num_processes, sampler.examples_per_speaker())
    accelerator.register_for_checkpointing(scheduler, sampler, result)  # sampler: the data position
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
    audit = SampleAudit(settings, accelerator.process_index)
    bar = tqdm(
        total=total_steps, initial=result.optimizer_steps, desc="training", disable=not accelerator.is_main_process
    )
    window = MetricWindow(accelerator.device, result.optimizer_steps, ModelFlops(model), peak_flops(accelerator.device))
    step_module.train()
    parameters = list(step_module.parameters())  # what clipping reads, listed once
    with StopRequest() as stop:
        while result.optimizer_steps < total_steps and not result.interrupted:
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
                if val_examples and settings.EVAL_STEPS and step % settings.EVAL_STEPS == 0 and step != total_steps:
                    with window.paused():
                        cap = settings.EVAL_MAX_BATCHES
                        losses = validation_losses(step_module, val_sets, settings, accelerator, cap)
                        log.write({"step": step, **losses})
                if hook.due(step, total_steps):
                    with window.paused():
                        hook.export_and_call(accelerator, step_module, step)
                stop_now = stop.on_any_process(accelerator)
                if (settings.SAVE_STEPS and step % settings.SAVE_STEPS == 0) or stop_now:
                    save_training_state(accelerator, settings.OUTPUT_DIR, step, settings.SAVE_TOTAL_LIMIT, identity)
                    saved_step = step
                result.interrupted = stop_now
                if step >= total_steps or stop_now:
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
        final_state = save_training_state(
            accelerator, settings.OUTPUT_DIR, result.optimizer_steps, settings.SAVE_TOTAL_LIMIT + 1, identity
        )
    audit.final(step_module.parameters())  # lets an audit confirm every process ends with the same weights
    if val_examples:
        eval_metrics = validation_losses(step_module, val_sets, settings, accelerator)
        result.eval_loss = eval_metrics["eval/codec0_loss"]
        log.write({"step": result.optimizer_steps, **eval_metrics})

    accelerator.wait_for_everyone()
    result.export_dir = exports.export(accelerator, step_module, settings.export_dir, result.optimizer_steps)
    if result.export_dir is not None:
        logger.info("exported %s", result.export_dir)
        if final_state is not None:
            shutil.rmtree(final_state, ignore_errors=True)
    if hook.active:
        hook.call(accelerator, result.export_dir, result.optimizer_steps)
    accelerator.wait_for_everyone()
    return result


def _float(value) -> float:
    return float("nan") if value is None else float(value)
