"""Speaker embeddings: the mean x-vector of the Base model's own (frozen) speaker encoder over reference clips."""

from __future__ import annotations

import numpy as np
import torch

SPEAKER_ENCODER_SAMPLE_RATE = 24_000


def speaker_embedding(model, clips: list[np.ndarray]) -> torch.Tensor:
    """Mean over ``clips`` (24 kHz float32 arrays) of ``model.extract_speaker_embedding``; returns (D,) float32.

    Raises ValueError when no clip is given.
    """
    if not clips:
        raise ValueError("a speaker embedding needs at least one reference clip")
    vectors = [
        model.extract_speaker_embedding(np.asarray(c, dtype=np.float32), SPEAKER_ENCODER_SAMPLE_RATE) for c in clips
    ]
    return torch.stack([v.float().cpu() for v in vectors]).mean(dim=0)


def freeze_speaker_encoder(model) -> None:
    """The speaker encoder only provides fixed embeddings: no gradient, eval mode."""
    if model.speaker_encoder is not None:
        model.speaker_encoder.requires_grad_(False)
        model.speaker_encoder.eval()
