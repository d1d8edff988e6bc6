"""The training loop: prepared speaker configs -> fine-tuned talker -> exported custom-voice checkpoint.

Reads top to bottom like accelerate's examples: settings -> model and speaker embeddings -> dataloaders ->
``accelerator.prepare`` -> loop (accumulate, clip, step, log, evaluate) -> export. Run it through
``uv run accelerate launch finetuning/finetune.py`` (or ``python finetuning/finetune.py`` on one device).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from finetuning.settings import Settings
from finetuning.training.checkpointing import Progress, StopRequest, resolve_resume, save_training_state, saved_states
from finetuning.training.data import Example, collate, load_examples, load_split, make_train_loader
from finetuning.training.export import export_checkpoint, resolve_model_dir, speaker_rows
from finetuning.training.losses import build_auxiliary_losses
from finetuning.training.sampler import DurationBatchSampler
from finetuning.training.speakers import freeze_speaker_encoder, speaker_embedding
from finetuning.training.step import TalkerStep, sequence_length

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
FRAMES_PER_SECOND = 12.5
NO_DECAY_MARKERS = ("bias", "norm", "embedding")  # parameters AdamW does not shrink


class TrainingError(RuntimeError):
    """Training cannot start or continue; the message says what to fix."""


@dataclass
class TrainResult:
    """What a run did: optimizer steps taken, steps skipped for non-finite loss, last losses, export path
    (None when the run stopped early on a signal: its state is saved for RESUME_FROM=latest)."""

    optimizer_steps: int = 0
    skipped_steps: int = 0
    interrupted: bool = False
    train_loss: float = float("nan")
    eval_loss: float | None = None
    export_dir: Path | None = None
    history: list[dict] = field(default_factory=list)


def load_base_model(model_dir: Path, device: torch.device):
    """The Base model to fine-tune, in float32 (master weights; autocast supplies mixed precision)."""
    import qwen_tts

    wrapper = qwen_tts.Qwen3TTSModel.from_pretrained(str(model_dir), dtype=torch.float32)
    model = wrapper.model
    if model.speaker_encoder is None:
        raise TrainingError(
            f"INIT_MODEL_PATH={model_dir} is a {model.tts_model_type!r} model without a speaker encoder; "
            "fine-tune a Base model (e.g. Qwen/Qwen3-TTS-12Hz-1.7B-Base)"
        )
    return model.to(device), wrapper.processor.tokenizer


def compute_speaker_embeddings(model, settings: Settings) -> torch.Tensor:
    """(S, D) mean x-vectors in TRAIN_SPEAKERS order over each speaker's reference clips plus the first
    SPEAKER_EMBEDDING_CLIPS training clips (read only when asked, streamed when DATA_STREAMING)."""
    from itertools import islice

    from finetuning.training.data import load_reference_audio

    embeds = []
    for speaker in settings.TRAIN_SPEAKERS:
        clips = load_reference_audio(settings, speaker)
        if settings.SPEAKER_EMBEDDING_CLIPS:
            train = load_split(settings, speaker, "train", ["audio"], streaming=settings.DATA_STREAMING)
            for row in islice(train or [], settings.SPEAKER_EMBEDDING_CLIPS):
                clips.append(row["audio"]["array"])
        embeds.append(speaker_embedding(model, clips))
    return torch.stack(embeds)


def make_optimizer(model, settings: Settings) -> torch.optim.Optimizer:
    """AdamW over every trainable parameter outside the speaker encoder; no decay on biases, norms, embeddings."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad or name.startswith("speaker_encoder."):
            continue
        (no_decay if any(m in name.lower() for m in NO_DECAY_MARKERS) else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": settings.WEIGHT_DECAY},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=settings.LEARNING_RATE)


def make_scheduler(optimizer, settings: Settings, total_steps: int):
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[settings.LR_SCHEDULE]
    return get_scheduler(
        name, optimizer, num_warmup_steps=min(settings.WARMUP_STEPS, total_steps), num_training_steps=total_steps
    )


@torch.no_grad()
def evaluate_loss(step_module, examples: list[Example], settings: Settings, accelerator) -> dict[str, float]:
    """Token-weighted validation losses over this process's share of ``examples``, summed across processes."""
    from accelerate.utils import send_to_device

    step_module.eval()
    totals = torch.zeros(4, device=accelerator.device, dtype=torch.float64)
    shard = examples[accelerator.process_index :: accelerator.num_processes]
    size = settings.BATCH_SIZE
    # Every process runs the same number of forward passes (DDP/FSDP forwards are collective); a process whose
    # share ran out repeats an example with weight 0.
    per_process = math.ceil(len(examples) / accelerator.num_processes)
    for start in range(0, per_process, size):
        part = shard[start : start + size]
        weight = 1.0 if part else 0.0
        _, out = step_module(send_to_device(collate(part or examples[:1]), accelerator.device))
        totals += weight * torch.stack(
            [
                out.codec0_loss.double() * out.codec0_tokens,
                torch.tensor(out.codec0_tokens, device=accelerator.device, dtype=torch.float64),
                out.sub_talker_loss.double() * out.sub_talker_tokens,
                torch.tensor(out.sub_talker_tokens, device=accelerator.device, dtype=torch.float64),
            ]
        )
    step_module.train()
    totals = accelerator.reduce(totals, reduction="sum")
    codec0 = (totals[0] / totals[1].clamp(min=1)).item()
    sub = (totals[2] / totals[3].clamp(min=1)).item()
    return {"eval/codec0_loss": codec0, "eval/sub_talker_loss": sub}


def make_accelerator(settings: Settings):
    """Accelerator with mixed precision, accumulation and the trackers REPORT_TO names (never silently none)."""
    import importlib.util
    import os

    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    trackers = [t for t in settings.REPORT_TO if t != "none"]
    for tracker in trackers:
        if importlib.util.find_spec(tracker) is None:
            raise TrainingError(
                f"REPORT_TO={','.join(settings.REPORT_TO)} needs the {tracker} package: `uv pip install {tracker}`, "
                "or set REPORT_TO=none to log only to metrics.jsonl"
            )
    if "wandb" in trackers:
        os.environ["WANDB_MODE"] = settings.WANDB_MODE
    return Accelerator(
        mixed_precision=settings.MIXED_PRECISION,
        gradient_accumulation_steps=settings.GRADIENT_ACCUMULATION_STEPS,
        cpu=settings.DEVICE == "cpu",
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=settings.OUTPUT_DIR, logging_dir=settings.OUTPUT_DIR),
    )


