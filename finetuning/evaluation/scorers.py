"""Scoring models for evaluation: speaker encoders, speech recognisers and a naturalness (MOS) predictor, loaded
once and passed to the metrics.

Every backend has a ``name`` that goes into reports next to each number it produced, and a ``skipped`` dict
that ``load_*_backend("auto")`` fills with the backends it tried first and why they could not load. A backend
that cannot load raises ``BackendUnavailable`` with the reason; nothing is replaced silently.

Weights come from a local folder or the local Hugging Face cache. Downloads from the Hub happen only with
``allow_download=True``; without it a missing model fails at once instead of retrying an unreachable host.

Heavy libraries (torch, speechbrain, transformers, resemblyzer, pocketsphinx, speechmos) are imported when a
backend is built, never at module import.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from finetuning.preparation.audio import resample
from finetuning.resources import ModelUnavailable, resolve_device, resolve_model_dir
from finetuning.settings import Settings

SPEAKER_BACKENDS = ("auto", "ecapa", "resemblyzer")
ASR_BACKENDS = ("auto", "transformers", "pocketsphinx")
NATURALNESS_BACKENDS = ("auto", "dnsmos", "none")
DNSMOS_SAMPLE_RATE = 16_000
ASR_CHUNK_S = 30.0  # longer clips are transcribed in chunks of this length (Whisper's window)
ECAPA_HUB_ID = "speechbrain/spkrec-ecapa-voxceleb"
ECAPA_SAMPLE_RATE = 16_000
POCKETSPHINX_SAMPLE_RATE = 16_000
PCM16_SCALE = 32767.0
PITCH_SCORER = "librosa-pyin+mfcc-dtw"  # metrics.analyse_clip features, DTW-aligned to the real clip
PERPLEXITY_SCORER = "teacher-forced talker of the evaluated model"
EOS_SCORER = "duration rule: max_new_tokens reached, or < 0.5x / > 2x the text at the speaker's rate"


class BackendUnavailable(RuntimeError):
    """A scoring backend cannot be loaded here; ``reason`` says why (missing weights, package, ...)."""

    def __init__(self, backend: str, reason: str):
        super().__init__(f"{backend} unavailable: {reason}")
        self.backend = backend
        self.reason = reason


class SpeakerEncoder(Protocol):
    name: str
    skipped: dict[str, str]

    def embed(self, audio: np.ndarray, sample_rate: int) -> np.ndarray:
        """(samples,) float32 mono -> (dim,) float32 embedding with unit L2 norm."""
        ...


class NaturalnessScorer(Protocol):
    name: str
    skipped: dict[str, str]

    def score(self, audio: np.ndarray, sample_rate: int) -> float:
        """(samples,) float32 mono -> predicted mean opinion score, 1 (bad) to 5 (excellent)."""
        ...


class SpeechRecognizer(Protocol):
    name: str
    skipped: dict[str, str]
    languages: tuple[str, ...] | None  # None: any language the model knows

    def transcribe(self, audio: np.ndarray, sample_rate: int, language: str | None = None) -> str:
        """(samples,) float32 mono -> raw transcript (not normalised)."""
        ...


def _model_dir(backend: str, source: str | Path, allow_download: bool, token: str | None) -> Path:
    """``resources.resolve_model_dir``, offline unless ``allow_download``; a failure makes the backend unavailable."""
    try:
        return resolve_model_dir(source, token=token, allow_download=allow_download)
    except ModelUnavailable as error:
        raise BackendUnavailable(backend, str(error)) from error


@contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    """Run torch CPU ops on ``count`` intra-op threads, restoring the previous count afterwards."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _unit(vector: np.ndarray) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float32).reshape(-1)
    norm = float(np.linalg.norm(vector))
    if norm == 0.0:
        raise ValueError("speaker embedding is all zeros (no speech found?)")
    return vector / norm


