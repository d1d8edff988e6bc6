"""Audio decoding, resampling and the quality gate used by data preparation.

Everything here works on 1-D float32 numpy arrays in [-1, 1]. The product's sample rate is 24 kHz mono.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from finetuning.constants import SAMPLE_RATE

RESAMPLE_QUALITY = "soxr_hq"  # band-limited resampler from libsoxr, via librosa
CLIP_LEVEL = 0.999  # |sample| at or above this counts as clipped
SILENCE_TOP_DB = 40.0  # frames quieter than (peak - 40 dB) count as silence
TRUE_PEAK_OVERSAMPLING = 4  # ITU-R BS.1770 annex 2: 4x oversampling at 48 kHz and below
LOUDNESS_BLOCK_S = 0.4  # ITU-R BS.1770 gating block


class AudioDecodeError(Exception):
    """The audio could not be decoded (corrupt, truncated, unsupported format)."""


def decode_audio(source: str | Path | bytes) -> tuple[np.ndarray, int]:
    """Decode wav/flac/ogg(vorbis, opus)/mp3 (libsndfile) from a path or raw bytes into (samples, sample_rate).

    Multi-channel audio is returned as (frames, channels). Raises AudioDecodeError on any decode failure and
    FileNotFoundError when a path does not exist.
    """
    import soundfile as sf

    if isinstance(source, (str, Path)) and not Path(source).exists():
        raise FileNotFoundError(str(source))
    handle = io.BytesIO(source) if isinstance(source, bytes) else str(source)
    try:
        data, sample_rate = sf.read(handle, dtype="float32", always_2d=False)
    except Exception as error:  # libsndfile reports corrupt/unsupported input with several exception types
        where = "audio bytes" if isinstance(source, bytes) else str(source)
        raise AudioDecodeError(f"cannot decode {where}: {error}") from error
    if data.size == 0:
        raise AudioDecodeError(f"{source if not isinstance(source, bytes) else 'audio bytes'} holds no samples")
    return np.asarray(data, dtype=np.float32), int(sample_rate)


def to_mono(samples: np.ndarray) -> np.ndarray:
    """(frames,) or (frames, channels) -> (frames,), averaging channels."""
    return samples if samples.ndim == 1 else samples.mean(axis=1).astype(np.float32)


def resample(samples: np.ndarray, orig_sr: int, target_sr: int = SAMPLE_RATE) -> np.ndarray:
    """Resample a mono signal with a high-quality band-limited resampler (libsoxr HQ)."""
    if orig_sr == target_sr:
        return samples.astype(np.float32, copy=False)
    import librosa

    return librosa.resample(samples, orig_sr=orig_sr, target_sr=target_sr, res_type=RESAMPLE_QUALITY).astype(np.float32)


def load_mono_24k(source: str | Path | bytes) -> np.ndarray:
    """Decode, downmix and resample to 24 kHz mono float32."""
    samples, sample_rate = decode_audio(source)
    return resample(to_mono(samples), sample_rate)


def rms_dbfs(samples: np.ndarray) -> float:
    """Root-mean-square level in dB relative to full scale (-inf for digital silence)."""
    rms = float(np.sqrt(np.mean(np.square(samples, dtype=np.float64))))
    return 20.0 * np.log10(rms) if rms > 0 else float("-inf")


def true_peak_dbtp(samples: np.ndarray) -> float:
    """True-peak level in dBTP (ITU-R BS.1770 annex 2): the peak of the signal oversampled TRUE_PEAK_OVERSAMPLING
    times, so peaks between samples count; -inf for digital silence."""
    from scipy.signal import resample_poly

    peak = float(np.max(np.abs(resample_poly(samples.astype(np.float64), TRUE_PEAK_OVERSAMPLING, 1))))
    return 20.0 * np.log10(peak) if peak > 0 else float("-inf")


def integrated_loudness_lufs(samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> float:
    """ITU-R BS.1770-4 integrated loudness in LUFS (K-weighted, gated; pyloudnorm). -inf when every 400 ms
    block is gated out (silence); clips shorter than one block are measured as one zero-padded block."""
    import pyloudnorm

    block_samples = int(LOUDNESS_BLOCK_S * sample_rate)
    if len(samples) < block_samples:
        samples = np.pad(samples, (0, block_samples - len(samples)))
    meter = pyloudnorm.Meter(sample_rate, block_size=LOUDNESS_BLOCK_S)
    return float(meter.integrated_loudness(samples.astype(np.float64)))


def normalize_loudness(samples: np.ndarray, target_lufs: float, true_peak_ceiling_dbtp: float) -> np.ndarray:
    """Scale to an integrated loudness of ``target_lufs`` (ITU-R BS.1770), lowering the gain where needed so the
    true peak stays at or under ``true_peak_ceiling_dbtp``. Silent clips are returned unchanged."""
    loudness = integrated_loudness_lufs(samples)
    if not np.isfinite(loudness):
        return samples
    gain_db = target_lufs - loudness
    headroom_db = true_peak_ceiling_dbtp - (true_peak_dbtp(samples) + gain_db)
    gain_db += min(0.0, headroom_db)
    return (samples * 10.0 ** (gain_db / 20.0)).astype(np.float32)


def silence_fraction(samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> float:
    """Share of the clip (0..1) that lies more than SILENCE_TOP_DB below the clip's own peak, or is silent."""
    import librosa

    if not np.any(samples):
        return 1.0
    intervals = librosa.effects.split(samples, top_db=SILENCE_TOP_DB, frame_length=1024, hop_length=256)
    voiced = int(sum(end - start for start, end in intervals))
    return 1.0 - voiced / len(samples)