def make_sampler(examples: list[Example], settings: Settings, talker_config, accelerator) -> DurationBatchSampler:
    lengths = [
        sequence_length(talker_config, e.text_ids.numel(), e.codes.shape[0], e.language, settings.TRAINING_LAYOUT)
        for e in examples
    ]
    return DurationBatchSampler(
        lengths,
        [e.speaker for e in examples],
        batch_size=settings.BATCH_SIZE,
        max_batch_tokens=settings.MAX_BATCH_TOKENS,
        num_buckets=settings.NUM_BUCKETS,
        mixing=settings.SPEAKER_MIXING,
        seed=settings.SEED,
        num_replicas=accelerator.num_processes,
        rank=accelerator.process_index,
    )


def train(settings: Settings, label_shift: int = 1) -> TrainResult:
    """Fine-tune INIT_MODEL_PATH on TRAIN_SPEAKERS and export to ``settings.export_dir``.

    ``label_shift`` other than 1 reproduces the official recipe's misalignment; only tests use it.
    Raises DataError / TrainingError / ResumeError with a message naming the fix.
    """
    from accelerate.utils import send_to_device, set_seed

    accelerator = make_accelerator(settings)
    set_seed(settings.SEED)
    output_dir = Path(settings.OUTPUT_DIR)
    resume_path = resolve_resume(settings.RESUME_FROM, output_dir)
    if resume_path is None and saved_states(output_dir):
        raise TrainingError(
            f"{output_dir} holds saved training states of an earlier run ({saved_states(output_dir)[-1].name}); "
            "set RESUME_FROM=latest to continue it, or use another OUTPUT_DIR (or delete its states/ folder)"
        )
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        settings.save(output_dir / "training_settings.json")

    model_dir = resolve_model_dir(settings.INIT_MODEL_PATH, token=settings.HF_TOKEN or None)
    model, tokenizer = load_base_model(model_dir, accelerator.device)
    freeze_speaker_encoder(model)
    speaker_rows(list(settings.TRAIN_SPEAKERS), model.config.talker_config.vocab_size)  # fail before training
    speaker_embeds = compute_speaker_embeddings(model, settings)
    train_examples, train_skipped = load_examples(settings, tokenizer, "train")
    val_examples, _ = load_examples(settings, tokenizer, "validation")
    languages = {}  # each speaker's training language, recorded in the export for generation's default
    for example in train_examples:
        languages.setdefault(settings.TRAIN_SPEAKERS[example.speaker], example.language)
    if any(train_skipped.values()):
        logger.warning("skipped training rows per speaker: %s", train_skipped)

    sampler = make_sampler(train_examples, settings, model.config.talker_config, accelerator)
    train_loader = make_train_loader(
        train_examples, sampler, settings.DATALOADER_WORKERS, pin_memory=accelerator.device.type == "cuda"
    )
    step_module = TalkerStep(
        model,
        speaker_embeds,
        layout=settings.TRAINING_LAYOUT,
        sub_talker_loss_weight=settings.SUB_TALKER_LOSS_WEIGHT,
        label_shift=label_shift,
        aux_losses=build_auxiliary_losses(settings, model, model_dir, accelerator.device),
    )
    optimizer = make_optimizer(model, settings)
    # Accumulation runs across epoch ends, so NUM_EPOCHS passes take ceil(epochs x batches / accumulation) steps.
    total_steps = settings.MAX_STEPS or math.ceil(
        settings.NUM_EPOCHS * len(sampler) / settings.GRADIENT_ACCUMULATION_STEPS
    )
    scheduler = make_scheduler(optimizer, settings, total_steps)
    step_module, optimizer = accelerator.prepare(step_module, optimizer)
    progress = Progress(seed=settings.SEED)
    accelerator.register_for_checkpointing(scheduler, progress)
    if resume_path is not None:
        accelerator.load_state(str(resume_path))
        logger.info("resumed from %s at step %d", resume_path, progress.optimizer_steps)
        if accelerator.is_main_process:
            _truncate_metrics(output_dir / METRICS_FILE, progress.optimizer_steps)
    aux_losses = accelerator.unwrap_model(step_module).aux_losses
    if aux_losses is not None:  # states are saved at optimizer steps: micro-batches so far = steps x accumulation
        aux_losses.training_calls = progress.optimizer_steps * settings.GRADIENT_ACCUMULATION_STEPS
    max_norm = settings.MAX_GRAD_NORM if settings.MAX_GRAD_NORM > 0 else float("inf")
    if accelerator.is_main_process:
        accelerator.init_trackers("finetune", config=_tracker_config(settings))

    result = TrainResult(optimizer_steps=progress.optimizer_steps, skipped_steps=progress.skipped_steps)
    metrics_path = output_dir / METRICS_FILE
    sample_log = output_dir / f"samples_rank{accelerator.process_index}.jsonl" if settings.RECORD_SAMPLE_IDS else None
    bar = tqdm(
        total=total_steps, initial=progress.optimizer_steps, desc="training", disable=not accelerator.is_main_process
    )
    window = _Window(accelerator.device, progress.optimizer_steps)
    speech_eval = _SpeechEvaluation(settings)
    step_module.train()
    with StopRequest() as stop:
        while progress.optimizer_steps < total_steps and not result.interrupted:
            sampler.set_epoch(progress.epoch)
            sampler.start_at(progress.batches_done)
            for batch in train_loader:
                batch = send_to_device(batch, accelerator.device, non_blocking=True)
                with accelerator.accumulate(step_module):
                    loss, out = step_module(batch)
                    accelerator.backward(loss)
                    window.add(loss, out, batch)
                    if accelerator.sync_gradients:
                        # Frozen parameters have no gradient and are ignored; FSDP needs the module's own list.
                        grad_norm = accelerator.clip_grad_norm_(step_module.parameters(), max_norm)
                        finite = grad_norm is None or bool(torch.isfinite(torch.as_tensor(grad_norm)))
                        if finite or accelerator.scaler is not None:  # fp16's scaler skips and rescales itself
                            optimizer.step()
                        if finite and not accelerator.optimizer_step_was_skipped:
                            scheduler.step()
                        else:
                            progress.skipped_steps += 1
                            logger.warning(
                                "non-finite loss or gradient at step %d: update skipped", progress.optimizer_steps
                            )
                    optimizer.zero_grad(set_to_none=True)
                progress.batches_done += 1
                if sample_log is not None:
                    with sample_log.open("a") as f:
                        f.write(json.dumps({"epoch": progress.epoch, "ids": batch["id"]}) + "\n")
                if not accelerator.sync_gradients:
                    continue
                progress.optimizer_steps += 1
                step = progress.optimizer_steps
                bar.update(1)
                if step % settings.LOGGING_STEPS == 0 or step == total_steps:
                    record = {"step": step, "epoch": progress.epoch, **window.flush(accelerator, step)}
                    record.update({"train/lr": scheduler.get_last_lr()[0], "train/grad_norm": _float(grad_norm)})
                    record["train/skipped_steps"] = progress.skipped_steps
                    bar.set_postfix(loss=f"{record['train/loss']:.3f}")
                    result.train_loss = record["train/loss"]
                    _log(accelerator, metrics_path, record, result)
                if val_examples and settings.EVAL_STEPS and step % settings.EVAL_STEPS == 0 and step != total_steps:
                    paused = time.perf_counter()
                    record = {"step": step, **evaluate_loss(step_module, val_examples, settings, accelerator)}
                    _log(accelerator, metrics_path, record, result)
                    window.started += time.perf_counter() - paused  # evaluation is not training time
                if settings.EVAL_GENERATE_STEPS and step % settings.EVAL_GENERATE_STEPS == 0 and step != total_steps:
                    paused = time.perf_counter()
                    speech_eval.run(accelerator, step_module, model_dir, speaker_embeds, languages, step)
                    window.started += time.perf_counter() - paused
                stop_now = _any_process(accelerator, stop.requested)
                if (settings.SAVE_STEPS and step % settings.SAVE_STEPS == 0) or stop_now:
                    save_training_state(accelerator, output_dir, step, settings.SAVE_TOTAL_LIMIT)
                if stop_now:
                    result.interrupted = True
                if step >= total_steps or stop_now:
                    break
            else:
                progress.epoch += 1
                progress.batches_done = 0
    bar.close()
    result.optimizer_steps, result.skipped_steps = progress.optimizer_steps, progress.skipped_steps
    if result.interrupted:
        logger.warning("stopped on a signal at step %d; resume with RESUME_FROM=latest", result.optimizer_steps)
        accelerator.end_training()
        return result
    if sample_log is not None:  # lets an audit confirm every process ends with the same weights
        checksum = sum(p.detach().double().sum().item() for p in step_module.parameters() if p.requires_grad)
        with sample_log.open("a") as f:
            f.write(json.dumps({"final_parameter_sum": checksum}) + "\n")
    if val_examples:
        eval_metrics = evaluate_loss(step_module, val_examples, settings, accelerator)
        result.eval_loss = eval_metrics["eval/codec0_loss"]
        _log(accelerator, metrics_path, {"step": result.optimizer_steps, **eval_metrics}, result)

    accelerator.wait_for_everyone()
    state = _model_state(accelerator, step_module)  # every process takes part (FSDP gathers shards)
    if accelerator.is_main_process:
        trained = accelerator.unwrap_model(step_module).model
        trained.eval()
        result.export_dir = export_checkpoint(
            trained,
            model_dir,
            list(settings.TRAIN_SPEAKERS),
            speaker_embeds,
            languages,
            settings.export_dir,
            settings=settings,
            extra_info={"optimizer_steps": result.optimizer_steps, "training_layout": settings.TRAINING_LAYOUT},
            state_dict=state,
        )
        logger.info("exported %s", result.export_dir)
    if settings.EVAL_GENERATE_STEPS:
        speech_eval.run(
            accelerator,
            step_module,
            model_dir,
            speaker_embeds,
            languages,
            result.optimizer_steps,
            checkpoint=result.export_dir,
        )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


