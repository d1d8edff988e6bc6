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

from finetuning.data import DataError, load_examples, load_split, make_dataloader
from finetuning.export import export_checkpoint, resolve_model_dir
from finetuning.settings import Settings
from finetuning.speakers import freeze_speaker_encoder, speaker_embedding
from finetuning.step import TalkerStep

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
NO_DECAY_MARKERS = ("bias", "norm", "embedding")  # parameters AdamW does not shrink


class TrainingError(RuntimeError):
    """Training cannot start or continue; the message says what to fix."""


@dataclass
class TrainResult:
    """What a run did: optimizer steps taken, steps skipped for non-finite loss, last losses, export path."""

    optimizer_steps: int = 0
    skipped_steps: int = 0
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


def compute_speaker_embeddings(model, settings: Settings) -> tuple[torch.Tensor, dict[str, str]]:
    """(S, D) mean x-vectors in TRAIN_SPEAKERS order over each speaker's reference clips plus the first
    SPEAKER_EMBEDDING_CLIPS training clips, and each speaker's training language."""
    from finetuning.data import load_reference_audio

    embeds, languages = [], {}
    for speaker in settings.TRAIN_SPEAKERS:
        clips = load_reference_audio(settings, speaker)
        train = load_split(settings, speaker, "train", ["audio", "language"])
        if train is None or len(train) == 0:
            raise DataError(f"speaker {speaker} has no training rows; re-run data preparation")
        languages[speaker] = train[0]["language"]
        for row in train.select(range(min(settings.SPEAKER_EMBEDDING_CLIPS, len(train)))):
            clips.append(row["audio"]["array"])
        embeds.append(speaker_embedding(model, clips))
    return torch.stack(embeds), languages


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
def evaluate_loss(step_module, dataloader, accelerator) -> dict[str, float]:
    """Token-weighted validation losses over the whole loader, gathered across processes."""
    step_module.eval()
    totals = torch.zeros(4, device=accelerator.device, dtype=torch.float64)
    for batch in dataloader:
        _, out = step_module(batch)
        totals += torch.tensor(
            [
                out.codec0_loss.item() * out.codec0_tokens,
                out.codec0_tokens,
                out.sub_talker_loss.item() * out.sub_talker_tokens,
                out.sub_talker_tokens,
            ],
            device=accelerator.device,
            dtype=torch.float64,
        )
    step_module.train()
    totals = accelerator.reduce(totals, reduction="sum")
    codec0 = (totals[0] / totals[1].clamp(min=1)).item()
    sub = (totals[2] / totals[3].clamp(min=1)).item()
    return {"eval/codec0_loss": codec0, "eval/sub_talker_loss": sub}


