import numpy as np
import pytest
import soundfile as sf
from conftest import speechlike, write_wav

from finetuning.preparation.audio import (
    AudioDecodeError,
    QualityThresholds,
    decode_audio,
    integrated_loudness_lufs,
    load_mono_24k,
    normalize_loudness,
    quality_issue,
    true_peak_dbtp,
)

LIMITS = QualityThresholds(
    min_duration_s=0.5,
    max_duration_s=5.0,
    max_silence_fraction=0.7,
    max_clipped_fraction=0.001,
    min_rms_dbfs=-45.0,
    min_chars_per_s=1.0,
    max_chars_per_s=35.0,
)
TEXT = "a normal sentence"


def test_good_clip_passes():
    assert quality_issue(speechlike(2.0), TEXT, LIMITS) is None


@pytest.mark.parametrize(
    ("samples", "text", "reason"),
    [
        (speechlike(2.0), "   ", "empty_text"),
        (speechlike(0.2), "hi", "too_short"),
        (speechlike(6.0), TEXT * 3, "too_long"),
        (np.concatenate([speechlike(0.3), np.zeros(24000 * 3, "float32")]), TEXT, "mostly_silence"),
        (speechlike(2.0, level=0.003), TEXT, "too_quiet"),
        (np.clip(speechlike(2.0, level=1.0) * 4, -1, 1), TEXT, "clipping"),
        (speechlike(1.0), "x" * 100, "implausible_chars_per_second"),
        (speechlike(4.0), "ok", "implausible_chars_per_second"),
    ],
)
def test_each_rejection_reason(samples, text, reason):
    assert quality_issue(samples, text, LIMITS) == reason


def test_stereo_44k_becomes_mono_24k_keeping_pitch(tmp_path):
    sr = 44100
    t = np.arange(sr * 2) / sr
    left = 0.5 * np.sin(2 * np.pi * 1000 * t)
    stereo = np.stack([left, left], axis=1).astype("float32")
    path = tmp_path / "stereo.wav"
    sf.write(path, stereo, sr)
    mono = load_mono_24k(path)
    assert mono.ndim == 1
    assert len(mono) == pytest.approx(48000, abs=2)
    spectrum = np.abs(np.fft.rfft(mono))
    peak_hz = np.argmax(spectrum) * 24000 / len(mono)
    assert peak_hz == pytest.approx(1000, abs=2)
    assert np.max(np.abs(mono)) == pytest.approx(0.5, abs=0.02)


def test_channels_are_averaged(tmp_path):
    left = speechlike(1.0)
    stereo = np.stack([left, np.zeros_like(left)], axis=1)
    mono = load_mono_24k(write_wav(tmp_path / "x.wav", stereo))
    np.testing.assert_allclose(mono, left / 2, atol=1e-4)


@pytest.mark.parametrize("fmt", ["FLAC", "OGG"])
def test_decodes_compressed_formats(tmp_path, fmt):
    path = tmp_path / f"clip.{fmt.lower()}"
    sf.write(path, speechlike(1.0, sample_rate=16000), 16000, format=fmt)
    assert len(load_mono_24k(path)) == pytest.approx(24000, abs=50)


def test_corrupt_and_missing_files_raise_clear_errors(tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF\x00\x00not really audio at all")
    with pytest.raises(AudioDecodeError):
        decode_audio(bad)
    with pytest.raises(FileNotFoundError):
        decode_audio(tmp_path / "nope.wav")


def test_loudness_normalisation_hits_the_lufs_target_under_the_true_peak_ceiling():
    quiet = speechlike(2.0, level=0.01)
    out = normalize_loudness(quiet, -23.0, -1.0)
    assert integrated_loudness_lufs(out) == pytest.approx(-23.0, abs=0.05)
    assert true_peak_dbtp(out) <= -1.0
    loud = normalize_loudness(speechlike(2.0, level=0.1), -6.0, -1.0)  # the ceiling wins over the target
    assert true_peak_dbtp(loud) == pytest.approx(-1.0, abs=0.01) and integrated_loudness_lufs(loud) < -6.0
    quarter_rate = np.sin(np.pi / 2 * np.arange(2400) + np.pi / 4).astype("float32")  # samples at ±0.707 only
    assert true_peak_dbtp(quarter_rate) == pytest.approx(0.0, abs=0.2)  # the peak between samples: +3 dB
    silent = np.zeros(24000, "float32")
    assert np.array_equal(normalize_loudness(silent, -23.0, -1.0), silent)
