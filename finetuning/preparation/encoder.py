"""The 12 Hz speech tokenizer as preparation uses it: loaded once, clips encoded to codes in batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from finetuning.constants import SAMPLE_RATE
from finetuning.resources import ModelUnavailable, one_line, resolve_device, resolve_model_dir

TOKENIZER_FILES = ("config.json", "preprocessor_config.json")  # what a speech-tokenizer folder must hold


class SpeechEncoder:
    """Loads the 12 Hz speech tokenizer once, on first use, and encodes 24 kHz clips in batches."""

    def __init__(self, tokenizer_path: str, device: str = "auto", batch_size: int = 8, token: str | None = None):
        self.tokenizer_path = tokenizer_path
        self.device = device
        self.batch_size = batch_size
        self.token = token or None
        self.clips_encoded = 0
        self._tokenizer = None
        self._folder: Path | None = None

    def folder(self) -> Path:
        """The tokenizer's local folder, found once (a Hub id may be downloaded). Raises ModelUnavailable naming
        TOKENIZER_PATH for a folder that is missing or incomplete, or a Hub id that cannot be fetched."""
        if self._folder is None:
            self._folder = resolve_model_dir(
                self.tokenizer_path, self.token, key="TOKENIZER_PATH", required=TOKENIZER_FILES
            )
        return self._folder

    def _load(self):
        """The tokenizer on its device. Raises ModelUnavailable (one line naming TOKENIZER_PATH) as ``folder`` does,
        or when its files do not load."""
        import torch
        from qwen_tts import Qwen3TTSTokenizer

        device = resolve_device(self.device)
        try:
            tokenizer = Qwen3TTSTokenizer.from_pretrained(str(self.folder()))
            tokenizer.model.to(device).eval()
        except Exception as error:  # corrupt weights, foreign configs, devices: transformers raises many types
            raise ModelUnavailable(
                f"TOKENIZER_PATH={self.tokenizer_path} does not load as the 12 Hz speech tokenizer "
                f"({type(error).__name__}: {one_line(error)})"
            ) from error
        tokenizer.device = torch.device(device)
        return tokenizer

    def encode(self, clips: list[np.ndarray], desc: str = "encoding", progress: bool = True) -> list[np.ndarray]:
        """24 kHz mono clips -> codes, each (frames, 16) int16. Batches sorted by length to limit padding."""
        if self._tokenizer is None:
            self._tokenizer = self._load()
        order = sorted(range(len(clips)), key=lambda i: len(clips[i]))
        codes: list[np.ndarray | None] = [None] * len(clips)
        with tqdm(total=len(clips), desc=desc, unit="clip", disable=not progress) as bar:
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                encoded = self._tokenizer.encode([clips[i] for i in batch], sr=SAMPLE_RATE)
                for index, code in zip(batch, encoded.audio_codes, strict=True):
                    codes[index] = code.cpu().numpy().astype(np.int16)
                bar.update(len(batch))
        self.clips_encoded += len(clips)
        return codes  # type: ignore[return-value]
