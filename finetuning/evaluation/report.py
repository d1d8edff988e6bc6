"""Evaluation reports: JSON, readable Markdown and the HTML listening report, and TensorBoard scalars, audio and
pictures during training.

The report only consumes results: the dicts ``runner.evaluate_checkpoint`` / ``compare_checkpoints`` return
(every metric's range, direction and scorer travel inside them).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from finetuning import atomic
from finetuning.evaluation.listening import HTML_FILE, render_listening_report
from finetuning.evaluation.metrics import NAN_REASON
from finetuning.evaluation.plots import utterance_figure
from finetuning.settings import Settings
from finetuning.training.tracking import METRICS_FILE

logger = logging.getLogger(__name__)

JSON_FILE = "evaluation.json"
MARKDOWN_FILE = "evaluation.md"


def write_report(report: dict, output_dir: str | Path, settings: Settings) -> tuple[Path, Path, Path]:
    """Write ``evaluation.json``, ``evaluation.md`` and the listening report ``evaluation.html`` (with its
    pictures, and the curves of OUTPUT_DIR's ``metrics.jsonl`` when the run has one); HF_TOKEN is masked should any
    message carry it. Returns the three paths."""
    output_dir = Path(output_dir)
    history = read_history(Path(settings.OUTPUT_DIR) / METRICS_FILE)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = output_dir / JSON_FILE, output_dir / MARKDOWN_FILE, output_dir / HTML_FILE
    texts = (
        json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False),
        render_markdown(report),
        render_listening_report(report, output_dir, history),
    )
    for path, text in zip(paths, texts, strict=True):
        atomic.write_text(path, text.replace(settings.HF_TOKEN, "***") if settings.HF_TOKEN else text)
    return paths


# --------------------------------------------------------------------------------------------- rendering --


def read_history(path: Path) -> list[dict]:
    """The records of a run's ``metrics.jsonl`` ([] when there is none; lines cut short by a crash skipped)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [r for r in records if isinstance(r, dict) and "step" in r]


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) >= 100 else f"{value:.3f}"
    return str(value)


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(report: dict) -> str:
    """Readable report: checkpoints, scorers (with what was skipped or unavailable and why), then per speaker a
    table of means with range, direction and scorer (side by side with the difference for a comparison), the
    metrics that could not be computed and why, and the per-utterance numbers."""
    runs = (
        {"evaluated": report} if report["kind"] == "evaluation" else {k: report[k] for k in ("baseline", "candidate")}
    )
    head = list(runs.values())[-1]
    lines = ["# Evaluation on generated speech" if len(runs) == 1 else "# Comparison on generated speech", ""]
    for role, run in runs.items():
        ckpt = run["checkpoint"]
        lines.append(
            f"- **{role}**: `{ckpt['path']}` ({ckpt['model_type']} model; layout {ckpt['layout']}: "
            f"{ckpt['layout_source']})"
        )
    gen = head["generation"]
    lines.append(
        f"- generation: sampling with the model's defaults, seed {gen['seed']} (per utterance), at most "
        f"{gen['max_new_tokens']} frames ({gen['max_seconds']} s), up to {gen['max_utterances']} utterances per speaker"
    )
    if head.get("step") is not None:
        lines.append(f"- training step: {head['step']}")
    lines += ["", "## Scorers", "", "| metrics | scorer | notes |", "|---|---|---|"]
    for group, info in head["scorers"].items():
        notes = [f"unavailable: {info['unavailable']}"] if info.get("unavailable") else []
        notes += [f"skipped {name}: {reason}" for name, reason in info.get("skipped", {}).items()]
        if info.get("languages"):
            notes.append(f"languages: {info['languages']}")
        lines.append(f"| {group} | {_cell(info['backend'] or 'unavailable')} | {_cell('; '.join(notes))} |")
    lines += [
        "",
        "Means: perplexities are token-weighted over a speaker's utterances, other metrics plain means; (n/of) "
        "counts the utterances with a value (n/a, NaN: not computable, e.g. no voiced frames). Tone and prosody "
        "compare each generated clip with the real recording of the same text. *real audio*: the speaker's own "
        "held-out recordings scored the same way, i.e. the ceiling for speaker similarity and the recogniser's "
        "own error floor for WER/CER.",
    ]
    lines += _end_of_speech_table(runs)
    for speaker, section in head["speakers"].items():
        lines += ["", f"## {speaker}", "", f"{section['note']}; language {section['language'] or 'n/a'}."]
        if section.get("conditioning"):
            for role, run in runs.items():
                lines.append(f"- {role} speaks via {run['speakers'][speaker].get('conditioning', 'n/a')}")
        if section["utterances"]:
            lines += [""] + _means_table(runs, speaker, report.get("difference", {}).get(speaker, {}))
        if section["unavailable"]:
            lines.append("")
        for group, reason in section["unavailable"].items():
            lines.append(f"- **{group} unavailable**: {reason}")
        for role, run in runs.items():
            lines += _utterance_table(role, run["speakers"][speaker]["utterances"])
    lines += _instruction_tables(head)
    lines += ["", "<details><summary>settings (secrets removed)</summary>", "", "```json"]
    lines += [json.dumps(head["settings"], indent=2, sort_keys=True), "```", "</details>", ""]
    return "\n".join(lines)


