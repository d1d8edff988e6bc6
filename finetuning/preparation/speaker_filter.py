"""Speaker filter for recordings: how similar each candidate clip's voice is to the speaker's reference clips.

The encoder is resemblyzer's GE2E (256-d, 16 kHz; its weights ship inside the wheel, so it runs offline), the
offline speaker-similarity model evaluation uses too. Each bundled speaker's 14 sentences (1-4 s) measure
0.72-0.95 against that speaker's reference clip and the other voice's 0.36-0.53, so the default
``MIN_SPEAKER_SIMILARITY`` 0.6 drops an interviewer or an audience member of another voice while keeping
short clips of the speaker. Clips below it are rejected as ``other_speaker``.
"""

from __future__ import annotations

import warnings

import numpy as np

from finetuning.constants import SAMPLE_RATE
from finetuning.preparation.sources import SourceError

ENCODER_NAME = "resemblyzer-ge2e"
NO_SPEECH_SIMILARITY = 0.0  # a clip in which the encoder's own VAD finds no speech matches nobody


class SpeakerFilter:
    """Cosine similarity of clips to the mean embedding of a speaker's reference clips (24 kHz mono)."""

    def __init__(self, references: list[np.ndarray], device: str = "cpu"):
        try:
            with warnings.catch_warnings():  # it imports a deprecated scipy.ndimage path
                warnings.simplefilter("ignore", DeprecationWarning)
                from resemblyzer import VoiceEncoder
        except ImportError as error:
            raise SourceError(
                f"the speaker filter needs resemblyzer ({error}): install the eval extra "
                "(uv sync --extra eval) or set MIN_SPEAKER_SIMILARITY=0"
            ) from error
        self._encoder = VoiceEncoder(device=device, verbose=False)
        embeddings = [e for e in (self._embed(r) for r in references) if e is not None]
        if not embeddings:
            raise SourceError("the speaker filter found no speech in the reference clips")
        centre = np.mean(embeddings, axis=0)
        self._reference = centre / np.linalg.norm(centre)

    def _embed(self, samples: np.ndarray) -> np.ndarray | None:
        import torch
        from resemblyzer import preprocess_wav

        wav = preprocess_wav(np.asarray(samples, dtype=np.float32), source_sr=SAMPLE_RATE)
        if wav.size == 0:
            return None
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the GE2E LSTM runs many tiny steps: more threads only wait on each other
        try:
            embedding = np.asarray(self._encoder.embed_utterance(wav), dtype=np.float32)
        finally:
            torch.set_num_threads(threads)
        return embedding / np.linalg.norm(embedding)

    def similarity(self, samples: np.ndarray) -> float:
        """Cosine similarity in [-1, 1] of one 24 kHz clip to the speaker; NO_SPEECH_SIMILARITY without speech."""
        embedding = self._embed(samples)
        return NO_SPEECH_SIMILARITY if embedding is None else float(embedding @ self._reference)
