"""Writing a prepared speaker config: dataset rows, parquet shards of bounded size, the dataset card and summary.

See ``schema`` for the layout and columns.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from finetuning import atomic
from finetuning.constants import NUM_CODEBOOKS, SAMPLE_RATE
from finetuning.preparation import schema

logger = logging.getLogger(__name__)


def write_split(rows: list[dict], folder: Path, split: str, fingerprint: str, max_shard_bytes: float) -> None:
    import datasets

    features = schema.features()
    shards: list[list[dict]] = [[]]
    size = 0.0
    for row in rows:
        row_bytes = len(row["audio"]["bytes"]) + row["num_frames"] * NUM_CODEBOOKS * 2 + len(row["text"])
        if shards[-1] and size + row_bytes > max_shard_bytes:
            shards.append([])
            size = 0.0
        shards[-1].append(row)
        size += row_bytes
    for index, shard in enumerate(shards):
        columns = {name: [row[name] for row in shard] for name in features}
        dataset = datasets.Dataset.from_dict(columns, features=features)
        dataset.to_parquet(str(folder / schema.shard_name(split, fingerprint, index, len(shards))))


def make_row(
    speaker: str,
    clip_id: str,
    text: str,
    language: str,
    flac: bytes,
    num_samples: int,
    codes: np.ndarray,
    instruct: str = "",
) -> dict:
    """One dataset row; ``flac`` is the stored 24 kHz clip (``audio.encode_flac``), ``codes`` (frames, 16),
    ``instruct`` its instruction ("" = none)."""
    return {
        "id": clip_id,
        "speaker": speaker,
        "text": text,
        "language": language,
        "audio": {"bytes": flac, "path": f"{clip_id}.flac"},
        "duration_s": num_samples / SAMPLE_RATE,
        "num_frames": int(codes.shape[0]),
        "audio_codes": codes.tolist(),
        "instruct": instruct,
    }


def local_configs(dataset_dir: Path) -> dict[str, dict]:
    """Every finished speaker config in a local dataset folder: speaker -> its prepare_info.json content."""
    configs = {}
    for path in sorted(dataset_dir.glob(f"*/{schema.INFO_FILE}")):
        if path.parent.name.startswith("."):  # a staging folder or an earlier copy waiting aside
            continue
        info = atomic.read_json(path)
        if info is None:
            logger.warning("%s is damaged (cut short by a crash?); preparing that speaker again rebuilds it", path)
            continue
        configs[path.parent.name] = info
    return configs


def write_card(dataset_dir: Path) -> Path:
    """(Re)write README.md and preparation_summary.json from every finished config in the folder. Each file is
    replaced atomically, so a reader (or ``load_dataset``) never sees a half-written card."""
    infos = local_configs(dataset_dir)
    card = dataset_dir / schema.CARD_FILE
    atomic.write_text(card, schema.render_card(infos))
    summaries = {name: info.get("summary", {}) for name, info in infos.items()}
    atomic.write_json(dataset_dir / schema.SUMMARY_FILE, summaries, indent=2, sort_keys=True)
    return card


@dataclass
class SpeakerReport:
    """What happened to one speaker in one run (JSON-serialisable via ``as_dict``)."""

    speaker: str
    prepared: bool
    fingerprint: str
    clips_total: int = 0
    kept: int = 0
    hours_in: float = 0.0  # source audio read: every clip, or the whole recordings of a recordings source
    hours_kept: float = 0.0
    rejected: dict[str, int] = field(default_factory=dict)
    splits: dict[str, int] = field(default_factory=dict)
    references: int = 0
    duplicate_ids: int = 0  # rows whose id repeated an earlier one and got a "-2", "-3", ... suffix
    languages: dict[str, int] = field(default_factory=dict)  # kept clips per resolved language
    auto_prefix_languages: list[str] = field(default_factory=list)  # languages without a model id: train as auto

    @classmethod
    def from_summary(cls, speaker: str, prepared: bool, fingerprint: str, summary: dict) -> SpeakerReport:
        """The report of a config from the summary its prepare_info.json holds."""
        names = ("clips_total", "kept", "hours_kept", "hours_in", "rejected", "splits", "references")
        names += ("duplicate_ids", "languages", "auto_prefix_languages")
        return cls(speaker, prepared, fingerprint, **{name: summary[name] for name in names if name in summary})

    def as_dict(self) -> dict:
        return {
            "speaker": self.speaker,
            "prepared_this_run": self.prepared,
            "fingerprint": self.fingerprint,
            "clips_total": self.clips_total,
            "kept": self.kept,
            "hours_in": self.hours_in,
            "hours_kept": self.hours_kept,
            "rejected_total": sum(self.rejected.values()),
            "rejected": dict(sorted(self.rejected.items())),
            "splits": self.splits,
            "references": self.references,
            "duplicate_ids": self.duplicate_ids,
            "languages": dict(sorted(self.languages.items())),
            "auto_prefix_languages": self.auto_prefix_languages,
        }


def format_report(r: SpeakerReport) -> str:
    """One line per speaker for the command's output."""
    if not r.prepared:
        return f"{r.speaker}: unchanged, skipped ({r.kept} clips, {r.hours_kept * 60:.1f} min)"
    rejected = ", ".join(f"{k}={v}" for k, v in sorted(r.rejected.items())) or "none"
    splits = ", ".join(f"{k}={v}" for k, v in r.splits.items())
    auto_prefix = ", ".join(r.auto_prefix_languages)
    auto_prefix = f"; trains with the auto prefix: {auto_prefix}" if auto_prefix else ""
    return (
        f"{r.speaker}: kept {r.kept}/{r.clips_total} clips ({r.hours_kept * 60:.2f} of {r.hours_in * 60:.2f} min); "
        f"splits: {splits}; rejected: {rejected}{auto_prefix}"
    )
