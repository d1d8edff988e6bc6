"""Pictures of one generated clip beside the real recording of the same text, drawn with matplotlib.

``utterance_figure`` puts the two log-mel spectrograms side by side (same colour scale) above the two
speaker-normalised F0 contours overlaid after the MFCC DTW alignment that the tone metric uses
(``metrics.tone_similarity``), so what the plot shows is what the tone numbers compare. Drawing uses the
non-interactive Agg canvas: no display is needed. ``history_figure`` draws a run's curves from its
``metrics.jsonl``: every metric per evaluated checkpoint, with the step the selection chose marked.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from finetuning.evaluation import metrics

PLOT_MELS = 80
PLOT_N_FFT = 1024
PLOT_HOP = 256
FIGURE_SIZE_IN = (9.0, 5.0)
FIGURE_DPI = 80
DB_FLOOR = -80.0


def log_mel_db(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """(PLOT_MELS, frames) mel power in dB relative to the clip's peak, floored at DB_FLOOR."""
    import librosa

    mel = librosa.feature.melspectrogram(
        y=np.asarray(audio, dtype=np.float32), sr=sample_rate, n_fft=PLOT_N_FFT, hop_length=PLOT_HOP, n_mels=PLOT_MELS
    )
    return np.maximum(librosa.power_to_db(mel, ref=np.max), DB_FLOOR)


def aligned_contours(generated: np.ndarray, real: np.ndarray, sample_rate: int) -> tuple[np.ndarray, ...]:
    """(time_s (P,), generated semitones (P,), real semitones (P,)) along the DTW path, time on the real clip's axis;
    NaN where a frame is unvoiced. Raises ValueError for a silent clip."""
    gen, ref = metrics.analyse_clip(generated, sample_rate), metrics.analyse_clip(real, sample_rate)
    gen_idx, ref_idx = metrics.align(gen, ref)
    return ref_idx * ref.hop_s, gen.semitones()[gen_idx], ref.semitones()[ref_idx]


def utterance_figure(generated: np.ndarray, real: np.ndarray, sample_rate: int, title: str = ""):
    """A matplotlib Figure: mel spectrograms (generated | real) on top, aligned F0 contours below.

    Clips that cannot be analysed (silent) get a note in the F0 panel instead of a contour.
    """
    from matplotlib.figure import Figure

    figure = Figure(figsize=FIGURE_SIZE_IN, dpi=FIGURE_DPI, layout="constrained")
    grid = figure.add_gridspec(2, 2, height_ratios=(3, 2))
    seconds_per_frame = PLOT_HOP / sample_rate
    for column, (name, audio) in enumerate((("generated", generated), ("real", real))):
        axes = figure.add_subplot(grid[0, column])
        mel = log_mel_db(audio, sample_rate)
        axes.imshow(
            mel,
            origin="lower",
            aspect="auto",
            vmin=DB_FLOOR,
            vmax=0.0,
            extent=(0.0, mel.shape[1] * seconds_per_frame, 0, PLOT_MELS),
        )
        axes.set_title(f"{name} ({len(audio) / sample_rate:.2f} s)", fontsize=9)
        axes.set_xlabel("s", fontsize=8)
        axes.set_ylabel("mel bin", fontsize=8)
    pitch = figure.add_subplot(grid[1, :])
    try:
        time_s, gen_st, real_st = aligned_contours(generated, real, sample_rate)
        pitch.plot(time_s, real_st, label="real", linewidth=1.5)
        pitch.plot(time_s, gen_st, label="generated (DTW-aligned)", linewidth=1.0)
        pitch.legend(fontsize=8, loc="upper right")
    except ValueError as error:
        pitch.text(0.5, 0.5, f"no F0 contour: {error}", ha="center", va="center", transform=pitch.transAxes)
    pitch.set_xlabel("s (real clip)", fontsize=8)
    pitch.set_ylabel("F0, semitones re. median", fontsize=8)
    if title:
        figure.suptitle(title, fontsize=10)
    return figure


def save_utterance_figure(generated: np.ndarray, real: np.ndarray, sample_rate: int, path: Path, title: str = ""):
    """Draw ``utterance_figure`` into a PNG at ``path`` (folders created); returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    utterance_figure(generated, real, sample_rate, title).savefig(path)
    return path


CURVE_COLUMNS = 3
CURVE_PANEL_IN = (3.2, 2.2)


def history_curves(history: list[dict]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """{panel: {line: [(step, value), ...]}} from a run's ``metrics.jsonl`` records: ``train/loss``, every
    validation loss (``eval/<name>``, ``eval/auto/<name>``), the selection value (``select/<SELECT_BY>``) and every
    speech metric (``eval/<speaker>/<metric>``: one panel per metric, one line per speaker). Non-finite values and
    ``select/best_step`` are left out."""
    panels: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for record in history:
        for key, value in record.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not np.isfinite(value):
                continue
            parts = key.split("/")
            if key == "train/loss" or (parts[0] in ("eval", "select") and key != "select/best_step"):
                speech = parts[0] == "eval" and len(parts) == 3 and parts[1] != "auto"
                panel, line = (parts[2], parts[1]) if speech else (key, key)
                panels.setdefault(panel, {}).setdefault(line, []).append((int(record["step"]), float(value)))
    return panels


def selected_step(history: list[dict]) -> int | None:
    """The step the run's selection chose last (``select/best_step`` of the newest record carrying it)."""
    steps = [int(r["select/best_step"]) for r in history if r.get("select/best_step")]
    return steps[-1] if steps else None


def history_figure(history: list[dict], selected: int | None = None):
    """A matplotlib Figure with one panel per ``history_curves`` panel (value against optimizer step), the
    ``selected`` step marked by a dashed vertical line in every panel; None when the history has no curve."""
    from matplotlib.figure import Figure

    panels = history_curves(history)
    if not panels:
        return None
    rows = -(-len(panels) // CURVE_COLUMNS)
    size = (CURVE_PANEL_IN[0] * CURVE_COLUMNS, CURVE_PANEL_IN[1] * rows)
    figure = Figure(figsize=size, dpi=FIGURE_DPI, layout="constrained")
    for index, (panel, lines) in enumerate(sorted(panels.items())):
        axes = figure.add_subplot(rows, CURVE_COLUMNS, index + 1)
        for name, points in sorted(lines.items()):
            steps, values = zip(*sorted(points), strict=True)
            axes.plot(steps, values, marker="o", markersize=3, linewidth=1.0, label=name if len(lines) > 1 else None)
        if selected is not None:
            axes.axvline(selected, color="black", linestyle="--", linewidth=1.0, label=f"selected: step {selected}")
        axes.set_title(panel, fontsize=8)
        axes.set_xlabel("optimizer step", fontsize=7)
        axes.tick_params(labelsize=7)
        if len(lines) > 1 or selected is not None:
            axes.legend(fontsize=6)
    return figure


def save_history_figure(history: list[dict], path: Path, selected: int | None = None) -> Path | None:
    """Draw ``history_figure`` into a PNG at ``path`` (folders created); None (nothing written) without curves."""
    figure = history_figure(history, selected)
    if figure is None:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path