def train(settings: Settings, label_shift: int = 1) -> TrainResult:
    """Fine-tune INIT_MODEL_PATH on TRAIN_SPEAKERS and export to ``settings.export_dir``.

    ``label_shift`` other than 1 reproduces the official recipe's misalignment; only tests use it.
    Raises DataError / TrainingError with a message naming the fix.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    accelerator = Accelerator(
        mixed_precision=settings.MIXED_PRECISION,
        gradient_accumulation_steps=settings.GRADIENT_ACCUMULATION_STEPS,
        cpu=settings.DEVICE == "cpu",
    )
    set_seed(settings.SEED)
    output_dir = Path(settings.OUTPUT_DIR)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        settings.save(output_dir / "training_settings.json")

    model_dir = resolve_model_dir(settings.INIT_MODEL_PATH)
    model, tokenizer = load_base_model(model_dir, accelerator.device)
    freeze_speaker_encoder(model)
    speaker_embeds, languages = compute_speaker_embeddings(model, settings)
    train_examples, train_skipped = load_examples(settings, tokenizer, "train")
    val_examples, _ = load_examples(settings, tokenizer, "validation")
    if any(train_skipped.values()):
        logger.warning("skipped training rows per speaker: %s", train_skipped)

    train_loader = make_dataloader(train_examples, settings.BATCH_SIZE, shuffle=True, seed=settings.SEED)
    val_loader = make_dataloader(val_examples, settings.BATCH_SIZE, shuffle=False, seed=settings.SEED)
    step_module = TalkerStep(
        model,
        speaker_embeds,
        layout=settings.TRAINING_LAYOUT,
        sub_talker_loss_weight=settings.SUB_TALKER_LOSS_WEIGHT,
        label_shift=label_shift,
    )
    optimizer = make_optimizer(model, settings)
    steps_per_epoch = math.ceil(len(train_loader) / accelerator.num_processes / settings.GRADIENT_ACCUMULATION_STEPS)
    total_steps = settings.MAX_STEPS or settings.NUM_EPOCHS * steps_per_epoch
    num_epochs = math.ceil(total_steps / max(steps_per_epoch, 1))
    scheduler = make_scheduler(optimizer, settings, total_steps)
    step_module, optimizer, train_loader = accelerator.prepare(step_module, optimizer, train_loader)
    if val_examples:
        val_loader = accelerator.prepare(val_loader)
    trainable = [p for p in step_module.parameters() if p.requires_grad]
    max_norm = settings.MAX_GRAD_NORM if settings.MAX_GRAD_NORM > 0 else float("inf")

    result = TrainResult()
    metrics_path = output_dir / METRICS_FILE
    progress = tqdm(total=total_steps, desc="training", disable=not accelerator.is_local_main_process)
    step_module.train()
    running = torch.zeros(3, device=accelerator.device)  # loss, codec0, sub-talker sums since the last log
    running_count = 0
    started = time.perf_counter()
    done = False
    for epoch in range(num_epochs):
        for batch in train_loader:
            with accelerator.accumulate(step_module):
                loss, out = step_module(batch)
                accelerator.backward(loss)
                running += torch.stack([loss.detach(), out.codec0_loss.detach(), out.sub_talker_loss.detach()])
                running_count += 1
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(trainable, max_norm)
                    if torch.isfinite(grad_norm):
                        optimizer.step()
                        if not accelerator.optimizer_step_was_skipped:
                            scheduler.step()
                    else:
                        result.skipped_steps += 1
                        logger.warning("non-finite loss or gradient at step %d: update skipped", result.optimizer_steps)
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            result.optimizer_steps += 1
            progress.update(1)
            step = result.optimizer_steps
            if step % settings.LOGGING_STEPS == 0 or step == total_steps:
                means = (accelerator.reduce(running, reduction="mean") / max(running_count, 1)).tolist()
                record = {
                    "step": step,
                    "epoch": epoch,
                    "train/loss": means[0],
                    "train/codec0_loss": means[1],
                    "train/sub_talker_loss": means[2],
                    "train/lr": scheduler.get_last_lr()[0],
                    "train/grad_norm": float(grad_norm),
                    "train/skipped_steps": result.skipped_steps,
                    "train/elapsed_s": time.perf_counter() - started,
                }
                result.train_loss = means[0]
                running.zero_()
                running_count = 0
                progress.set_postfix(loss=f"{means[0]:.3f}")
                _log(accelerator, metrics_path, record, result)
            if val_examples and settings.EVAL_STEPS and step % settings.EVAL_STEPS == 0 and step != total_steps:
                record = {"step": step, **evaluate_loss(step_module, val_loader, accelerator)}
                _log(accelerator, metrics_path, record, result)
            if step >= total_steps:
                done = True
                break
        if done:
            break
    progress.close()
    if val_examples:
        eval_metrics = evaluate_loss(step_module, val_loader, accelerator)
        result.eval_loss = eval_metrics["eval/codec0_loss"]
        _log(accelerator, metrics_path, {"step": result.optimizer_steps, **eval_metrics}, result)

    accelerator.wait_for_everyone()
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
        )
        logger.info("exported %s", result.export_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def _log(accelerator, path: Path, record: dict, result: TrainResult) -> None:
    result.history.append(record)
    if not accelerator.is_main_process:
        return
    logger.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
