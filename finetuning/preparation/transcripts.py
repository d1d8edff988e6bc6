"""Transcripts of recordings: sidecar subtitles first, else ASR through transformers with a confidence.

* Sidecars: ``talk.srt`` or ``talk.vtt`` beside ``talk.mp4`` (read with webvtt-py). Each cue is one candidate
  clip, cut at the cue's own timestamps, its text exactly the cue's (lines joined by a space, markup removed).
* ASR (``ASR_MODEL``): a Whisper model (``generate`` with the manifest's language forced, batched, on the
  preparation device) or a CTC model (wav2vec2 / MMS; greedy decoding; an MMS model with per-language adapters
  switches to the manifest language's adapter and vocabulary, by the label or its ISO 639-3 code). Each clip
  gets its text and a confidence in [0, 1]: the geometric mean of the probabilities of the chosen tokens
  (Whisper: every generated token up to end-of-text; CTC: every frame not decoded as blank). Clips below
  ``MIN_ASR_CONFIDENCE`` are rejected as ``low_asr_confidence`` by the caller.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from finetuning.constants import SAMPLE_RATE
from finetuning.preparation.audio import resample
from finetuning.preparation.recordings import Segment
from finetuning.preparation.sources import SourceError

logger = logging.getLogger(__name__)

SIDECAR_EXTENSIONS = (".srt", ".vtt")
NO_LANGUAGE = ("", "auto")  # manifest labels under which the ASR model detects the language itself
_MARKUP = re.compile(r"<[^>]+>|\{\\[^}]*\}")  # <i>, <v Speaker>, {\an8}


def find_sidecar(recording: Path) -> Path | None:
    """``<recording stem>.srt`` or ``.vtt`` beside the recording (srt first), or None."""
    return next((p for ext in SIDECAR_EXTENSIONS if (p := recording.with_suffix(ext)).is_file()), None)


def read_sidecar(path: Path) -> list[Segment]:
    """The cues of an .srt or .vtt file as segments with their texts, in file order; cues without text are
    skipped. Raises SourceError naming the file when it cannot be parsed."""
    import webvtt

    try:
        captions = webvtt.from_srt(str(path)) if path.suffix.lower() == ".srt" else webvtt.read(str(path))
    except Exception as error:  # webvtt raises its own MalformedFileError, and UnicodeDecodeError on bad bytes
        raise SourceError(f"cannot read the subtitles {path}: {type(error).__name__}: {error}") from error
    segments = []
    for caption in captions:
        text = " ".join(_MARKUP.sub("", caption.raw_text).split())
        if text:
            # start_in_seconds is whole seconds; the timestamps keep the milliseconds
            start_s, end_s = caption.start_time.in_milliseconds() / 1000, caption.end_time.in_milliseconds() / 1000
            segments.append(Segment(start_s, end_s, text))
    return segments


@dataclass
class Transcriber:
    """A transformers ASR model (Whisper or CTC) loaded once from ``model_id`` (Hub id or folder)."""

    model_id: str
    device: str = "cpu"
    batch_size: int = 8
    token: str | None = None
    max_new_tokens: int = 128

    def __post_init__(self) -> None:
        import transformers

        try:
            config = transformers.AutoConfig.from_pretrained(self.model_id, token=self.token or None)
            self._processor = transformers.AutoProcessor.from_pretrained(self.model_id, token=self.token or None)
            self._is_whisper = config.model_type == "whisper"
            model_class = transformers.AutoModelForSpeechSeq2Seq if self._is_whisper else transformers.AutoModelForCTC
            self._model = model_class.from_pretrained(self.model_id, token=self.token or None).to(self.device).eval()
        except (OSError, ValueError) as error:
            raise SourceError(f"ASR_MODEL={self.model_id} cannot be loaded: {error}") from error
        self._sample_rate = int(self._processor.feature_extractor.sampling_rate)
        self._adapter: str | None = None  # the language adapter an MMS-style model has loaded

    def transcribe(self, clips: list[np.ndarray], language: str | None, desc: str = "") -> list[tuple[str, float]]:
        """(text, confidence) for each 24 kHz mono clip, in order, ``batch_size`` clips per model call.
        ``language`` (a name or code the model knows, e.g. ``english``/``en``) is forced on Whisper; ``auto``
        or None lets it detect. Raises SourceError for a language the model does not know."""
        results: list[tuple[str, float]] = []
        with tqdm(total=len(clips), desc=desc or "transcribe", unit="clip", disable=not clips) as bar:
            for start in range(0, len(clips), self.batch_size):
                batch = [
                    resample(clip, SAMPLE_RATE, self._sample_rate) for clip in clips[start : start + self.batch_size]
                ]
                results.extend(self._whisper(batch, language) if self._is_whisper else self._ctc(batch, language))
                bar.update(len(batch))
        return results

    def _whisper(self, batch: list[np.ndarray], language: str | None) -> list[tuple[str, float]]:
        import torch

        features = self._processor(batch, sampling_rate=self._sample_rate, return_tensors="pt").input_features
        forced = {} if (language or "").lower() in NO_LANGUAGE else {"language": language.lower()}
        limit = self._model.config.max_target_positions // 2  # room for the forced prompt tokens
        try:
            with torch.inference_mode():
                out = self._model.generate(
                    features.to(self.device, self._model.dtype),
                    task="transcribe",
                    max_new_tokens=min(self.max_new_tokens, limit),
                    return_dict_in_generate=True,
                    output_scores=True,
                    **forced,
                )
        except ValueError as error:  # an unsupported language is reported as ValueError by Whisper's generate
            raise SourceError(f"ASR_MODEL={self.model_id} cannot transcribe language {language!r}: {error}") from None
        # scores: one (batch, vocab) tensor per generated step; greedy decoding chose each step's argmax
        log_probs = torch.stack([torch.log_softmax(step.float(), dim=-1) for step in out.scores], dim=1)
        chosen_log_probs, chosen = log_probs.max(dim=-1)  # (batch, steps)
        eos = self._model.generation_config.eos_token_id
        results = []
        for row in range(len(batch)):
            tokens = chosen[row].tolist()
            steps = tokens.index(eos) + 1 if eos in tokens else len(tokens)
            confidence = float(torch.exp(chosen_log_probs[row, :steps].mean())) if steps else 0.0
            text = self._processor.tokenizer.decode(tokens[:steps], skip_special_tokens=True)
            results.append((" ".join(text.split()), confidence))
        return results

    def _use_adapter(self, language: str | None) -> None:
        """MMS-style CTC models carry one adapter and vocabulary per language (ISO 639-3): switch to the label's,
        tried as written, then as its ISO 639-3 code (``english`` -> ``eng``). Models without adapters, and
        ``auto``, keep what they have. Raises SourceError when no candidate loads."""
        if not getattr(self._model.config, "adapter_attn_dim", None) or (language or "").lower() in NO_LANGUAGE:
            return
        import pycountry

        try:
            iso = pycountry.languages.lookup(language).alpha_3
        except LookupError:
            iso = None
        candidates = list(dict.fromkeys(c for c in (language.lower(), iso) if c))
        if self._adapter in candidates:
            return
        for code in candidates:
            try:
                self._processor.tokenizer.set_target_lang(code)
                self._model.load_adapter(code)
            except (OSError, ValueError):
                continue
            self._adapter = code
            return
        raise SourceError(
            f"ASR_MODEL={self.model_id} has no adapter for language {language!r} (tried {candidates}); write the "
            "model's ISO 639-3 code as the speaker's \"language\""
        )

    def _ctc(self, batch: list[np.ndarray], language: str | None) -> list[tuple[str, float]]:
        import torch

        self._use_adapter(language)
        inputs = self._processor(batch, sampling_rate=self._sample_rate, return_tensors="pt", padding=True)
        mask = inputs.get("attention_mask")  # models with layer-norm features (MMS) take one; group-norm ones not
        with torch.inference_mode():
            logits = self._model(
                inputs.input_values.to(self.device), attention_mask=None if mask is None else mask.to(self.device)
            ).logits.float()  # (batch, frames, vocab)
        log_probs = torch.log_softmax(logits, dim=-1)
        best_log_probs, best = log_probs.max(dim=-1)  # (batch, frames)
        blank = self._processor.tokenizer.pad_token_id
        frames_per_sample = logits.shape[1] / inputs.input_values.shape[1]
        results = []
        for row, clip in enumerate(batch):
            frames = max(1, int(len(clip) * frames_per_sample))
            spoken = best[row, :frames] != blank
            confidence = float(torch.exp(best_log_probs[row, :frames][spoken].mean())) if spoken.any() else 0.0
            text = self._processor.batch_decode(best[row : row + 1, :frames])[0]
            results.append((" ".join(text.split()), confidence))
        return results
