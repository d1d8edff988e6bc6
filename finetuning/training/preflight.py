"""Preflight: will this run fit on the GPU? Sizes the model of INIT_MODEL_PATH before any weight loads.

``finetune.py --preflight`` prints the parameter counts, the estimated peak memory per GPU by part
(``sizing.estimate_memory``) against the GPU's memory, says whether it fits, and when it does not, which change
(gradient checkpointing, ZeRO stage, a smaller MAX_BATCH_TOKENS) would make it fit.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass

from finetuning.constants import FRAME_RATE_HZ
from finetuning.published_models import PUBLISHED_PARAMETERS, model_config
from finetuning.settings import Settings
from finetuning.training.sizing import (
    FITS_MARGIN,
    GIB,
    OPTIMIZERS,
    MemoryEstimate,
    ModelShape,
    TrainingPlan,
    estimate_memory,
    model_shape,
    trained_shapes,
)

MIN_BATCH_TOKENS = 256  # the smallest MAX_BATCH_TOKENS a suggestion goes down to
OFFLOAD_ZERO_STAGE = 2
OFFLOAD_CONFIG = "finetuning/accelerate_configs/deepspeed_zero2_offload.yaml"
MAX_PICKS = 6  # configurations listed
FSDP_STAGE = 3  # what --zero-stage 3 stands for


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


def training_plan(
    settings: Settings,
    num_gpus: int,
    zero_stage: int,
    gradient_checkpointing: bool,
    offload_optimizer: bool = False,
) -> TrainingPlan:
    """The plan of ``settings``: its precision, OPTIMIZER and the largest micro-batch (MAX_BATCH_TOKENS positions,
    all counted as frames, an upper bound; BATCH_SIZE × the longest clip when MAX_BATCH_TOKENS is 0). Optimizer
    offload runs under DeepSpeed ZeRO-2."""
    positions = settings.MAX_BATCH_TOKENS or settings.BATCH_SIZE * round(settings.MAX_DURATION_S * FRAME_RATE_HZ)
    stage = OFFLOAD_ZERO_STAGE if offload_optimizer else zero_stage
    return TrainingPlan(
        settings.MIXED_PRECISION,
        num_gpus,
        stage,
        gradient_checkpointing,
        positions,
        positions,
        settings.OPTIMIZER,
        offload_optimizer,
    )


def _fits(estimate: MemoryEstimate, gpu_bytes: float) -> bool:
    return estimate.total <= FITS_MARGIN * gpu_bytes


def suggestions(
    shape: ModelShape, plan: TrainingPlan, gpu_bytes: float, shapes: tuple[tuple[int, ...], ...] | None = None
) -> list[str]:
    """Single changes to ``plan`` that make it fit, cheapest first; empty when none does. ``shapes``: the trained
    tensors when they are not the full fine-tune's (adapters)."""
    found = []
    candidates = [("GRADIENT_CHECKPOINTING=true (--gradient-checkpointing)", {"gradient_checkpointing": True})]
    if plan.num_processes > 1:
        candidates += [
            (f"ZeRO stage {stage} (--zero-stage {stage})", {"zero_stage": stage})
            for stage in (2, 3)
            if stage > plan.zero_stage
        ]
    for label, change in candidates:
        if _fits(estimate_memory(shape, dataclasses.replace(plan, **change), shapes=shapes), gpu_bytes):
            found.append(label)
    tokens = plan.positions
    while tokens > MIN_BATCH_TOKENS:
        tokens //= 2
        smaller = dataclasses.replace(plan, positions=tokens, frames=tokens)
        if _fits(estimate_memory(shape, smaller, shapes=shapes), gpu_bytes):
            found.append(f"MAX_BATCH_TOKENS={tokens} (raise GRADIENT_ACCUMULATION_STEPS to keep the batch)")
            break
    return found


def lora_trained_shapes(config: dict, settings: Settings) -> tuple[tuple[int, ...], ...]:
    """Shapes of the tensors FINETUNE_METHOD=lora trains on the model of ``config``: the adapters of LORA_RANK on
    LORA_TARGETS plus the LORA_FULLY_TRAINED copies, from a meta-device build (nothing is allocated)."""
    from finetuning.published_models import build_on_meta
    from finetuning.training.lora import apply_lora

    model = build_on_meta(config)
    model.speaker_encoder.requires_grad_(False)
    apply_lora(model, dataclasses.replace(settings, FINETUNE_METHOD="lora"))
    return trained_shapes(model)


@dataclass(frozen=True)
class Pick:
    """One configuration that fits: the method, OPTIMIZER, gradient checkpointing, optimizer offload, and its
    estimate."""

    method: str
    optimizer: str
    gradient_checkpointing: bool
    offload_optimizer: bool
    estimate: MemoryEstimate

    def changes(self) -> str:
        """The settings (and launch config) that select it."""
        parts = [f"FINETUNE_METHOD={self.method}", f"OPTIMIZER={self.optimizer}"]
        parts.append(f"GRADIENT_CHECKPOINTING={str(self.gradient_checkpointing).lower()}")
        if self.offload_optimizer:
            parts.append(f"--config_file {OFFLOAD_CONFIG}")
        return " ".join(parts)


