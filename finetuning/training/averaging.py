"""Checkpoint averaging (AVERAGE_CHECKPOINTS=K): the export is the parameter mean of K saved training states.

``AVERAGE_BY=best`` takes the states of the K evaluations with the best SELECT_BY values, ``last`` the K states
saved last. The mean is computed one tensor at a time: every state's ``model.safetensors`` is opened lazily
(``safetensors.safe_open`` maps the file) and each tensor is summed over the K files in float32 and divided by K, so
memory holds the averaged model plus one tensor, never K models. Integer tensors (none in the talker today) must be
equal in every state. A LoRA run's states hold its adapters: they are averaged, then merged as every export is.

Which states exist is up to rotation: ``protected_steps`` names the steps the loop keeps beside the SAVE_TOTAL_LIMIT
newest (the K best so far), and the settings rules make every evaluation step a saved step.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from finetuning.settings import Settings
from finetuning.training.checkpointing import saved_states, state_dir
from finetuning.training.selection import Selection

logger = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"  # what accelerate's save_state writes for one unsharded model


class AveragingError(RuntimeError):
    """The states to average are missing or do not match; the message says which."""


def best_steps(selection: Selection, k: int) -> list[int]:
    """The steps of the ``k`` best finite evaluations so far, best first (ties: the earlier step)."""
    scored = [(step, value) for step, value in selection.history if math.isfinite(value)]
    sign = 1.0 if selection.direction == "lower" else -1.0
    return [step for step, _ in sorted(scored, key=lambda item: (sign * item[1], item[0]))[:k]]


def states_to_average(output_dir: str | Path, by: str, k: int, selection: Selection) -> list[Path]:
    """The state folders AVERAGE_BY=``by`` names: the ``k`` best evaluations' or the ``k`` saved last. Raises
    AveragingError when fewer than ``k`` of them are on disk."""
    if by == "best":
        paths = [state_dir(output_dir, step) for step in best_steps(selection, k)]
        paths = [p for p in paths if p in saved_states(output_dir)]
    else:
        paths = saved_states(output_dir)[-k:]
    if len(paths) < k:
        raise AveragingError(
            f"AVERAGE_CHECKPOINTS={k} (AVERAGE_BY={by}) found {len(paths)} saved states to average "
            f"({[p.name for p in paths]}); evaluate and save at the same steps, with room for them"
        )
    return paths


def average_states(paths: list[Path], prefix: str = "model.") -> dict[str, torch.Tensor]:
    """Elementwise mean of the weights under ``prefix`` in the states at ``paths`` (keys returned without it),
    one tensor at a time. Raises AveragingError when a state has no ``model.safetensors`` (FSDP and DeepSpeed save
    sharded states) or the states differ in keys, shapes or integer values."""
    from safetensors import safe_open

    missing = [str(p) for p in paths if not (p / MODEL_FILE).exists()]
    if missing or not paths:
        raise AveragingError(f"no {MODEL_FILE} in {missing or 'no states'}: only unsharded states can be averaged")
    handles = [safe_open(str(p / MODEL_FILE), "pt") for p in paths]
    keys = [sorted(k for k in h.keys() if k.startswith(prefix)) for h in handles]
    if any(k != keys[0] for k in keys):
        raise AveragingError(f"the states {[p.name for p in paths]} hold different weights")
    averaged = {}
    for key in keys[0]:
        first = handles[0].get_tensor(key)
        if not first.is_floating_point():
            if any(not torch.equal(h.get_tensor(key), first) for h in handles[1:]):
                raise AveragingError(f"{key} is an integer tensor that differs between the states")
            averaged[key[len(prefix) :]] = first
            continue
        total = first.float()
        for handle in handles[1:]:
            tensor = handle.get_tensor(key)
            if tensor.shape != first.shape:
                raise AveragingError(
                    f"{key} has shape {tuple(tensor.shape)} in one state, {tuple(first.shape)} in another"
                )
            total += tensor.float()
        averaged[key[len(prefix) :]] = (total / len(handles)).to(first.dtype)
    return averaged


def protected_steps(settings: Settings, selection: Selection) -> list[int]:
    """Steps whose states rotation keeps for AVERAGE_BY=best: the AVERAGE_CHECKPOINTS best so far."""
    if settings.AVERAGE_CHECKPOINTS and settings.AVERAGE_BY == "best":
        return best_steps(selection, settings.AVERAGE_CHECKPOINTS)
    return []


def average_for_export(settings: Settings, selection: Selection, accelerator) -> tuple[dict, dict]:
    """(weights, finetune_info.json keys) of the AVERAGE_CHECKPOINTS average: the weights on the main process
    ({} on the others, which then gather nothing)."""
    k, by = settings.AVERAGE_CHECKPOINTS, settings.AVERAGE_BY
    paths = states_to_average(settings.OUTPUT_DIR, by, k, selection)
    steps = [int(p.name.split("-")[-1]) for p in paths]
    logger.info("exporting the mean of %d states (AVERAGE_BY=%s): steps %s", k, by, steps)
    state = average_states(paths) if accelerator.is_main_process else {}
    return state, {"averaged": {"average_by": by, "states": k, "steps": steps}}
