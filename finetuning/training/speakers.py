"""Speaker embeddings: the mean x-vector of the Base model's own (frozen) speaker encoder over reference clips."""

from __future__ import annotations

from itertools import islice

import numpy as np
import torch

from finetuning.constants import SAMPLE_RATE
from finetuning.settings import Settings
from finetuning.training.data import load_reference_audio, load_split


def speaker_embedding(model, clips: list[np.ndarray]) -> torch.Tensor:
    """Mean over ``clips`` (24 kHz float32 arrays) of ``model.extract_speaker_embedding``; returns (D,) float32.

    Raises ValueError when no clip is given.
    """
    if not clips:
        raise ValueError("a speaker embedding needs at least one reference clip")
    vectors = [model.extract_speaker_embedding(np.asarray(c, dtype=np.float32), SAMPLE_RATE) for c in clips]
    return torch.stack([v.float().cpu() for v in vectors]).mean(dim=0)


def compute_speaker_embeddings(model, settings: Settings) -> torch.Tensor:
    """(S, D) mean x-vectors in TRAIN_SPEAKERS order over each speaker's reference clips plus the first
    SPEAKER_EMBEDDING_CLIPS training clips (read only when asked, streamed when DATA_STREAMING)."""
    embeds = []
    for speaker in settings.TRAIN_SPEAKERS:
        clips = load_reference_audio(settings, speaker)
        if settings.SPEAKER_EMBEDDING_CLIPS:
            train = load_split(settings, speaker, "train", ["audio"], streaming=settings.DATA_STREAMING)
            for row in islice(train or [], settings.SPEAKER_EMBEDDING_CLIPS):
                clips.append(row["audio"]["array"])
        embeds.append(speaker_embedding(model, clips))
    return torch.stack(embeds)


def freeze_speaker_encoder(model) -> None:
    """The speaker encoder only provides fixed embeddings: no gradient, eval mode."""
    if model.speaker_encoder is not None:
        model.speaker_encoder.requires_grad_(False)
        model.speaker_encoder.eval()
