"""Evaluation metrics: pure functions from audio (or token scores) to floats.

Audio is a 1-D float32 numpy array in [-1, 1] with its sample rate. Scoring models (speaker encoders, speech
recognisers) come from ``finetuning.evaluation.scorers`` and are passed in; nothing here loads a model or keeps state.

| metric                         | range        | better      |
|--------------------------------|--------------|-------------|
| speaker_similarity             | [-1, 1]      | higher      |
| wer / cer                      | [0, inf)     | lower       |
| tone_f0_corr                   | [-1, 1]      | higher      |
| tone_f0_rmse_st                | [0, inf) st  | lower       |
| tone_voicing_agreement         | [0, 1]       | higher      |
| f0_median_diff_st              | (-inf, inf)  | closer to 0 |
| f0_range_diff_st               | (-inf, inf)  | closer to 0 |
| energy_corr                    | [-1, 1]      | higher      |
| syllable_rate_ratio            | (0, inf)     | closer to 1 |
| duration_ratio                 | (0, inf)     | closer to 1 |
| pause_fraction_diff            | [-1, 1]      | closer to 0 |
| perplexity                     | [1, inf)     | lower       |
| naturalness                    | [1, 5]       | higher      |
| eos_failure_rate               | [0, 1]       | lower       |

Pitch and prosody work on a ``ClipAnalysis`` made once per clip by ``analyse_clip`` (pYIN F0, frame energy,
MFCCs on a 10 ms grid at 16 kHz), so a reference analysed once serves every generated clip compared with it.
Clip pairs are aligned by dynamic time warping on MFCCs (what is said), not on F0: warping on pitch itself would
bend any two contours into agreement. A value that cannot be computed (no voiced frames, a constant contour) is
NaN, never a made-up number.
``eos_failure_rate`` (generations that do not end where speech should) is computed in ``end_of_speech``.
"""

from __future__ import annotations

import math
import tempfile
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from finetuning.preparation.audio import resample

if TYPE_CHECKING:
    import torch

    from finetuning.evaluation.scorers import SpeakerEncoder, SpeechRecognizer

ANALYSIS_SAMPLE_RATE = 16_000
HOP_LENGTH = 160  # 10 ms frames at ANALYSIS_SAMPLE_RATE
PITCH_FRAME_LENGTH = 1024  # 64 ms: two periods of the lowest F0
ENERGY_FRAME_LENGTH = 400  # 25 ms
MFCC_N_FFT = 512
N_MFCC = 20  # c0 (loudness) is dropped before alignment
F0_MIN_HZ = 60.0
F0_MAX_HZ = 500.0
SILENCE_DB = 35.0  # frames this far below the clip's loudest frame are silence
MIN_PAUSE_S = 0.1  # shorter gaps are stop closures, not pauses
SYLLABLE_PROMINENCE_DB = 2.0  # an energy peak must stand this far above its surroundings to count as a syllable
SYLLABLE_MIN_GAP_S = 0.05
ENVELOPE_SMOOTH_FRAMES = 3
F0_RANGE_PERCENTILES = (5.0, 95.0)
KERNEL_LOCK_NAME = "finetuning-numba-kernels.lock"  # in the temporary folder, shared by every process on the machine
MIN_FRAMES_FOR_CORRELATION = 10
SEMITONES_PER_OCTAVE = 12.0