class _Window:
    """Loss components, samples, audio seconds and padding since the last log, kept on the device."""

    def __init__(self, device, step: int = 0):
        self.device = device
        self.reset(step)

    def reset(self, step: int = 0) -> None:
        self.first_step = step
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}  # auxiliary losses run every AUX_LOSS_EVERY_N_STEPS micro-batches only
        self.micro_batches = 0
        # samples, frames, real and padded positions: kept on the device (no host sync per micro-batch)
        self.counts_on_device = torch.zeros(4, device=self.device, dtype=torch.float64)
        self.started = time.perf_counter()

    def add(self, loss, out, batch) -> None:
        parts = {"loss": loss, "codec0_loss": out.codec0_loss, "sub_talker_loss": out.sub_talker_loss, **out.aux}
        for name, value in parts.items():
            self.sums[name] = self.sums.get(name, 0) + value.detach().float()
            self.counts[name] = self.counts.get(name, 0) + 1
        self.micro_batches += 1
        mask = out.attention_mask
        self.counts_on_device[0] += len(batch["id"])
        self.counts_on_device[1] += batch["num_frames"].sum()
        self.counts_on_device[2] += mask.sum()
        self.counts_on_device[3] += mask.numel()

    def flush(self, accelerator, step: int) -> dict[str, float]:
        names = sorted(self.sums)
        values = torch.stack([self.sums[n] / self.counts[n] for n in names])
        values = accelerator.reduce(values, reduction="mean").tolist()
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        samples, frames, real, padded = accelerator.reduce(self.counts_on_device, reduction="sum").tolist()
        record = {f"train/{n}": v for n, v in zip(names, values, strict=True)}
        record.update(
            {
                "train/samples_per_s": samples / elapsed,
                "train/audio_s_per_s": frames / FRAMES_PER_SECOND / elapsed,
                "train/padding_fraction": 1 - real / max(padded, 1),
                "train/optimizer_steps_per_s": (step - self.first_step) / elapsed,
            }
        )
        self.reset(step)
        return record


