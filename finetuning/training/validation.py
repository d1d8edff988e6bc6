"""Validation losses during and after training: the step's talker losses on the validation split."""

from __future__ import annotations

import math

import torch

from finetuning.settings import Settings
from finetuning.training.data import Example, collate


@torch.no_grad()
def validation_losses(step_module, examples: list[Example], settings: Settings, accelerator) -> dict[str, float]:
    """Token-weighted ``eval/codec0_loss`` and ``eval/sub_talker_loss`` over ``examples`` in BATCH_SIZE batches,
    each process scoring its share and the sums reduced across processes. Call on every process."""
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
