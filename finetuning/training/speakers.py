"""Speaker embeddings from the Base model's own (frozen) speaker encoder.

X-vectors are computed in the dtype stock generation computes them in at inference: ``extract_speaker_embedding``
runs the encoder in the model's dtype, and a published checkpoint is used in its config's dtype (bfloat16), not
in the float32 of the master weights training loads. A custom-voice speaker row is the norm-matched mean of its
clips' x-vectors: the direction of their mean (the closest to every clip on average) at the mean length of one
clip's x-vector, the length the Base model's speaker slot was trained on; a plain mean of clips that point in
different directions is shorter than any of them (``bench/speaker_rows.py`` measures both).
"""

from __future__ import annotations

import copy
from itertools import islice

import numpy as np
import torch

from finetuning.constants import SAMPLE_RATE
from finetuning.settings import Settings
from finetuning.training.data import load_reference_audio, load_split

MEL_OPTIONS = dict(n_fft=1024, num_mels=128, sampling_rate=SAMPLE_RATE, hop_size=256, win_size=1024, fmin=0, fmax=12000)


def clip_xvectors(model, clips: list[np.ndarray], dtype: torch.dtype | None = None) -> torch.Tensor:
    """(C, D) x-vectors of ``clips`` (24 kHz float32 arrays), each computed alone as stock
    ``extract_speaker_embedding`` computes it, with the speaker encoder in ``dtype`` (None: the model's own);
    returned in that dtype, on the host."""
    from qwen_tts.core.models.modeling_qwen3_tts import mel_spectrogram

    encoder = model.speaker_encoder
    dtype = dtype or model.dtype
    if dtype != next(encoder.parameters()).dtype:
        encoder = copy.deepcopy(encoder).to(dtype)  # the frozen original stays as training loaded it
    device = next(encoder.parameters()).device
    vectors = []
    with torch.no_grad():
        for clip in clips:
            audio = torch.from_numpy(np.asarray(clip, dtype=np.float32))[None]
            mels = mel_spectrogram(audio, **MEL_OPTIONS).transpose(1, 2)  # (1, frames, 128)
            vectors.append(encoder(mels.to(device, dtype))[0].cpu())
    return torch.stack(vectors)


def norm_matched_mean(xvectors: torch.Tensor) -> torch.Tensor:
    """(C, D) -> (D,) float32: the mean's direction at the clips' mean norm (one clip: that clip's x-vector)."""
    vectors = xvectors.float()
    mean = vectors.mean(dim=0)
    return mean * (vectors.norm(dim=-1).mean() / mean.norm().clamp(min=torch.finfo(torch.float32).tiny))


def speaker_embedding(model, clips: list[np.ndarray], dtype: torch.dtype | None = None) -> torch.Tensor:
    """The speaker row for ``clips`` (24 kHz float32 arrays): ``norm_matched_mean`` of their x-vectors computed in
    ``dtype`` (``clip_xvectors``); returns (D,) float32.

    Raises ValueError when no clip is given.
    """
    if not clips:
        raise ValueError("a speaker embedding needs at least one reference clip")
    return norm_matched_mean(clip_xvectors(model, clips, dtype))


def compute_speaker_embeddings(model, settings: Settings, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(S, D) speaker rows in TRAIN_SPEAKERS order from each speaker's reference clips plus the first
    SPEAKER_EMBEDDING_CLIPS training clips (read only when asked, streamed when DATA_STREAMING), x-vectors computed
    in ``dtype`` (``speaker_embedding``)."""
    embeds = []
    for speaker in settings.TRAIN_SPEAKERS:
        clips = load_reference_audio(settings, speaker)
        if settings.SPEAKER_EMBEDDING_CLIPS:
            train = load_split(settings, speaker, "train", ["audio"], streaming=settings.DATA_STREAMING)
            for row in islice(train or [], settings.SPEAKER_EMBEDDING_CLIPS):
                clips.append(row["audio"]["array"])
        embeds.append(speaker_embedding(model, clips, dtype))
    return torch.stack(embeds)


def freeze_speaker_encoder(model) -> None:
    """The speaker encoder only provides fixed embeddings: no gradient, eval mode."""
    if model.speaker_encoder is not None:
        model.speaker_encoder.requires_grad_(False)
        model.speaker_encoder.eval()