def _end_of_speech_table(runs: dict) -> list[str]:
    """Failures to end speech (runaway, truncated, run-on) per run, overall and per speaker, with the thresholds."""
    head = list(runs.values())[-1]
    if "end_of_speech" not in head:
        return []
    thresholds = head["end_of_speech"]["thresholds"]
    lines = ["", "## End of speech", "", "; ".join(f"{kind}: {rule}" for kind, rule in thresholds.items()) + ".", ""]
    lines += ["| run | speakers | failure rate | runaway | truncated | run-on | of |", "|---|---|---|---|---|---|---|"]
    for role, run in runs.items():
        rows = {"all": run["end_of_speech"]["overall"]}
        rows.update({speaker: section.get("end_of_speech", {}) for speaker, section in run["speakers"].items()})
        for who, counts in rows.items():
            if counts.get("n"):
                cells = [_fmt(counts["rate"]), counts["runaway"], counts["truncated"], counts["run_on"], counts["n"]]
                lines.append(f"| {role} | {who} | " + " | ".join(str(c) for c in cells) + " |")
    return lines


def _means_table(runs: dict, speaker: str, difference: dict) -> list[str]:
    roles = list(runs)
    header = ["metric", "range", "better", "scorer", "real audio", *roles]
    if len(runs) == 2:
        header.append("candidate - baseline")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    real = runs[roles[-1]]["speakers"][speaker]["real_audio"]
    for metric, info in runs[roles[-1]]["metrics"].items():
        cells = []
        for role in roles:
            mean = runs[role]["speakers"][speaker]["means"].get(metric)
            cells.append("—" if mean is None else f"{_fmt(mean['value'])} ({mean['n']}/{mean['of']})")
        if all(cell == "—" for cell in cells):
            continue
        row = [metric, info["range"], info["better"], info["scorer"]]
        row.append(_fmt(real[metric]["value"]) if metric in real else "—")
        row += cells
        if len(runs) == 2:
            diff = difference.get(metric, {})
            delta = diff.get("difference")
            row.append("n/a" if delta is None else f"{delta:+.3f} ({diff['verdict']})")
        lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
    return lines


INSTRUCTION_METRICS = ("speaker_similarity", "wer", "tone_f0_corr", "duration_ratio", "perplexity_codec0")


def instruction_label(instruct: str) -> str:
    """How an instruction group is shown: its text, or "(none)" for rows generated without one."""
    return instruct or "(none)"


def _instruction_tables(run: dict) -> list[str]:
    """Means per instruction (every speaker's utterances generated with it) and, where rows were also generated
    without their instruction, the prosody difference the instruction made."""
    groups = run.get("instructions") or {}
    if not groups:
        return []
    scorers = {metric: run["metrics"][metric]["scorer"] for metric in INSTRUCTION_METRICS}
    lines = ["", "## Per instruction", ""]
    lines.append(
        "Every speaker's utterances grouped by the instruction they were generated with (trained_calls.instruct of "
        f"the checkpoint: {run['checkpoint'].get('trained_instruct')}); scorers: "
        + ", ".join(f"{metric} {scorer}" for metric, scorer in scorers.items())
        + "."
    )
    lines += ["", "| instruction | utterances | speakers | " + " | ".join(INSTRUCTION_METRICS) + " |"]
    lines.append("|" + "---|" * (len(INSTRUCTION_METRICS) + 3))
    for instruct, group in groups.items():
        speakers = ", ".join(f"{speaker}={count}" for speaker, count in group["speakers"].items())
        cells = [instruction_label(instruct), group["utterances"], speakers]
        cells += [_fmt(group["means"][metric]["value"]) if metric in group["means"] else "—" for metric in scorers]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    effects = {instruct: group["instruct_effect"] for instruct, group in groups.items() if "instruct_effect" in group}
    if effects:
        first = next(iter(effects.values()))
        metrics = list(first["means"])
        lines += ["", f"What the instruction changes: {first['compared']}; prosody scorer {first['scorer']}. "]
        lines[-1] += "0 semitones and ratios of 1 = no change; identical = pairs equal sample for sample."
        lines += ["", "| instruction | pairs | identical | " + " | ".join(metrics) + " |"]
        lines.append("|" + "---|" * (len(metrics) + 3))
        for instruct, effect in effects.items():
            cells = [instruction_label(instruct), effect["pairs"], effect["identical"]]
            cells += [_fmt(effect["means"][metric]["value"]) for metric in metrics]
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return lines