# --------------------------------------------------------------------------------------------- speaker --


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of the angle between two (dim,) vectors, in [-1, 1]; higher means more alike."""
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def speaker_similarity(
    encoder: SpeakerEncoder, generated: np.ndarray, references: Sequence[np.ndarray], sample_rate: int
) -> float:
    """Mean cosine similarity between the generated clip's speaker embedding and each reference clip's.

    All clips are mono float32 at ``sample_rate``. Range [-1, 1], higher is better (same voice). Scale depends on
    the encoder (resemblyzer-ge2e: same espeak voice ~0.87-0.89, male vs female ~0.63-0.67), so only compare
    numbers from one ``encoder.name``. Raises ValueError without references.
    """
    if not references:
        raise ValueError("speaker_similarity needs at least one reference clip")
    target = encoder.embed(generated, sample_rate)
    return float(np.mean([cosine_similarity(target, encoder.embed(ref, sample_rate)) for ref in references]))


# ------------------------------------------------------------------------------------- pronunciation --

APOSTROPHES = {"\u2019": "'", "\u02bc": "'"}  # typographic and modifier-letter apostrophes
DROPPED_CATEGORIES = "PSZC"  # Unicode punctuation, symbols, separators, controls


@lru_cache(maxsize=1)
def _english_normalizer():
    """Whisper's English normaliser as transformers ships it (numbers to digits, contractions expanded, titles
    spelled out); the British-to-American spelling table is a tokenizer file that is not bundled, so it is empty."""
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    return EnglishTextNormalizer({})


def normalize_text(text: str, language: str | None = None) -> str:
    """Canonical form for error rates: Unicode NFKC, lowercase (Unicode casefold), punctuation and symbols
    removed, whitespace runs collapsed to one space, ends stripped.

    Letters, combining marks and digits of every script are kept (so "Xin chào" and Devanagari words survive);
    apostrophes inside words stay ("don't"), quotes around words go. Example: ' "Hello,  WORLD!" ' -> 'hello world'.
    For ``language="english"`` Whisper's English normaliser runs first, as Whisper evaluations score English:
    "It's 1998." and "it is nineteen ninety eight" both become 'it is 1998'.
    """
    if language is not None and language.lower() in ("english", "en"):
        text = _english_normalizer()(text)
    text = unicodedata.normalize("NFKC", text).casefold()
    for typographic, plain in APOSTROPHES.items():
        text = text.replace(typographic, plain)
    kept = "".join(
        char if char == "'" or unicodedata.category(char)[0] not in DROPPED_CATEGORIES else " " for char in text
    )
    words = (word.strip("'") for word in kept.split())
    return " ".join(word for word in words if word)


def _error_rate(reference: str, hypothesis: str, unit: str, language: str | None) -> float:
    import jiwer

    ref, hyp = normalize_text(reference, language), normalize_text(hypothesis, language)
    if not ref:
        raise ValueError(f"reference transcript {reference!r} is empty after normalisation")
    return float(jiwer.wer(ref, hyp) if unit == "word" else jiwer.cer(ref, hyp))


def wer(reference: str, hypothesis: str, language: str | None = None) -> float:
    """Word error rate of ``hypothesis`` against ``reference`` after ``normalize_text`` (in ``language``):
    (S + D + I) / N words.

    Range [0, inf) (insertions can push it past 1), lower is better, 0 for identical normalised strings. Words are
    split on spaces, so for scripts written without them (Chinese, Japanese, Thai) use ``cer``. Raises ValueError
    when the reference is empty after normalisation.
    """
    return _error_rate(reference, hypothesis, "word", language)


def cer(reference: str, hypothesis: str, language: str | None = None) -> float:
    """Character error rate after ``normalize_text`` (spaces count as characters); range [0, inf), lower is better."""
    return _error_rate(reference, hypothesis, "char", language)


@dataclass(frozen=True)
class PronunciationScore:
    """ASR error rates of one clip against its text; ``transcript`` is the recogniser's raw output."""

    wer: float
    cer: float
    transcript: str


def pronunciation_score(
    recognizer: SpeechRecognizer, audio: np.ndarray, sample_rate: int, text: str, language: str | None = None
) -> PronunciationScore:
    """Transcribe ``audio`` and score it against ``text`` (WER and CER, lower is better).

    Intelligibility to one recogniser, not an absolute measure: the recogniser's own errors add to every number
    (pocketsphinx-en-us has WER ~0.8 on clean espeak-ng speech), so compare numbers from one ``recognizer.name``.
    """
    transcript = recognizer.transcribe(audio, sample_rate, language=language)
    return PronunciationScore(
        wer=wer(text, transcript, language), cer=cer(text, transcript, language), transcript=transcript
    )


# ---------------------------------------------------------------------------------- pitch and prosody --