@dataclass
class ResemblyzerEncoder:
    """GE2E speaker encoder from the ``resemblyzer`` wheel (weights ship inside it): 256-d, 16 kHz, offline."""

    device: str = "cpu"
    name: str = field(default="resemblyzer-ge2e", init=False)
    skipped: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            with warnings.catch_warnings():  # it imports a deprecated scipy.ndimage path
                warnings.simplefilter("ignore", DeprecationWarning)
                from resemblyzer import VoiceEncoder
        except ImportError as error:
            raise BackendUnavailable("resemblyzer", f"{error}; install the `eval` extra") from error
        self._encoder = VoiceEncoder(device=self.device, verbose=False)

    def embed(self, audio: np.ndarray, sample_rate: int) -> np.ndarray:
        from resemblyzer import preprocess_wav

        # Resamples to 16 kHz, normalises loudness and cuts long silences (webrtcvad) before embedding.
        wav = preprocess_wav(np.asarray(audio, dtype=np.float32), source_sr=sample_rate)
        if wav.size == 0:
            raise ValueError("resemblyzer found no speech in the clip")
        # The GE2E LSTM runs hundreds of tiny steps: extra intra-op threads buy nothing, and on a busy CPU their
        # barrier waits made one clip take seconds instead of ~0.1 s.
        with _torch_threads(1):
            return _unit(self._encoder.embed_utterance(wav))


@dataclass
class EcapaEncoder:
    """speechbrain ECAPA-TDNN speaker encoder (192-d, 16 kHz) from a local folder or the HF cache.

    ``source`` is a folder laid out like the Hub repo ``speechbrain/spkrec-ecapa-voxceleb`` (hyperparams.yaml,
    embedding_model.ckpt, ...) or that repo id. Files are read in place; nothing is written next to the caller.
    """

    source: str = ECAPA_HUB_ID
    device: str = "cpu"
    allow_download: bool = False
    token: str | None = None
    skipped: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        model_dir = _model_dir("ecapa", self.source, self.allow_download, self.token)
        try:
            from speechbrain.inference.speaker import EncoderClassifier
        except ImportError as error:
            raise BackendUnavailable("ecapa", f"{error}; install speechbrain") from error
        try:
            # savedir=None makes speechbrain use the files where they are instead of linking them into ./
            self._model = EncoderClassifier.from_hparams(
                source=str(model_dir),
                savedir=None,
                overrides={"pretrained_path": str(model_dir)},
                run_opts={"device": self.device},
            )
        except Exception as error:  # yaml, checkpoint and missing-file errors come as several types
            raise BackendUnavailable("ecapa", f"cannot load {model_dir}: {type(error).__name__}: {error}") from error
        self._model.eval()

    @property
    def name(self) -> str:
        return f"speechbrain-ecapa:{self.source}"

    def embed(self, audio: np.ndarray, sample_rate: int) -> np.ndarray:
        import torch

        wav = resample(np.asarray(audio, dtype=np.float32), sample_rate, ECAPA_SAMPLE_RATE)
        with torch.inference_mode():
            embedding = self._model.encode_batch(torch.from_numpy(wav)[None])  # (1, 1, dim)
        return _unit(embedding.float().cpu().numpy())


@dataclass
class PocketsphinxRecognizer:
    """CMU PocketSphinx with the US-English acoustic and language model that ship in its wheel; offline, weak."""

    name: str = field(default="pocketsphinx-en-us", init=False)
    languages: tuple[str, ...] | None = field(default=("english",), init=False)
    skipped: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            from pocketsphinx import Decoder
        except ImportError as error:
            raise BackendUnavailable("pocketsphinx", f"{error}; install the `eval` extra") from error
        self._decoder = Decoder(samprate=POCKETSPHINX_SAMPLE_RATE, loglevel="FATAL")

    def transcribe(self, audio: np.ndarray, sample_rate: int, language: str | None = None) -> str:
        if language is not None and language not in self.languages:
            raise ValueError(f"{self.name} recognises only {self.languages}, not {language!r}")
        wav = resample(np.asarray(audio, dtype=np.float32), sample_rate, POCKETSPHINX_SAMPLE_RATE)
        pcm = np.round(np.clip(wav, -1.0, 1.0) * PCM16_SCALE).astype("<i2").tobytes()
        # Feature extraction (its live cepstral mean above all) carries state from clip to clip; resetting it
        # scores every clip as a freshly loaded decoder would, whatever was scored before (set_cmn is not enough).
        self._decoder.reinit_feat()
        self._decoder.start_utt()
        self._decoder.process_raw(pcm, full_utt=True)
        self._decoder.end_utt()
        hypothesis = self._decoder.hyp()
        return hypothesis.hypstr if hypothesis is not None else ""