def clipped_fraction(samples: np.ndarray) -> float:
    """Share of samples at or beyond CLIP_LEVEL."""
    return float(np.mean(np.abs(samples) >= CLIP_LEVEL))


@dataclass(frozen=True)
class QualityThresholds:
    """Limits of the quality gate; built from settings (see ``finetuning.settings``)."""

    min_duration_s: float
    max_duration_s: float
    max_silence_fraction: float
    max_clipped_fraction: float
    min_rms_dbfs: float
    min_chars_per_s: float
    max_chars_per_s: float


# Rejection reasons, in the order the gate checks them. Reasons for clips that never decode come first.
REJECTION_REASONS = (
    "missing_file",
    "unreadable",
    "empty_text",
    "too_short",
    "too_long",
    "mostly_silence",
    "too_quiet",
    "clipping",
    "implausible_chars_per_second",
)


def quality_issue(samples: np.ndarray, text: str, limits: QualityThresholds) -> str | None:
    """Return the first rejection reason for a decoded 24 kHz mono clip and its transcript, or None if it passes.

    The clip is judged as recorded (before any loudness normalisation), so quiet and clipped takes are seen.
    """
    if not text.strip():
        return "empty_text"
    duration_s = len(samples) / SAMPLE_RATE
    if duration_s < limits.min_duration_s:
        return "too_short"
    if duration_s > limits.max_duration_s:
        return "too_long"
    if silence_fraction(samples) > limits.max_silence_fraction:
        return "mostly_silence"
    if rms_dbfs(samples) < limits.min_rms_dbfs:
        return "too_quiet"
    if clipped_fraction(samples) > limits.max_clipped_fraction:
        return "clipping"
    chars = len("".join(text.split()))
    chars_per_s = chars / duration_s
    if not limits.min_chars_per_s <= chars_per_s <= limits.max_chars_per_s:
        return "implausible_chars_per_second"
    return None


def encode_flac(samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    """Lossless 16-bit FLAC bytes of a mono clip (how audio is stored in the dataset)."""
    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, np.clip(samples, -1.0, 1.0), sample_rate, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()
