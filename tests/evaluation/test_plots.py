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


def test_run_curves_have_a_panel_per_metric_and_mark_the_selected_step(tmp_path):
    from finetuning.evaluation.listening import CURVES_FILE, render_listening_report
    from finetuning.evaluation.plots import history_curves, history_figure, selected_step

    history = [
        {"step": 10, "epoch": 0, "train/loss": 5.0},
        {"step": 10, "eval/codec0_loss": 4.0, "select/eval_loss": 4.1, "select/best_step": 10},
        {"step": 10, "eval/alice/speaker_similarity": 0.5, "eval/bob/speaker_similarity": 0.4},
        {"step": 20, "eval/codec0_loss": 3.0, "select/eval_loss": 3.1, "select/best_step": 20},
        {"step": 20, "eval/alice/speaker_similarity": 0.6, "eval/bob/speaker_similarity": float("nan")},
        {"step": 30, "eval/codec0_loss": 3.5, "select/eval_loss": 3.6, "select/best_step": 20},
    ]
    panels = history_curves(history)
    assert set(panels) == {"train/loss", "eval/codec0_loss", "select/eval_loss", "speaker_similarity"}
    assert panels["speaker_similarity"] == {"alice": [(10, 0.5), (20, 0.6)], "bob": [(10, 0.4)]}  # NaN left out
    assert panels["eval/codec0_loss"]["eval/codec0_loss"] == [(10, 4.0), (20, 3.0), (30, 3.5)]
    assert selected_step(history) == 20
    figure = history_figure(history, 20)
    assert len(figure.axes) == len(panels)
    for axes in figure.axes:  # the selected step is a vertical line at x = 20 in every panel
        assert any(list(line.get_xdata()) == [20, 20] for line in axes.get_lines()), axes.get_title()
    assert history_figure([{"step": 1, "epoch": 0}]) is None

    report = {
        "kind": "evaluation",
        "checkpoint": {"path": "run/best"},
        "scorers": {},
        "speakers": {},
    }
    page = render_listening_report(report, tmp_path, history)
    assert f"<img src='{CURVES_FILE}'" in page and "step 20, the step SELECT_BY chose" in page
    assert (tmp_path / CURVES_FILE).stat().st_size > 0
    assert "Training curves" not in render_listening_report(report, tmp_path / "none", [])
