"""Preflight: will this run fit on the GPU? Sizes the model of INIT_MODEL_PATH before any weight loads.

``finetune.py --preflight`` prints the parameter counts, the estimated peak memory per GPU by part
(``sizing.estimate_memory``) against the GPU's memory, says whether it fits, and when it does not, which change
(gradient checkpointing, ZeRO stage, a smaller MAX_BATCH_TOKENS) would make it fit.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from finetuning.constants import FRAME_RATE_HZ
from finetuning.published_models import PUBLISHED_PARAMETERS, model_config
from finetuning.settings import Settings
from finetuning.training.sizing import (
    FITS_MARGIN,
    GIB,
    MemoryEstimate,
    ModelShape,
    TrainingPlan,
    estimate_memory,
    model_shape,
)

MIN_BATCH_TOKENS = 256  # the smallest MAX_BATCH_TOKENS a suggestion goes down to


@dataclass(frozen=True)
class Preflight:
    """The estimate for one plan and the verdict; ``text`` is what the command prints."""

    estimate: MemoryEstimate
    gpu_memory_bytes: float | None
    fits: bool | None  # None when no GPU memory is known
    text: str


def visible_gpu_memory_bytes() -> float | None:
    """Total memory of the first visible CUDA GPU, or None without one."""
    import torch

    return float(torch.cuda.get_device_properties(0).total_memory) if torch.cuda.is_available() else None


def training_plan(settings: Settings, num_gpus: int, zero_stage: int, gradient_checkpointing: bool) -> TrainingPlan:
    """The plan of ``settings``: its precision and the largest micro-batch (MAX_BATCH_TOKENS positions, all
    counted as frames, an upper bound; BATCH_SIZE × the longest clip when MAX_BATCH_TOKENS is 0)."""
    positions = settings.MAX_BATCH_TOKENS or settings.BATCH_SIZE * round(settings.MAX_DURATION_S * FRAME_RATE_HZ)
    return TrainingPlan(settings.MIXED_PRECISION, num_gpus, zero_stage, gradient_checkpointing, positions, positions)


def _fits(estimate: MemoryEstimate, gpu_bytes: float) -> bool:
    return estimate.total <= FITS_MARGIN * gpu_bytes


def suggestions(shape: ModelShape, plan: TrainingPlan, gpu_bytes: float, trainable: int | None = None) -> list[str]:
    """Single changes to ``plan`` that make it fit, cheapest first; empty when none does."""
    found = []
    candidates = [("GRADIENT_CHECKPOINTING=true (--gradient-checkpointing)", {"gradient_checkpointing": True})]
    if plan.num_processes > 1:
        candidates += [
            (f"ZeRO stage {stage} (--zero-stage {stage})", {"zero_stage": stage})
            for stage in (2, 3)
            if stage > plan.zero_stage
        ]
    for label, change in candidates:
        if _fits(estimate_memory(shape, dataclasses.replace(plan, **change), trainable), gpu_bytes):
            found.append(label)
    tokens = plan.positions
    while tokens > MIN_BATCH_TOKENS:
        tokens //= 2
        smaller = dataclasses.replace(plan, positions=tokens, frames=tokens)
        if _fits(estimate_memory(shape, smaller, trainable), gpu_bytes):
            found.append(f"MAX_BATCH_TOKENS={tokens} (raise GRADIENT_ACCUMULATION_STEPS to keep the batch)")
            break
    return found


def lora_trainable_parameters(config: dict, settings: Settings) -> int:
    """Parameters FINETUNE_METHOD=lora trains on the model of ``config``: the adapters of LORA_RANK on LORA_TARGETS
    plus the LORA_FULLY_TRAINED copies, counted on a meta-device build (nothing is allocated)."""
    from finetuning.published_models import build_on_meta
    from finetuning.training.lora import apply_lora, trainable_summary

    model = build_on_meta(config)
    model.speaker_encoder.requires_grad_(False)
    apply_lora(model, settings)
    return int(trainable_summary(model)["trainable_parameters"])


def _trainable_note(settings: Settings) -> str:
    if settings.FINETUNE_METHOD == "lora":
        fully = ",".join(settings.LORA_FULLY_TRAINED) or "nothing"
        return f"LoRA rank {settings.LORA_RANK} adapters + {fully} trained fully"
    return "speaker encoder frozen"


def _gib(value: float) -> str:
    return f"{value / GIB:6.2f} GiB"


def run_preflight(
    settings: Settings,
    gpu_memory_gb: float | None = None,
    num_gpus: int = 1,
    zero_stage: int = 0,
    gradient_checkpointing: bool = False,
    trainable: int | None = None,
) -> Preflight:
    """Size INIT_MODEL_PATH (a local folder or a known Hub id: no download) as ``settings`` would train it.

    ``gpu_memory_gb`` replaces the visible GPU's memory; ``trainable`` the trainable parameter count (adapter
    methods). Raises FileNotFoundError when INIT_MODEL_PATH is neither a folder nor a known Hub id.
    """
    config = model_config(settings.INIT_MODEL_PATH)
    shape = model_shape(config)
    if trainable is None and settings.FINETUNE_METHOD == "lora":
        trainable = lora_trainable_parameters(config, settings)
    plan = training_plan(settings, num_gpus, zero_stage, gradient_checkpointing)
    estimate = estimate_memory(shape, plan, trainable)
    gpu_bytes = gpu_memory_gb * GIB if gpu_memory_gb else visible_gpu_memory_bytes()
    published = PUBLISHED_PARAMETERS.get(settings.INIT_MODEL_PATH)
    trained = shape.trainable if trainable is None else trainable
    lines = [
        f"model           {settings.INIT_MODEL_PATH}",
        f"parameters      {shape.parameters:,}" + (f" (published: {published:,})" if published else ""),
        f"trainable       {trained:,} ({_trainable_note(settings)})",
        f"precision       {plan.precision}, AdamW (float32 master weights and states)",
        f"processes       {plan.num_processes}, ZeRO stage {plan.zero_stage}"
        + (" (FSDP full shard)" if plan.zero_stage == 3 else ""),
        f"checkpointing   {'on' if plan.gradient_checkpointing else 'off'}",
        f"micro-batch     {plan.positions} talker positions (MAX_BATCH_TOKENS), all counted as frames",
        "peak per GPU (estimate):",
        *(f"  {name:24s}{_gib(value)}" for name, value in estimate.parts().items()),
        f"  {'total':24s}{_gib(estimate.total)}",
    ]
    fits = None
    if gpu_bytes is None:
        lines.append("GPU             none visible; pass --gpu-memory-gb to compare")
    else:
        fits = _fits(estimate, gpu_bytes)
        verdict = "fits" if fits else "does NOT fit"
        lines.append(f"GPU memory      {_gib(gpu_bytes)}: {verdict} (limit {FITS_MARGIN:.0%} of it)")
        if not fits:
            changes = suggestions(shape, plan, gpu_bytes, trainable)
            lines.append("to fit, change one of: " + "; ".join(changes) if changes else "no single change fits")
    return Preflight(estimate, gpu_bytes, fits, "\n".join(lines))
