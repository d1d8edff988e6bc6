"""The listening report: ``evaluation.html`` beside ``evaluation.md``, to hear and see every utterance.

Per speaker and utterance: the text, an audio player for the real recording and one for each evaluated model's
generated clip, the utterance's metric values, and a picture per model (mel spectrograms of generated vs real,
F0 contours after the tone metric's DTW alignment; ``plots``). Every path in the page is relative to the report
folder, so the page works opened straight from disk (``file://``) or copied elsewhere with its folder. Like the
Markdown report, it only consumes the results: the report dict and the wav files it names.
"""

from __future__ import annotations

import html
from pathlib import Path

import soundfile as sf

from finetuning import atomic
from finetuning.evaluation.plots import save_history_figure, save_utterance_figure, selected_step

HTML_FILE = "evaluation.html"
PLOTS_DIR = "plots"
SHOWN_METRICS = (
    "naturalness",
    "speaker_similarity",
    "wer",
    "cer",
    "tone_f0_corr",
    "duration_ratio",
    "perplexity_codec0",
)
STYLE = (
    "body{font-family:sans-serif;margin:1.5em;max-width:75em}table{border-collapse:collapse;margin:.5em 0}"
    "td,th{border:1px solid #ccc;padding:.3em .5em;vertical-align:top;font-size:.9em}img{max-width:30em}"
    "audio{width:16em}.muted{color:#777}"
)


def _runs(report: dict) -> dict[str, dict]:
    if report["kind"] == "evaluation":
        return {"evaluated": report}
    return {"candidate": report["candidate"], "baseline": report["baseline"]}


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def _audio(src: str) -> str:
    return f'<audio controls preload="none" src="{html.escape(src)}"></audio>'


def _utterance_rows(runs: dict[str, dict], speaker: str, output_dir: Path) -> list[str]:
    """One table row per utterance of ``speaker`` (utterances matched by id across the runs)."""
    by_role = {role: {u["id"]: u for u in run["speakers"][speaker]["utterances"]} for role, run in runs.items()}
    first = next(iter(by_role.values()))
    rows = []
    for utterance_id, utterance in first.items():
        real_path = utterance.get("real_audio")
        instruct = utterance.get("instruct")
        said = f"<br><i>instruction: {html.escape(instruct)}</i>" if instruct else ""
        cells = [f"<td><b>{html.escape(utterance_id)}</b><br>{html.escape(utterance['text'])}{said}</td>"]
        cells.append(f"<td>{_audio(real_path) if real_path else '<span class=muted>no recording</span>'}</td>")
        for role, utterances in by_role.items():
            generated = utterances.get(utterance_id)
            if generated is None:
                cells.append("<td class=muted>not generated</td>")
                continue
            values = "<br>".join(
                f"{metric}: {_fmt(generated['values'].get(metric))}"
                for metric in SHOWN_METRICS
                if metric in generated["values"]
            )
            picture = ""
            if real_path:
                plot = Path(PLOTS_DIR) / role / speaker / (Path(generated["audio"]).stem + ".png")
                wav, sample_rate = sf.read(output_dir / generated["audio"], dtype="float32")
                real, _ = sf.read(output_dir / real_path, dtype="float32")
                save_utterance_figure(wav, real, sample_rate, output_dir / plot, title=f"{role}: {utterance_id}")
                picture = f'<br><img alt="{html.escape(role)} plots" src="{html.escape(plot.as_posix())}">'
            effect = generated.get("instruct_effect")
            without = f"<br>without the instruction: {_audio(effect['audio_without'])}" if effect else ""
            cells.append(f"<td>{_audio(generated['audio'])}{without}<br>{values}{picture}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return rows


CURVES_FILE = "plots/curves.png"


def render_listening_report(report: dict, output_dir: str | Path, history: list[dict] | None = None) -> str:
    """The HTML page for an evaluation or comparison report; draws the pictures under ``output_dir/plots``, with
    the run's curves (``plots.history_figure`` of its ``metrics.jsonl`` records ``history``) when given."""
    output_dir = Path(output_dir)
    runs = _runs(report)
    head = next(iter(runs.values()))
    title = "Listening report" + (" (comparison)" if len(runs) == 2 else "")
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title><style>{STYLE}</style></head>"]
    parts.append(f"<body><h1>{title}</h1><ul>")
    for role, run in runs.items():
        parts.append(f"<li><b>{role}</b>: <code>{html.escape(run['checkpoint']['path'])}</code></li>")
    scorers = ", ".join(f"{group}: {info['backend'] or 'unavailable'}" for group, info in head["scorers"].items())
    parts.append(f"</ul><p class=muted>Scorers: {html.escape(scorers)}. Numbers per utterance; means and ranges in ")
    parts.append("evaluation.md. Pictures: mel spectrograms (generated | real) and F0 in semitones re. each clip's ")
    parts.append("median, the generated contour DTW-aligned to the real one as the tone metric compares them.</p>")
    selected = selected_step(history or [])
    if history and save_history_figure(history, output_dir / CURVES_FILE, selected) is not None:
        chosen = f"the dashed line marks step {selected}, the step SELECT_BY chose" if selected else "no step selected"
        parts.append("<h2>Training curves</h2><p class=muted>Every metric of the run's metrics.jsonl per evaluated ")
        parts.append(f"checkpoint (speech metrics: one line per speaker); {chosen}.</p>")
        parts.append(f"<img src='{CURVES_FILE}' alt='training curves'>")
    for speaker in head["speakers"]:
        parts.append(f"<h2>{html.escape(speaker)}</h2>")
        if not head["speakers"][speaker]["utterances"]:
            parts.append(f"<p class=muted>{html.escape(head['speakers'][speaker]['note'])}</p>")
            continue
        header = "".join(f"<th>{role}</th>" for role in runs)
        parts.append(f"<table><tr><th>utterance</th><th>real recording</th>{header}</tr>")
        parts += _utterance_rows(runs, speaker, output_dir)
        parts.append("</table>")
    parts += _instruction_section(head)
    parts.append("</body></html>")
    return "\n".join(parts)


def _instruction_section(run: dict) -> list[str]:
    """Means per instruction and, where rows were also generated without theirs, what the instruction changed."""
    groups = run.get("instructions") or {}
    if not groups:
        return []
    parts = ["<h2>Per instruction</h2><table><tr><th>instruction</th><th>utterances</th><th>speakers</th>"]
    parts.append("".join(f"<th>{metric}</th>" for metric in SHOWN_METRICS) + "<th>instruction effect</th></tr>")
    for instruct, group in groups.items():
        speakers = ", ".join(f"{speaker}={count}" for speaker, count in group["speakers"].items())
        cells = [instruct or "(none)", str(group["utterances"]), speakers]
        cells += [_fmt(group["means"][m]["value"]) if m in group["means"] else "—" for m in SHOWN_METRICS]
        effect = group.get("instruct_effect")
        if effect:
            values = "; ".join(f"{m}: {_fmt(mean['value'])}" for m, mean in effect["means"].items())
            cells.append(
                f"{effect['pairs']} pair(s), {effect['identical']} identical; {values} ({effect['scorer']}: "
                f"{effect['compared']})"
            )
        else:
            cells.append("—")
        parts.append("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in cells) + "</tr>")
    parts.append("</table>")
    return parts


def write_listening_report(report: dict, output_dir: str | Path, history: list[dict] | None = None) -> Path:
    """Write ``evaluation.html`` (and its pictures) into ``output_dir``; returns the page's path."""
    path = Path(output_dir) / HTML_FILE
    atomic.write_text(path, render_listening_report(report, output_dir, history))
    return path