@dataclass
class TransformersRecognizer:
    """A transformers ``automatic-speech-recognition`` pipeline (Whisper, wav2vec2 CTC, ...) by repo id or folder."""

    model_id: str
    device: str = "cpu"
    allow_download: bool = False
    token: str | None = None
    languages: tuple[str, ...] | None = None
    skipped: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        model_dir = _model_dir("transformers", self.model_id, self.allow_download, self.token)
        try:
            from transformers import pipeline

            self._pipe = pipeline("automatic-speech-recognition", model=str(model_dir), device=self.device)
        except Exception as error:  # missing files, unknown architectures, import errors
            raise BackendUnavailable(
                "transformers", f"cannot load {model_dir}: {type(error).__name__}: {error}"
            ) from error
        self._sample_rate = int(self._pipe.feature_extractor.sampling_rate)
        self._is_whisper = getattr(self._pipe.model.config, "model_type", "") == "whisper"

    @property
    def name(self) -> str:
        return f"transformers:{self.model_id}"

    def transcribe(self, audio: np.ndarray, sample_rate: int, language: str | None = None) -> str:
        wav = resample(np.asarray(audio, dtype=np.float32), sample_rate, self._sample_rate)
        kwargs = (
            {"generate_kwargs": {"language": language, "task": "transcribe"}} if self._is_whisper and language else {}
        )
        if wav.size > ASR_CHUNK_S * self._sample_rate:  # beyond one window: chunked with overlapping strides
            kwargs["chunk_length_s"] = ASR_CHUNK_S
        result = self._pipe({"raw": wav, "sampling_rate": self._sample_rate}, **kwargs)
        return str(result["text"]).strip()


@dataclass
class DnsmosScorer:
    """Microsoft's DNSMOS P.835 overall-quality predictor, from the ONNX models inside the ``speechmos`` wheel
    (offline). Input is resampled to 16 kHz and clipped to [-1, 1]; clips shorter than 9 s are repeated to 9 s by
    DNSMOS itself. A reference-free quality estimate: it scores noise, distortion and artefacts, not whether the
    right words or voice came out."""

    skipped: dict[str, str] = field(default_factory=dict)
    name: str = "speechmos-dnsmos-p835-ovrl"

    def __post_init__(self) -> None:
        try:
            import speechmos
            from speechmos.dnsmos import DNSMOS
        except ImportError as error:
            raise BackendUnavailable("dnsmos", f"{error}; install the eval extra (`uv sync --extra eval`)") from error
        models = Path(speechmos.__file__).parent / "dnsmos_models"
        self._model = DNSMOS(str(models / "sig_bak_ovr.onnx"), str(models / "model_v8.onnx"))

    def score(self, audio: np.ndarray, sample_rate: int) -> float:
        wav = np.clip(resample(np.asarray(audio, dtype=np.float32), sample_rate, DNSMOS_SAMPLE_RATE), -1.0, 1.0)
        if not np.any(wav):
            raise ValueError("cannot rate a silent clip")
        return float(self._model(wav, DNSMOS_SAMPLE_RATE, False)["ovrl_mos"])


def load_naturalness_backend(name: str = "auto") -> NaturalnessScorer | None:
    """ "dnsmos", "auto" (DNSMOS, the one offline predictor) or "none" (returns None: naturalness not scored).
    Raises BackendUnavailable when it cannot load, ValueError for an unknown name."""
    if name == "none":
        return None
    return _load(name, {"dnsmos": DnsmosScorer}, NATURALNESS_BACKENDS)


def load_speaker_backend(
    name: str = "auto",
    ecapa_source: str | Path | None = None,
    device: str = "cpu",
    allow_download: bool = False,
    token: str | None = None,
) -> SpeakerEncoder:
    """Load a speaker encoder: "ecapa", "resemblyzer", or "auto" (ECAPA if it loads, else resemblyzer).

    ``ecapa_source`` is a local folder or Hub repo id (default ``speechbrain/spkrec-ecapa-voxceleb``). With "auto"
    the returned backend's ``skipped`` maps each backend tried before it to the reason it could not load.
    Raises BackendUnavailable when the named backend (or, for "auto", every backend) cannot load, and ValueError
    for an unknown name.
    """
    source = str(ecapa_source) if ecapa_source else ECAPA_HUB_ID
    builders = {
        "ecapa": lambda: EcapaEncoder(source, device=device, allow_download=allow_download, token=token),
        "resemblyzer": lambda: ResemblyzerEncoder(device=device),
    }
    return _load(name, builders, SPEAKER_BACKENDS)


