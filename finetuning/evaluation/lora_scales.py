"""``evaluate.py --lora-scales 0.3,0.5,1.0``: the same export merged at several scales, scored side by side.

Merging an adapter at scale s gives W + s x (merged update) for every trained weight (``LoraAdapter.merged_state_dict``:
adapted layers and fully trained modules alike), so the merge at any scale is a straight line between the Base
model's weights and the export's: ``W_base + (s / s_export) x (W_export - W_base)``, where s_export is the scale the
export was merged at (``lora_merge_scale`` in its ``finetune_info.json``, 1 by default). Each scale is written as a
stock-loadable checkpoint (the export's files hard-linked, new weights, the speaker rows kept as exported) under
``OUTPUT_DIR/evaluation/lora_scales/scale-<s>/model`` and evaluated like any checkpoint; the summary puts every
speaker's metric means side by side. A full fine-tune's export can be scaled the same way (towards the Base model).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from finetuning.constants import FIRST_SPEAKER_ROW
from finetuning.evaluation.metrics import metric_catalogue
from finetuning.settings import Settings
from finetuning.training.export import copy_export, read_info

SPEAKER_TABLE = "talker.model.codec_embedding.weight"
SUMMARY_JSON = "lora_scales.json"
SUMMARY_MARKDOWN = "lora_scales.md"


def parse_scales(text: str) -> list[float]:
    """ "0.3,0.5,1.0" -> [0.3, 0.5, 1.0]; ValueError naming the bad value unless every scale is in (0, 1]."""
    scales = []
    for part in text.split(","):
        try:
            scale = float(part)
        except ValueError:
            raise ValueError(f"--lora-scales: {part!r} is not a number (give e.g. 0.3,0.5,1.0)") from None
        if not 0 < scale <= 1:
            raise ValueError(f"--lora-scales: {scale} is outside (0, 1]")
        scales.append(scale)
    return scales


def scaled_weights(export: dict, base: dict, scale: float, export_scale: float) -> dict[str, torch.Tensor]:
    """The export's weights with the trained update scaled from ``export_scale`` to ``scale`` (computed in
    float32); speaker rows (FIRST_SPEAKER_ROW and after) and weights the Base model lacks stay as exported, and
    the export's own scale returns its weights bit for bit."""
    factor = scale / export_scale
    out = {}
    for name, tensor in export.items():
        reference = base.get(name)
        if factor == 1.0 or reference is None or not tensor.is_floating_point() or reference.shape != tensor.shape:
            out[name] = tensor
            continue
        scaled = (reference.float() + factor * (tensor.float() - reference.float())).to(tensor.dtype)
        if name == SPEAKER_TABLE:
            scaled[FIRST_SPEAKER_ROW:] = tensor[FIRST_SPEAKER_ROW:]
        out[name] = scaled.contiguous()
    return out


def write_scaled_export(export_dir: Path, base_dir: Path, scale: float, output_dir: Path) -> Path:
    """A stock-loadable copy of ``export_dir`` merged at ``scale`` (see the module docstring) at ``output_dir``."""
    from safetensors.torch import load_file, save_file

    info = read_info(export_dir)
    export_scale = float(info.get("lora_merge_scale", 1.0))
    weights = scaled_weights(
        load_file(str(export_dir / "model.safetensors")),
        load_file(str(base_dir / "model.safetensors")),
        scale,
        export_scale,
    )
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    copy_export(export_dir, output_dir, {"lora_merge_scale": scale, "scaled_from": export_scale})
    target = output_dir / "model.safetensors"
    target.unlink()  # a hard link to the export's weights: replaced, never written through
    save_file(weights, str(target), metadata={"format": "pt"})
    return output_dir


def evaluate_scales(checkpoint: str, scales: list[float], settings: Settings, output_dir: Path, **kwargs) -> dict:
    """Evaluate ``checkpoint`` merged at each of ``scales`` against INIT_MODEL_PATH's Base weights; each scale's
    report goes to ``output_dir/scale-<s>/``. Returns the side-by-side summary (also written as JSON and
    Markdown). ``kwargs`` go to ``runner.evaluate_checkpoint`` (speakers, language)."""
    from finetuning.evaluation.report import write_report
    from finetuning.evaluation.runner import evaluate_checkpoint
    from finetuning.evaluation.scorers import load_scorers
    from finetuning.resources import resolve_model_dir

    export_dir = Path(checkpoint)
    base_dir = resolve_model_dir(settings.INIT_MODEL_PATH, token=settings.HF_TOKEN or None, key="INIT_MODEL_PATH")
    scorers = load_scorers(settings)
    runs = {}
    for scale in scales:
        folder = output_dir / f"scale-{scale:g}"
        model_dir = write_scaled_export(export_dir, Path(base_dir), scale, folder / "model")
        report = evaluate_checkpoint(model_dir, settings, scorers, output_dir=folder, **kwargs)
        write_report(report, folder, settings)
        shutil.rmtree(model_dir)  # the scaled weights are reproducible from the export and the Base model
        runs[f"{scale:g}"] = report
    summary = {
        "checkpoint": str(checkpoint),
        "base_model": str(settings.INIT_MODEL_PATH),
        "exported_scale": float(read_info(export_dir).get("lora_merge_scale", 1.0)),
        "means": {
            scale: {speaker: {m: v["value"] for m, v in s["means"].items()} for speaker, s in r["speakers"].items()}
            for scale, r in runs.items()
        },
        "end_of_speech": {scale: r["end_of_speech"]["overall"] for scale, r in runs.items()},
    }
    (output_dir / SUMMARY_JSON).write_text(json.dumps(summary, indent=2))
    (output_dir / SUMMARY_MARKDOWN).write_text(render_scales(summary))
    return summary


def render_scales(summary: dict) -> str:
    """One table per speaker: a row per metric, a column per scale (with each metric's better direction)."""
    scales = list(summary["means"])
    catalogue = metric_catalogue()
    lines = [
        "# LoRA merge scales",
        "",
        f"`{summary['checkpoint']}` (merged at {summary['exported_scale']:g}) merged at each scale against "
        f"`{summary['base_model']}`; each scale's full report is in `scale-<s>/`.",
    ]
    speakers = sorted({speaker for means in summary["means"].values() for speaker in means})
    for speaker in speakers:
        lines += ["", f"## {speaker}", "", "| metric | better | " + " | ".join(f"scale {s}" for s in scales) + " |"]
        lines.append("|---|---|" + "---|" * len(scales))
        metrics = [m for m in catalogue if any(m in summary["means"][s].get(speaker, {}) for s in scales)]
        for metric in metrics:
            values = [summary["means"][s].get(speaker, {}).get(metric) for s in scales]
            cells = ["n/a" if v is None else f"{v:.3f}" for v in values]
            lines.append(f"| {metric} | {catalogue[metric]['better']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