class _SpeechEvaluation:
    """Generated-speech evaluation during training (EVAL_GENERATE_STEPS), on the main process only: the model is
    exported to ``OUTPUT_DIR/eval_checkpoint`` (replaced each time), spoken and scored by
    ``finetuning.evaluation.runner``; means and one clip per speaker go to TensorBoard (scalars to other trackers).
    Scorers and real-audio targets load once, at the first evaluation."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.scorers = None
        self.targets = None

    def run(self, accelerator, step_module, model_dir, speaker_embeds, languages, step, checkpoint=None) -> None:
        """Called on every process; only the main one exports, speaks and scores. A failure is logged, and the
        training run goes on."""
        state = _model_state(accelerator, step_module) if checkpoint is None else None
        if accelerator.is_main_process:
            try:
                if checkpoint is None:
                    checkpoint = export_checkpoint(
                        accelerator.unwrap_model(step_module).model,
                        model_dir,
                        list(self.settings.TRAIN_SPEAKERS),
                        speaker_embeds,
                        languages,
                        Path(self.settings.OUTPUT_DIR) / "eval_checkpoint",
                        settings=self.settings,
                        extra_info={"optimizer_steps": step, "training_layout": self.settings.TRAINING_LAYOUT},
                        link_base_files=True,
                        state_dict=state,
                    )
                self._score(accelerator, checkpoint, step)
            except Exception as error:  # noqa: BLE001  (reported, never the end of a training run)
                logger.error("speech evaluation at step %d failed: %s", step, error, exc_info=True)
        accelerator.wait_for_everyone()

    def _score(self, accelerator, checkpoint: Path, step: int) -> None:
        from finetuning.evaluation.report import log_report
        from finetuning.evaluation.runner import evaluate_checkpoint, load_scorers, load_targets

        if self.scorers is None:
            self.scorers = load_scorers(self.settings)
            self.targets = load_targets(self.settings, list(self.settings.TRAIN_SPEAKERS), self.scorers)
        report = evaluate_checkpoint(checkpoint, self.settings, scorers=self.scorers, targets=self.targets, step=step)
        tracker = _tensorboard(accelerator)
        scalars = log_report(tracker if tracker is not None else accelerator, report, step)
        logger.info("speech evaluation at step %d: %s", step, {k: round(v, 4) for k, v in scalars.items()})


def _model_state(accelerator, step_module) -> dict:
    """The talker model's full state dict (keys as in the model), gathered from every process."""
    prefix = "model."
    full = accelerator.get_state_dict(step_module)
    return {k[len(prefix) :]: v for k, v in full.items() if k.startswith(prefix)}


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drop records logged after the resumed state (the interrupted run got further than its last save)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= last_step]
    path.write_text("".join(line + "\n" for line in kept))


def _float(value) -> float:
    return float("nan") if value is None else float(value)


def _tensorboard(accelerator):
    try:
        return accelerator.get_tracker("tensorboard")
    except (ValueError, KeyError):
        return None


def _any_process(accelerator, flag: bool) -> bool:
    """True on every process when any process has ``flag`` set (all must stop at the same step)."""
    if accelerator.num_processes == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(value, reduction="sum").item() > 0)


def _tracker_config(settings: Settings) -> dict:
    """Settings for trackers: secrets left out, lists joined (TensorBoard's hparams take scalars only)."""
    return {k: ",".join(v) if isinstance(v, list) else v for k, v in settings.public_dict().items()}


def _log(accelerator, path: Path, record: dict, result: TrainResult) -> None:
    result.history.append(record)
    if not accelerator.is_main_process:
        return
    step = record["step"]
    accelerator.log({k: v for k, v in record.items() if k not in ("step", "epoch")}, step=step)
    logger.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
