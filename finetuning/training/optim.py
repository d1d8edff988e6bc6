"""Optimizer, learning-rate schedule and the optimizer step (clip, skip non-finite updates, step the schedule)."""

from __future__ import annotations

import logging

import torch

from finetuning.settings import Settings

logger = logging.getLogger(__name__)

NO_DECAY_MARKERS = ("bias", "norm", "embedding")  # parameters AdamW does not shrink
SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}  # LR_SCHEDULE -> transformers


def make_optimizer(model, settings: Settings) -> torch.optim.Optimizer:
    """AdamW over every trainable parameter outside the speaker encoder; no decay on biases, norms, embeddings.

    Fused (one kernel for all parameters, CPU and CUDA) where torch supports the parameters' device and dtype,
    else the multi-tensor ``foreach`` path; both compute the same update. Call after the model is on its device.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad or name.startswith("speaker_encoder."):
            continue
        (no_decay if any(m in name.lower() for m in NO_DECAY_MARKERS) else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": settings.WEIGHT_DECAY},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if _fused_kernel_supports(decay + no_decay):
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
