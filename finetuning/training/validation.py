"""Validation losses during and after training: the step's talker losses on the validation split.

Batches are packed by length under MAX_BATCH_TOKENS (BATCH_SIZE examples when it is 0), like training batches,
and put in a fixed seeded order; a periodic validation (every EVAL_STEPS) scores only the first EVAL_MAX_BATCHES
batches per process of that order, the same ones every time so the curve compares like with like, and the final
validation scores them all.
"""

from __future__ import annotations

import math
import random

import torch

from finetuning.settings import Settings
from finetuning.training.data import Example, collate
from finetuning.training.step import sequence_length


def validation_batches(lengths: list[int], max_batch_tokens: int, batch_size: int, seed: int) -> list[list[int]]:
    """Indices of ``lengths`` in batches: sorted by length and packed while batch size × longest length stays
    within ``max_batch_tokens`` (an example longer than that alone), or ``batch_size`` per batch when
    ``max_batch_tokens`` is 0; the batch order is shuffled with ``seed`` so any prefix spans every length."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    for index in order:
        current = batches[-1] if batches else None
        if max_batch_tokens > 0:
            full = current is None or (len(current) + 1) * lengths[index] > max_batch_tokens
        else:
            full = current is None or len(current) >= batch_size
        if full:
            batches.append([index])
        else:
            current.append(index)
    random.Random(seed).shuffle(batches)
    return batches


@torch.no_grad()
def validation_losses(
    step_module, sets: dict[str, list[Example]], settings: Settings, accelerator, max_batches: int = 0
) -> dict[str, float]:
    """``set_losses`` of every validation set (``Conditioning.validation``: the rows' languages under ``eval/``,
    the languageless prefix under ``eval/auto/``). Call on every process."""
    losses = {}
    for prefix, examples in sets.items():
        if examples:
            losses.update(set_losses(step_module, examples, settings, accelerator, max_batches, f"eval/{prefix}"))
    return losses


@torch.no_grad()
def set_losses(
    step_module, examples: list[Example], settings: Settings, accelerator, max_batches: int = 0, prefix: str = "eval/"
) -> dict[str, float]:
    """Token-weighted ``codec0_loss`` and ``sub_talker_loss`` (names after ``prefix``) over ``examples``, each
    process scoring its share of the batches (at most ``max_batches`` of them; 0 = all) and the sums reduced
    across processes. Call on every process."""
    from accelerate.utils import send_to_device

    talker_config = accelerator.unwrap_model(step_module).model.config.talker_config
    lengths = [
        sequence_length(
            talker_config,
            e.text_ids.numel(),
            e.codes.shape[0],
            e.language,
            e.layout or settings.TRAINING_LAYOUT,
            e.reference_size(),
            e.instruct_size(),
        )
        for e in examples
    ]
    batches = validation_batches(lengths, settings.MAX_BATCH_TOKENS, settings.BATCH_SIZE, settings.SEED)
    rank, processes = accelerator.process_index, accelerator.num_processes
    shard = batches[rank::processes][: max_batches or None]
    # Every process runs the same number of forward passes (DDP/FSDP forwards are collective); a process whose
    # share ran out repeats a batch with weight 0.
    passes = min(math.ceil(len(batches) / processes), max_batches or len(batches))
    step_module.eval()
    totals = torch.zeros(4, device=accelerator.device, dtype=torch.float64)
    for i in range(passes):
        part = shard[i] if i < len(shard) else batches[0]
        weight = 1.0 if i < len(shard) else 0.0
        _, out = step_module(send_to_device(collate([examples[j] for j in part]), accelerator.device))
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
    return {f"{prefix}codec0_loss": codec0, f"{prefix}sub_talker_loss": sub}