def _utterance_table(role: str, utterances: list[dict]) -> list[str]:
    if not utterances:
        return []
    shown = (
        "perplexity_codec0",
        "perplexity_sub_talker",
        "speaker_similarity",
        "wer",
        "tone_f0_corr",
        "duration_ratio",
    )
    lines = ["", f"Utterances ({role}):", ""]
    lines.append("| id | text | generated s | capped | " + " | ".join(shown) + " | transcript | errors |")
    lines.append("|" + "---|" * (len(shown) + 6))
    for u in utterances:
        nan = [metric for metric, reason in u["errors"].items() if reason == NAN_REASON]
        errors = [f"{key}: {reason}" for key, reason in u["errors"].items() if reason != NAN_REASON]
        errors = "; ".join(errors + ([f"NaN: {', '.join(nan)}"] if nan else []))
        cells = [u["id"], u["text"], f"{u['generated_s']:.2f}", "yes" if u["reached_length_cap"] else "no"]
        cells += [_fmt(u["values"].get(m)) for m in shown] + [u["transcript"] or "", errors]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return lines


# ------------------------------------------------------------------------------------------------ logging --


def report_scalars(report: dict) -> dict[str, float]:
    """``{"eval/<speaker>/<metric>": mean}`` of an evaluation report (metrics without a value are left out)."""
    if report.get("kind") != "evaluation":
        raise ValueError("log one evaluation report at a time (a comparison holds two: 'baseline', 'candidate')")
    return {
        f"eval/{speaker}/{metric}": mean["value"]
        for speaker, section in report["speakers"].items()
        for metric, mean in section["means"].items()
        if mean["value"] is not None
    }


def log_report(writer, report: dict, step: int) -> dict[str, float]:
    """Log a report's means as ``eval/<speaker>/<metric>`` scalars, each speaker's first generated clip as
    ``eval/<speaker>/sample`` audio and its pictures (``plots.utterance_figure``: mel spectrograms, aligned F0
    beside the real recording) as ``eval/<speaker>/plots``; returns the scalars.

    ``writer`` is a ``torch.utils.tensorboard.SummaryWriter``, accelerate's TensorBoard tracker (its ``.writer``
    is used) or anything with ``log(values, step=)`` such as an ``Accelerator`` (scalars only: audio needs
    TensorBoard, which is logged as a warning).
    """
    import soundfile as sf
    import torch

    scalars = report_scalars(report)
    target = writer if hasattr(writer, "add_scalar") else getattr(writer, "writer", writer)
    if not hasattr(target, "add_scalar"):
        if not hasattr(target, "log"):
            raise TypeError(f"cannot log to {type(writer).__name__}: no add_scalar/add_audio or log(values, step)")
        target.log(scalars, step=step)
        logger.warning("audio samples are logged only to TensorBoard; %s got scalars", type(writer).__name__)
        return scalars
    for tag, value in scalars.items():
        target.add_scalar(tag, value, step)
    for speaker, section in report["speakers"].items():
        if section["utterances"]:
            first = section["utterances"][0]
            wav, sample_rate = sf.read(Path(report["output_dir"]) / first["audio"], dtype="float32")
            target.add_audio(f"eval/{speaker}/sample", torch.from_numpy(wav)[None], step, sample_rate=sample_rate)
            if first.get("real_audio"):
                real, _ = sf.read(Path(report["output_dir"]) / first["real_audio"], dtype="float32")
                target.add_figure(f"eval/{speaker}/plots", utterance_figure(wav, real, sample_rate, first["id"]), step)
    target.flush()
    return scalars
