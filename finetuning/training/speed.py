"""GPU levers behind settings, each off (or at the safe default) unless asked for, and model FLOPs for ``train/mfu``.

- ``ATTN_IMPLEMENTATION``: ``sdpa`` (default, every device), ``eager``, or ``flash_attention_2`` (the optional
  ``flash-attn`` dependency group, CUDA only).
- ``FUSED_CROSS_ENTROPY``: the codec heads' linear layer and cross-entropy in one kernel that never builds the
  logits (the optional ``liger`` group, liger-kernel's Triton kernels, CUDA only).
- ``TORCH_COMPILE``: ``torch.compile`` of the talker and code-predictor transformers (dynamic shapes: batch
  lengths vary), in place, so parameter names, checkpoints and exports do not change.

- ``CPU_HEAP_CACHE`` (on by default): a CPU run keeps freed tensor memory in the process heap (``keep_freed_memory``).

A lever asked for where it cannot run stops the command before the model loads with one line naming the setting,
what is missing and the fix (``SpeedOptionError``, a ``SettingsError``).
"""

from __future__ import annotations

import ctypes
import importlib.util
import sys
from collections.abc import Callable

import torch

from finetuning.settings import Settings, SettingsError

# Dense bf16/fp16 tensor-core peaks (FLOP/s, no sparsity) from the vendors' data sheets, matched against
# ``torch.cuda.get_device_name`` in this order (first match wins).
GPU_PEAK_FLOPS = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("A6000", 155e12),
    ("V100", 125e12),
    ("T4", 65e12),
)
TRAINING_FLOPS_PER_PARAMETER = 6  # forward 2 + backward 4 multiply-adds per weight per token (attention left out)


class SpeedOptionError(SettingsError):
    """A speed setting asks for something this machine lacks; the message names the setting and the fix."""


def check_speed_options(settings: Settings, device: torch.device) -> None:
    """Raise SpeedOptionError when FUSED_CROSS_ENTROPY or ATTN_IMPLEMENTATION=flash_attention_2 cannot run here."""
    wanted = []
    if settings.ATTN_IMPLEMENTATION == "flash_attention_2":
        wanted.append(("ATTN_IMPLEMENTATION=flash_attention_2", "flash_attn", "flash-attn", "ATTN_IMPLEMENTATION=sdpa"))
    if settings.FUSED_CROSS_ENTROPY:
        wanted.append(("FUSED_CROSS_ENTROPY=true", "liger_kernel", "liger", "FUSED_CROSS_ENTROPY=false"))
    for setting, module, group, fallback in wanted:
        if device.type != "cuda":
            raise SpeedOptionError(f"{setting} runs on CUDA GPUs only, this run is on {device.type}; set {fallback}")
        if importlib.util.find_spec(module) is None:
            raise SpeedOptionError(
                f"{setting} needs the {module} package: `uv sync --group {group}` (CUDA machine), or set {fallback}"
            )


def fused_cross_entropy(settings: Settings) -> Callable | None:
    """``loss(weight (V, D), hidden (M, D), targets (M,), bias (V,) | None) -> mean cross-entropy`` over targets
    other than -100, without building the (M, V) logits; None when FUSED_CROSS_ENTROPY is off."""
    if not settings.FUSED_CROSS_ENTROPY:
        return None
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    return LigerFusedLinearCrossEntropyLoss()


def compile_transformers(model, backend: str = "inductor") -> None:
    """TORCH_COMPILE: compile the talker's and the code predictor's decoder stacks in place (``Module.compile``
    keeps parameter names) with torch.compile ``backend``. Compilation happens on the first steps and again for
    new shape patterns."""
    model.talker.model.compile(dynamic=True, backend=backend)
    model.talker.code_predictor.model.compile(dynamic=True, backend=backend)


class ModelFlops:
    """Training FLOPs of one step from what it processed: 6 x the weights each token passes through.

    Talker positions pass through the talker's decoder and text projection; the codec head scores only labelled
    positions (one per frame, and each utterance's EOS, left out); each frame runs the code predictor on 16
    positions, each of which uses one of its 15 heads at most. Embedding lookups cost no FLOPs.
    """

    def __init__(self, model):
        talker, predictor = model.talker, model.talker.code_predictor
        linear = _linear_parameters
        self.per_position = TRAINING_FLOPS_PER_PARAMETER * (linear(talker.model) + linear(talker.text_projection))
        heads = list(predictor.lm_head)
        per_frame = 16 * (linear(predictor.model) + linear(predictor.small_to_mtp_projection))
        per_frame += len(heads) * linear(heads[0]) + linear(talker.codec_head)
        self.per_frame = TRAINING_FLOPS_PER_PARAMETER * per_frame

    def of(self, positions: float, frames: float) -> float:
        """FLOPs for ``positions`` real talker positions holding ``frames`` code frames."""
        return self.per_position * positions + self.per_frame * frames


def _linear_parameters(module: torch.nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak in FLOP/s from GPU_PEAK_FLOPS; None on CPU or for an unlisted GPU."""
    return peak_flops_of(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def peak_flops_of(device_name: str) -> float | None:
    """Peak FLOP/s of the first GPU_PEAK_FLOPS entry whose key is in ``device_name``; None when none is."""
    return next((peak for key, peak in GPU_PEAK_FLOPS if key in device_name), None)


# glibc's mallopt parameters and the largest mmap threshold it accepts on 64-bit machines (32 MiB).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024


def keep_freed_memory() -> bool:
    """CPU_HEAP_CACHE: make glibc's malloc serve blocks up to 32 MiB from the heap and never give freed heap memory
    back to the OS, for this process and the processes it forks. True when applied; False where the C library has
    no ``mallopt`` (not Linux, or not glibc).

    A training step allocates and frees activations, logits and gradients of a few MiB each, in sizes that change
    with every batch. glibc's default puts such blocks in fresh ``mmap`` pages or trims them off the heap once
    freed, so every step faults its memory in again: on the tiny model on CPU (2-core EPYC, one thread) that is
    about half of all the run's page faults and 15-20 % of its time. Memory the run freed stays counted in its
    resident size until it exits; the peak is the same.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