def picks(
    settings: Settings,
    shape: ModelShape,
    plan: TrainingPlan,
    gpu_bytes: float,
    lora_shapes: tuple[tuple[int, ...], ...] | None,
) -> list[Pick]:
    """Every configuration of OPTIMIZER × gradient checkpointing × optimizer offload × method that fits
    ``gpu_bytes``, best first: FINETUNE_METHOD's method first (a full fine-tune falls back to LoRA, given its
    ``lora_shapes``; a LoRA run stays LoRA), then without offload (a CPU update every optimizer step), then without
    checkpointing (one more forward per micro-batch), then adamw, adamw_8bit, adafactor. Under FSDP
    (``plan.zero_stage`` 3) only adamw runs (``optim.check_optimizer``)."""
    methods = [settings.FINETUNE_METHOD] + (["lora"] if settings.FINETUNE_METHOD == "full" else [])
    found = []
    for method, offload, checkpointing, optimizer in itertools.product(
        methods, (False, True), (False, True), OPTIMIZERS
    ):
        if plan.zero_stage == FSDP_STAGE and not offload and optimizer != "adamw":
            continue
        candidate = dataclasses.replace(
            plan,
            optimizer=optimizer,
            gradient_checkpointing=checkpointing,
            offload_optimizer=offload,
            zero_stage=OFFLOAD_ZERO_STAGE if offload else plan.zero_stage,
        )
        estimate = estimate_memory(shape, candidate, shapes=lora_shapes if method == "lora" else None)
        if _fits(estimate, gpu_bytes):
            found.append(Pick(method, optimizer, checkpointing, offload, estimate))
    return found  # itertools.product already yields them in rank order


def picks_table(found: list[Pick], gpu_bytes: float) -> list[str]:
    """Lines listing the first MAX_PICKS of ``found`` with their estimated peak (and offload's host memory)."""
    if not found:
        return [f"no configuration fits in {_gib(gpu_bytes).strip()}: lower MAX_BATCH_TOKENS or add GPUs"]
    lines = [
        f"configurations that fit in {_gib(gpu_bytes).strip()}, best first ({len(found)} fit):",
        f"  {'#':>2}  {'method':6s}  {'optimizer':10s}  {'checkpointing':13s}  {'offload':7s}  peak/GPU   host",
    ]
    for rank, pick in enumerate(found[:MAX_PICKS], start=1):
        host = f"{pick.estimate.host / GIB:5.1f} GiB" if pick.offload_optimizer else "    -"
        lines.append(
            f"  {rank:>2}  {pick.method:6s}  {pick.optimizer:10s}  {'on' if pick.gradient_checkpointing else 'off':13s}"
            f"  {'cpu' if pick.offload_optimizer else 'no':7s}  {pick.estimate.total / GIB:5.1f} GiB  {host}"
            f"   {pick.changes()}"
        )
    return lines


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
    offload_optimizer: bool = False,
) -> Preflight:
    """Size INIT_MODEL_PATH (a local folder or a known Hub id: no download) as ``settings`` would train it, and with
    a GPU memory known, list the ``picks`` that fit.

    ``gpu_memory_gb`` replaces the visible GPU's memory. Raises FileNotFoundError when INIT_MODEL_PATH is neither a
    folder nor a known Hub id.
    """
    config = model_config(settings.INIT_MODEL_PATH)
    shape = model_shape(config)
    gpu_bytes = gpu_memory_gb * GIB if gpu_memory_gb else visible_gpu_memory_bytes()
    lora_shapes = None
    if settings.FINETUNE_METHOD == "lora" or gpu_bytes is not None:
        lora_shapes = lora_trained_shapes(config, settings)
    shapes = lora_shapes if settings.FINETUNE_METHOD == "lora" else None
    plan = training_plan(settings, num_gpus, zero_stage, gradient_checkpointing, offload_optimizer)
    estimate = estimate_memory(shape, plan, shapes=shapes)
    published = PUBLISHED_PARAMETERS.get(settings.INIT_MODEL_PATH)
    trained = shape.trainable if shapes is None else sum(math.prod(s) for s in shapes)
    lines = [
        f"model           {settings.INIT_MODEL_PATH}",
        f"parameters      {shape.parameters:,}" + (f" (published: {published:,})" if published else ""),
        f"trainable       {trained:,} ({_trainable_note(settings)})",
        f"precision       {plan.precision}, OPTIMIZER={plan.optimizer} (float32 master weights)",
        f"processes       {plan.num_processes}, ZeRO stage {plan.zero_stage}"
        + (" (FSDP full shard)" if plan.zero_stage == 3 else "")
        + (", optimizer offloaded to the CPU" if plan.offload_optimizer else ""),
        f"checkpointing   {'on' if plan.gradient_checkpointing else 'off'}",
        f"micro-batch     {plan.positions} talker positions (MAX_BATCH_TOKENS), all counted as frames",
        "peak per GPU (estimate):",
        *(f"  {name:24s}{_gib(value)}" for name, value in estimate.parts().items()),
        f"  {'total':24s}{_gib(estimate.total)}",
    ]
    if plan.offload_optimizer:
        lines.append(f"CPU memory      {_gib(estimate.host)} per process (master weights, gradients, states)")
    fits = None
    if gpu_bytes is None:
        lines.append("GPU             none visible; pass --gpu-memory-gb to compare")
    else:
        fits = _fits(estimate, gpu_bytes)
        verdict = "fits" if fits else "does NOT fit"
        lines.append(f"GPU memory      {_gib(gpu_bytes)}: {verdict} (limit {FITS_MARGIN:.0%} of it)")
        if not fits:
            changes = suggestions(shape, plan, gpu_bytes, shapes)
            lines.append("to fit, change one of: " + "; ".join(changes) if changes else "no single change fits")
        lines += picks_table(picks(settings, shape, plan, gpu_bytes, lora_shapes), gpu_bytes)
    return Preflight(estimate, gpu_bytes, fits, "\n".join(lines))