def load_asr_backend(
    name: str = "auto",
    model_id: str | Path | None = None,
    device: str = "cpu",
    allow_download: bool = False,
    token: str | None = None,
) -> SpeechRecognizer:
    """Load a speech recogniser: "transformers" (needs ``model_id``), "pocketsphinx", or "auto" (in that order).

    ``model_id`` is a Hub repo id (e.g. ``openai/whisper-small``) or a local folder. With "auto" and no
    ``model_id`` the transformers backend is recorded in ``skipped`` as not configured. Raises BackendUnavailable
    when the named backend (or, for "auto", every backend) cannot load, and ValueError for an unknown name or a
    transformers request without ``model_id``.
    """
    if name == "transformers" and not model_id:
        raise ValueError("ASR backend 'transformers' needs a model id or folder (ASR_MODEL)")

    def transformers_backend() -> SpeechRecognizer:
        if not model_id:
            raise BackendUnavailable("transformers", "no model id given (ASR_MODEL is empty)")
        return TransformersRecognizer(str(model_id), device=device, allow_download=allow_download, token=token)

    builders = {"transformers": transformers_backend, "pocketsphinx": PocketsphinxRecognizer}
    return _load(name, builders, ASR_BACKENDS)


def _load(name: str, builders: dict, allowed: tuple[str, ...]):
    if name not in allowed:
        raise ValueError(f"unknown scoring backend {name!r}; one of: {', '.join(allowed)}")
    if name != "auto":
        return builders[name]()
    skipped: dict[str, str] = {}
    for candidate, build in builders.items():
        try:
            backend = build()
        except BackendUnavailable as error:
            skipped[candidate] = error.reason
            continue
        backend.skipped = skipped
        return backend
    raise BackendUnavailable("auto", "; ".join(f"{key}: {reason}" for key, reason in skipped.items()))


@dataclass
class Scorers:
    """Scoring models loaded once; ``unavailable`` maps a metric group to why its scorer could not load."""

    speaker: SpeakerEncoder | None
    asr: SpeechRecognizer | None
    naturalness: NaturalnessScorer | None = None
    unavailable: dict[str, str] = field(default_factory=dict)

    def describe(self) -> dict[str, dict]:
        """{group: {"backend": name or None, "skipped": {backend: reason}, "unavailable": reason}}."""
        out = {"perplexity": {"backend": PERPLEXITY_SCORER}}
        groups = (("speaker_similarity", self.speaker), ("pronunciation", self.asr), ("naturalness", self.naturalness))
        for group, backend in groups:
            if backend is None:
                out[group] = {"backend": None, "unavailable": self.unavailable.get(group, "not loaded")}
            else:
                out[group] = {"backend": backend.name, "skipped": dict(backend.skipped)}
        if self.asr is not None:
            out["pronunciation"]["languages"] = list(self.asr.languages) if self.asr.languages else "any"
        out["end_of_speech"] = {"backend": EOS_SCORER}
        out["tone"] = {"backend": PITCH_SCORER}
        out["prosody"] = {"backend": PITCH_SCORER}
        return out


def load_scorers(settings: Settings) -> Scorers:
    """Speaker encoder (SPEAKER_SIM_BACKEND, ECAPA_SOURCE), recogniser (ASR_BACKEND, ASR_MODEL) and naturalness
    predictor (NATURALNESS_BACKEND) per settings.

    Weights come from local folders or the HF cache unless SCORER_ALLOW_DOWNLOAD. A backend that cannot load is
    recorded in ``unavailable`` with the reason; its metrics are then reported as unavailable, not computed with
    another backend ("auto" lists what it tried first in the loaded backend's ``skipped``).
    """
    device = resolve_device(settings.DEVICE)
    common = {"device": device, "allow_download": settings.SCORER_ALLOW_DOWNLOAD, "token": settings.HF_TOKEN or None}
    scorers = Scorers(speaker=None, asr=None)
    try:
        scorers.speaker = load_speaker_backend(settings.SPEAKER_SIM_BACKEND, settings.ECAPA_SOURCE, **common)
    except BackendUnavailable as error:
        scorers.unavailable["speaker_similarity"] = str(error)
    try:
        scorers.asr = load_asr_backend(settings.ASR_BACKEND, settings.ASR_MODEL or None, **common)
    except (BackendUnavailable, ValueError) as error:
        scorers.unavailable["pronunciation"] = str(error)
    try:
        scorers.naturalness = load_naturalness_backend(settings.NATURALNESS_BACKEND)
        if scorers.naturalness is None:
            scorers.unavailable["naturalness"] = "turned off (NATURALNESS_BACKEND=none)"
    except BackendUnavailable as error:
        scorers.unavailable["naturalness"] = str(error)
    return scorers