@dataclass(frozen=True)
class ClipAnalysis:
    """Frame-level features of one clip on a 10 ms grid (F frames); made by ``analyse_clip``.

    f0_hz: (F,) fundamental frequency in Hz, NaN where unvoiced.
    energy_db: (F,) frame RMS in dB relative to the clip's loudest frame (<= 0).
    content: (N_MFCC - 1, F) MFCCs without c0, each coefficient standardised over the clip (alignment only).
    """

    f0_hz: np.ndarray
    energy_db: np.ndarray
    content: np.ndarray
    hop_s: float = HOP_LENGTH / ANALYSIS_SAMPLE_RATE

    @property
    def voiced(self) -> np.ndarray:
        return ~np.isnan(self.f0_hz)

    @property
    def speech(self) -> np.ndarray:
        return self.energy_db > -SILENCE_DB

    def semitones(self) -> np.ndarray:
        """(F,) F0 in semitones relative to the clip's median voiced F0 (speaker-normalised), NaN where unvoiced."""
        if not self.voiced.any():
            return np.full_like(self.f0_hz, np.nan)
        return SEMITONES_PER_OCTAVE * np.log2(self.f0_hz / np.median(self.f0_hz[self.voiced]))


def analyse_clip(audio: np.ndarray, sample_rate: int) -> ClipAnalysis:
    """F0 (librosa pYIN, 60-500 Hz), frame energy and MFCCs of a mono clip, resampled to 16 kHz first.

    Costs about 0.2 s of CPU per second of audio (pYIN dominates). Raises ValueError for an all-zero clip.
    """
    import librosa

    compile_kernels()
    wav = resample(np.asarray(audio, dtype=np.float32), sample_rate, ANALYSIS_SAMPLE_RATE)
    if not np.any(wav):
        raise ValueError("cannot analyse a silent clip")
    f0, voiced, _ = librosa.pyin(
        wav,
        fmin=F0_MIN_HZ,
        fmax=F0_MAX_HZ,
        sr=ANALYSIS_SAMPLE_RATE,
        frame_length=PITCH_FRAME_LENGTH,
        hop_length=HOP_LENGTH,
    )
    rms = librosa.feature.rms(y=wav, frame_length=ENERGY_FRAME_LENGTH, hop_length=HOP_LENGTH)[0]
    energy_db = 20.0 * np.log10(np.maximum(rms, 1e-10) / rms.max())
    mfcc = librosa.feature.mfcc(y=wav, sr=ANALYSIS_SAMPLE_RATE, n_mfcc=N_MFCC, n_fft=MFCC_N_FFT, hop_length=HOP_LENGTH)
    mfcc = mfcc[1:]  # (N_MFCC - 1, F): c0 is loudness, which alignment should ignore
    mfcc = (mfcc - mfcc.mean(axis=1, keepdims=True)) / (mfcc.std(axis=1, keepdims=True) + 1e-8)
    frames = min(len(f0), len(energy_db), mfcc.shape[1])  # all centred on the same hop; guard off-by-one
    f0_hz = np.where(voiced[:frames], f0[:frames], np.nan)
    return ClipAnalysis(f0_hz=f0_hz, energy_db=energy_db[:frames], content=mfcc[:, :frames])


