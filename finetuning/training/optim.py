"""Optimizer, learning-rate schedule and the optimizer step (clip, skip non-finite updates, step the schedule).

OPTIMIZER picks the update and what its states cost per trained parameter (``sizing`` counts the same bytes):

============  ==========================================================================================
adamw         torch AdamW, exp_avg and exp_avg_sq in float32: 8 bytes
adamw_8bit    bitsandbytes ``AdamW8bit`` (optional group ``bitsandbytes``, CPU and CUDA): both moments in 8 bits
              with a float32 scale per block of 256 (block-wise quantisation): ~2 bytes. Tensors under 4096
              elements (biases, norms) keep float32 moments, as bitsandbytes does.
adafactor     transformers ``Adafactor`` without momentum, at LEARNING_RATE (no relative step, no parameter
              scaling): a matrix keeps one float32 per row and per column of its second moment; vectors keep
              theirs whole. Under DeepSpeed ZeRO every partition is a flat vector, so nothing is factored there.
============  ==========================================================================================
"""

from __future__ import annotations

import importlib.util
import logging

import torch

from finetuning.settings import Settings
from finetuning.settings_rules import SettingsError

logger = logging.getLogger(__name__)

NO_DECAY_MARKERS = ("bias", "norm", "embedding")  # parameters AdamW does not shrink
SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}  # LR_SCHEDULE -> transformers
# bitsandbytes keeps float32 moments for tensors smaller than this (its ``min_8bit_size`` default).
MIN_8BIT_ELEMENTS = 4096


class OptimizerError(SettingsError):
    """OPTIMIZER asks for a library or an engine this run lacks; the message names the setting and the fix."""


def check_optimizer(settings: Settings, engine: str) -> None:
    """Raise OptimizerError when OPTIMIZER cannot run under ``engine`` (accelerate's distributed type value,
    e.g. ``"NO"``, ``"MULTI_GPU"``, ``"FSDP"``, ``"DEEPSPEED"``): the 8-bit optimizer needs bitsandbytes,
    and neither adamw_8bit nor adafactor steps FSDP2's sharded (DTensor) parameters."""
    if settings.OPTIMIZER == "adamw":
        return
    if settings.OPTIMIZER == "adamw_8bit" and importlib.util.find_spec("bitsandbytes") is None:
        raise OptimizerError(
            "OPTIMIZER=adamw_8bit needs the bitsandbytes package: `uv sync --group bitsandbytes`, "
            "or set OPTIMIZER=adafactor (no extra package) or adamw"
        )
    if engine == "FSDP":
        raise OptimizerError(
            f"OPTIMIZER={settings.OPTIMIZER} does not run under FSDP (sharded DTensor parameters); use the DeepSpeed "
            "ZeRO-2 configs (finetuning/accelerate_configs/deepspeed_zero2*.yaml) or OPTIMIZER=adamw"
        )


def parameter_groups(model, weight_decay: float) -> list[dict]:
    """Every trainable parameter outside the speaker encoder, in two groups: decayed, and biases, norms and
    embeddings without decay."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad or name.startswith("speaker_encoder."):
            continue
        (no_decay if any(m in name.lower() for m in NO_DECAY_MARKERS) else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model, settings: Settings) -> torch.optim.Optimizer:
    """OPTIMIZER over ``parameter_groups`` at LEARNING_RATE, WEIGHT_DECAY on the decayed group.

    adamw is fused (one kernel for all parameters, CPU and CUDA) where torch supports the parameters' device and
    dtype, else the multi-tensor ``foreach`` path; both compute the same update. Call after the model is on its
    device, and ``check_optimizer`` first (an uninstalled bitsandbytes raises ImportError here).
    """
    groups = parameter_groups(model, settings.WEIGHT_DECAY)
    if settings.OPTIMIZER == "adamw_8bit":
        import bitsandbytes  # its import-time warning is quieted in finetuning/training/__init__.py

        return bitsandbytes.optim.AdamW8bit(groups, lr=settings.LEARNING_RATE, min_8bit_size=MIN_8BIT_ELEMENTS)
    if settings.OPTIMIZER == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(
            groups, lr=settings.LEARNING_RATE, scale_parameter=False, relative_step=False, warmup_init=False
        )
    if _fused_kernel_supports([p for group in groups for p in group["params"]]):
        return torch.optim.AdamW(groups, lr=settings.LEARNING_RATE, fused=True)
    logger.info("fused AdamW has no kernel for these parameters' device or dtype; using the multi-tensor path")
    return torch.optim.AdamW(groups, lr=settings.LEARNING_RATE, foreach=True)


def _fused_kernel_supports(params: list[torch.Tensor]) -> bool:
    """The check fused AdamW makes at its first step (too late to choose another path): floating-point
    parameters on a device with fused kernels."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    devices = _get_fused_kernels_supported_devices()
    return all(p.device.type in devices and torch.is_floating_point(p) for p in params)


def make_scheduler(optimizer, settings: Settings, total_steps: int):
    """Linear warmup over WARMUP_STEPS (at most ``total_steps``), then LR_SCHEDULE, counted in optimizer steps."""
    from transformers import get_scheduler

    return get_scheduler(
        SCHEDULES[settings.LR_SCHEDULE],
        optimizer,
        num_warmup_steps=min(settings.WARMUP_STEPS, total_steps),
        num_training_steps=total_steps,
    )


def optimizer_step(accelerator, parameters: list, optimizer, scheduler, max_grad_norm: float, step: int):
    """Clip (MAX_GRAD_NORM; 0 = off) and step; call when ``accelerator.sync_gradients``.

    ``parameters``: every parameter of the prepared step module, listed once per run (FSDP needs the module's own
    list; parameters without a gradient are ignored). Walking the module for it every step costs more than the
    clipping on a small model.

    An update whose gradient is not finite is skipped (fp16's scaler skips and rescales itself), and the schedule
    only advances on updates that happened (a skipped update is logged with the number of ``step``). Returns
    (gradient norm before clipping, a tensor or None; whether the update happened).
    """
    max_norm = max_grad_norm if max_grad_norm > 0 else float("inf")
    grad_norm = accelerator.clip_grad_norm_(parameters, max_norm)
    finite = grad_norm is None or bool(torch.isfinite(torch.as_tensor(grad_norm)))
    if finite or accelerator.scaler is not None:
        optimizer.step()
    stepped = finite and not accelerator.optimizer_step_was_skipped
    if stepped:
        scheduler.step()
    else:
        logger.warning("non-finite loss or gradient at step %d: update skipped", step)
    return grad_norm, stepped
