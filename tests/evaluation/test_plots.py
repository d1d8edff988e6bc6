"""Listening-report pictures: both spectrograms and the DTW-aligned F0 contours the tone metric compares."""

import numpy as np
from conftest import VOICES_DIR

from finetuning.constants import SAMPLE_RATE
from finetuning.evaluation.plots import PLOT_MELS, aligned_contours, log_mel_db, utterance_figure
from finetuning.preparation.audio import load_mono_24k


def _clip(speaker: str) -> np.ndarray:
    return load_mono_24k(VOICES_DIR / speaker / "clips" / f"{speaker}_001.flac")


def test_figure_shows_both_spectrograms_and_aligned_contours(tmp_path):
    generated, real = _clip("english_speaker"), _clip("swahili_speaker")
    figure = utterance_figure(generated, real, SAMPLE_RATE, title="english vs swahili")
    spectrograms, pitch = figure.axes[:2], figure.axes[2]
    assert [a.get_title().split(" (")[0] for a in spectrograms] == ["generated", "real"]
    assert all(a.images[0].get_array().shape[0] == PLOT_MELS for a in spectrograms)
    assert [line.get_label() for line in pitch.lines] == ["real", "generated (DTW-aligned)"]
    time_s, gen_st, real_st = aligned_contours(generated, real, SAMPLE_RATE)
    assert np.all(np.diff(time_s) >= 0) and time_s[-1] <= real.size / SAMPLE_RATE
    assert np.isfinite(real_st).any() and np.isfinite(gen_st).any()  # voiced frames on both sides
    path = tmp_path / "plot.png"
    figure.savefig(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_silent_clip_gets_a_note_instead_of_a_contour():
    real = _clip("english_speaker")
    figure = utterance_figure(np.zeros_like(real), real, SAMPLE_RATE)
    pitch = figure.axes[2]
    assert not pitch.lines and "silent" in pitch.texts[0].get_text()
    assert log_mel_db(np.zeros_like(real), SAMPLE_RATE).max() <= 0.0