@cache
def compile_kernels() -> None:
    """Load librosa's numba kernels that the metrics use (pYIN, DTW), compiling them into numba's on-disk cache
    under a machine-wide file lock; once per process, before the first analysis.

    Two processes that compile a cached ``guvectorize`` kernel at the same time can leave a cache whose files come
    from different processes; every later load of it crashes with a segmentation fault (numba issue 10128). The
    lock makes the first compile on a fresh install happen in one process; the others then read its cache.
    """
    import librosa
    from filelock import FileLock

    tone = np.sin(2 * np.pi * 150.0 * np.arange(ANALYSIS_SAMPLE_RATE // 4) / ANALYSIS_SAMPLE_RATE).astype(np.float32)
    with FileLock(Path(tempfile.gettempdir()) / KERNEL_LOCK_NAME):
        librosa.pyin(
            tone,
            fmin=F0_MIN_HZ,
            fmax=F0_MAX_HZ,
            sr=ANALYSIS_SAMPLE_RATE,
            frame_length=PITCH_FRAME_LENGTH,
            hop_length=HOP_LENGTH,
        )
        features = np.random.default_rng(0).standard_normal((4, 8))
        librosa.sequence.dtw(X=features, Y=features, metric="euclidean")


def align(generated: ClipAnalysis, reference: ClipAnalysis) -> tuple[np.ndarray, np.ndarray]:
    """DTW path over content features: (P,) frame indices into generated and reference, in time order.

    Time and memory grow with F_generated x F_reference frames: fine for utterances (30 s pairs take ~70 MB).
    """
    import librosa

    compile_kernels()
    _, path = librosa.sequence.dtw(X=generated.content, Y=reference.content, metric="euclidean")
    path = path[::-1]
    return path[:, 0], path[:, 1]


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator and np.isfinite(denominator) else float("nan")


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < MIN_FRAMES_FOR_CORRELATION or np.std(x) == 0 or np.std(y) == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def tone_similarity(generated: ClipAnalysis, reference: ClipAnalysis) -> dict[str, float]:
    """Agreement of speaker-normalised pitch contours of two clips of the same text (lexical tone, intonation).

    Each contour is in semitones relative to its own clip's median voiced F0, so a female and a male voice saying
    the same tones agree. Frames are paired along the MFCC DTW path; F0 is compared where both frames are voiced.

    tone_f0_corr: Pearson correlation of paired semitone values, [-1, 1], higher is better (same tone sequence
        in a male and a female espeak-ng voice ~0.97; the same syllables with the tones reversed ~0.35).
    tone_f0_rmse_st: root-mean-square difference of paired values in semitones, [0, inf), lower is better.
    tone_voicing_agreement: share of path pairs whose voiced/unvoiced decisions agree, [0, 1], higher is better.
    """
    gen_idx, ref_idx = align(generated, reference)
    gen_st, ref_st = generated.semitones()[gen_idx], reference.semitones()[ref_idx]
    both = ~np.isnan(gen_st) & ~np.isnan(ref_st)
    diff = gen_st[both] - ref_st[both]
    return {
        "tone_f0_corr": _pearson(gen_st[both], ref_st[both]),
        "tone_f0_rmse_st": float(np.sqrt(np.mean(diff**2))) if both.any() else float("nan"),
        "tone_voicing_agreement": float(np.mean(generated.voiced[gen_idx] == reference.voiced[ref_idx])),
    }


def prosody_stats(clip: ClipAnalysis) -> dict[str, float]:
    """Prosodic summary of one clip.

    f0_median_hz: median F0 over voiced frames (NaN if none).
    f0_range_st: spread of F0, 95th minus 5th percentile of the speaker-normalised contour, in semitones.
    speech_duration_s: time spent in non-silent frames (louder than -35 dB re the loudest frame).
    syllable_rate_hz: syllable nuclei (energy peaks >= 2 dB prominent, >= 50 ms apart) per second of speech.
    pause_fraction: share of the time between the first and last speech frame spent in silences >= 0.1 s.
    """
    from scipy.signal import find_peaks

    semitones = clip.semitones()[clip.voiced]
    low, high = np.percentile(semitones, F0_RANGE_PERCENTILES) if semitones.size else (np.nan, np.nan)
    speech = clip.speech
    speech_duration_s = float(speech.sum() * clip.hop_s)

    kernel = np.ones(ENVELOPE_SMOOTH_FRAMES) / ENVELOPE_SMOOTH_FRAMES
    envelope = np.convolve(clip.energy_db, kernel, mode="same")
    min_gap = max(1, round(SYLLABLE_MIN_GAP_S / clip.hop_s))
    peaks, _ = find_peaks(envelope, prominence=SYLLABLE_PROMINENCE_DB, distance=min_gap)
    peaks = peaks[speech[peaks]]

    pause_frames = 0
    if speech.any():
        first, last = np.flatnonzero(speech)[[0, -1]]
        inside = speech[first : last + 1]
        edges = np.flatnonzero(np.diff(inside.astype(np.int8)))  # ends of runs
        runs = np.split(inside, edges + 1)
        min_pause = round(MIN_PAUSE_S / clip.hop_s)
        pause_frames = sum(len(run) for run in runs if not run[0] and len(run) >= min_pause)
        span = last - first + 1
    else:
        span = 1
    return {
        "f0_median_hz": float(np.median(clip.f0_hz[clip.voiced])) if clip.voiced.any() else float("nan"),
        "f0_range_st": float(high - low),
        "speech_duration_s": speech_duration_s,
        "syllable_rate_hz": len(peaks) / speech_duration_s if speech_duration_s > 0 else float("nan"),
        "pause_fraction": float(pause_frames / span),
    }


def prosody_difference(generated: ClipAnalysis, reference: ClipAnalysis) -> dict[str, float]:
    """How the generated clip's prosody departs from a real clip of the same text (see ``prosody_stats``).

    f0_median_diff_st: 12·log2(generated / reference median F0); 0 is best, positive = higher voice.
    f0_range_diff_st: generated minus reference F0 range in semitones; 0 is best, negative = flatter (monotone).
    energy_corr: correlation of frame energy (dB) along the MFCC DTW path, [-1, 1], higher is better.
    syllable_rate_ratio: generated / reference syllables per second of speech; 1 is best, < 1 = slower.
        Text-independent but approximate: it counts energy peaks, expect ~10-15 % scatter on 2-4 s clips.
    duration_ratio: generated / reference speech duration; 1 is best, > 1 = slower. Meaningful for the same text.
    pause_fraction_diff: generated minus reference pause fraction; 0 is best, positive = more pausing.
    """
    gen, ref = prosody_stats(generated), prosody_stats(reference)
    gen_idx, ref_idx = align(generated, reference)
    return {
        "f0_median_diff_st": SEMITONES_PER_OCTAVE * float(np.log2(_ratio(gen["f0_median_hz"], ref["f0_median_hz"]))),
        "f0_range_diff_st": gen["f0_range_st"] - ref["f0_range_st"],
        "energy_corr": _pearson(generated.energy_db[gen_idx], reference.energy_db[ref_idx]),
        "syllable_rate_ratio": _ratio(gen["syllable_rate_hz"], ref["syllable_rate_hz"]),
        "duration_ratio": _ratio(gen["speech_duration_s"], ref["speech_duration_s"]),
        "pause_fraction_diff": gen["pause_fraction"] - ref["pause_fraction"],
    }


# ------------------------------------------------------------------------------------------ language model --


def perplexity(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> float:
    """exp of the mean cross-entropy (nats) over every target that is not ``ignore_index``.

    logits: (..., vocab) unnormalised scores; labels: (...) int64 targets with the same leading shape. No shift is
    applied: ``logits[..., t, :]`` scores ``labels[..., t]`` (align them before calling). Range [1, inf), lower is
    better; a uniform guess over V classes gives V. Raises ValueError on mismatched shapes or no targets.
    """
    import torch.nn.functional as F

    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}")
    targets = int((labels != ignore_index).sum())
    if targets == 0:
        raise ValueError("perplexity needs at least one target that is not ignore_index")
    total = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=ignore_index, reduction="sum"
    )
    return math.exp(float(total) / targets)


# -------------------------------------------------------------------------------------------- catalogue --

GROUP_METRICS = {
    "perplexity": ("perplexity_codec0", "perplexity_sub_talker"),
    "speaker_similarity": ("speaker_similarity",),
    "pronunciation": ("wer", "cer"),
    "naturalness": ("naturalness",),
    "end_of_speech": ("eos_failure_rate",),
    "tone": ("tone_f0_corr", "tone_f0_rmse_st", "tone_voicing_agreement"),
    "prosody": (
        "f0_median_diff_st",
        "f0_range_diff_st",
        "energy_corr",
        "syllable_rate_ratio",
        "duration_ratio",
        "pause_fraction_diff",
    ),
}
METRIC_GROUP = {metric: group for group, names in GROUP_METRICS.items() for metric in names}
NAN_REASON = "not computable for this clip (the metric gave NaN, e.g. no voiced frames)"


@lru_cache(maxsize=1)
def metric_catalogue() -> dict[str, dict[str, str]]:
    """{metric: {"group", "range", "better"}} for every reported metric, from the table in this module's docstring."""
    table = {}
    for line in (__doc__ or "").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not line.lstrip().startswith("|") or len(cells) != 3 or cells[0] == "metric" or not cells[0].strip("-"):
            continue
        for name in cells[0].split(" / "):
            table[name.strip()] = {"range": cells[1], "better": cells[2]}
    catalogue = {}
    for metric, group in METRIC_GROUP.items():
        row = table.get("perplexity" if group == "perplexity" else metric)
        if row is None:
            raise RuntimeError(f"the table in finetuning.evaluation.metrics' docstring has no row for {metric!r}")
        catalogue[metric] = {"group": group, **row}
    return catalogue
