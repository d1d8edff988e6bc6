"""Measured peak tensor memory of real training steps, to check ``sizing``'s estimates on a CPU.

``PeakTensorMemory`` is a dispatch mode that sees every tensor an operator returns and counts each storage once
while it is alive (a weak reference tells when it is freed): the peak is the most tensor bytes alive at any moment,
which is what a GPU's caching allocator must hold, without allocator slack. ``measure_training_peak`` builds a
randomly initialised model of a ``config.json`` dict, runs AdamW training steps of one synthetic micro-batch
through the real ``TalkerStep`` and returns that peak.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from finetuning.constants import NUM_CODEBOOKS

CODEBOOK_SIZE = 2048
MEASURED_STEPS = 2  # the second step runs with AdamW's states alive


class PeakTensorMemory(TorchDispatchMode):
    """Tensor bytes alive (``current``) and their maximum (``peak``) while the mode is active; ``track`` adds
    tensors that existed before (parameters)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}  # storage handle -> bytes
        self.refs: dict[int, weakref.ref] = {}
        self.current = 0
        self.peak = 0

    def track(self, tensor) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.live:
            return
        self.live[key] = storage.nbytes()
        self.refs[key] = weakref.ref(storage, lambda _, k=key: self._free(k))
        self.current += self.live[key]
        self.peak = max(self.peak, self.current)

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)
        self.refs.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            self.track(tensor)
        return out


@dataclass(frozen=True)
class MeasuredPeak:
    """Peak tensor bytes of the steps, and the micro-batch's real talker positions and codec frames."""

    peak_bytes: int
    positions: int
    frames: int


def measure_training_peak(
    config: dict, batch_size: int, frames: int, text_tokens: int, precision: str = "no", seed: int = 0
) -> MeasuredPeak:
    """Peak tensor memory of ``MEASURED_STEPS`` AdamW steps of a full fine-tune (speaker encoder frozen) on one
    micro-batch of ``batch_size`` utterances of ``frames`` frames and ``text_tokens`` text tokens each, in
    float32 (``precision="no"``) or under CPU autocast (``bf16``)."""
    from qwen_tts.core.models.modeling_qwen3_tts import Qwen3TTSForConditionalGeneration

    from finetuning.published_models import qwen3_tts_config
    from finetuning.training.step import TalkerStep

    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = Qwen3TTSForConditionalGeneration(qwen3_tts_config(config))
    model.speaker_encoder.requires_grad_(False)
    talker = model.config.talker_config
    step = TalkerStep(model, torch.randn(1, talker.hidden_size, generator=generator))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    special = min(config[k] for k in ("im_start_token_id", "tts_pad_token_id"))
    batch = {
        "text_ids": [torch.randint(0, special, (text_tokens,), generator=generator) for _ in range(batch_size)],
        "codes": [
            torch.randint(0, CODEBOOK_SIZE, (frames, NUM_CODEBOOKS), generator=generator) for _ in range(batch_size)
        ],
        "speaker": torch.zeros(batch_size, dtype=torch.long),
        "language": ["english"] * batch_size,
    }
    probe = PeakTensorMemory()
    for tensor in [*model.parameters(), *model.buffers(), *step.buffers()]:
        probe.track(tensor)
    with probe:
        for _ in range(MEASURED_STEPS):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision != "no"):
                loss, out = step(batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    positions = int(out.attention_mask.numel())  # padded positions = what MAX_BATCH_TOKENS counts
    return MeasuredPeak(probe.peak, positions, int(out.frame_codes.shape[0]))
