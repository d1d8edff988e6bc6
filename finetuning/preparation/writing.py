"""Writing a prepared speaker config: dataset rows, parquet shards of bounded size, the dataset card and summary.

See ``schema`` for the layout and columns.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from finetuning.constants import NUM_CODEBOOKS, SAMPLE_RATE
from finetuning.preparation import schema


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
    speaker: str, clip_id: str, text: str, language: str, flac: bytes, num_samples: int, codes: np.ndarray
) -> dict:
    """One dataset row; ``flac`` is the stored 24 kHz clip (``audio.encode_flac``), ``codes`` (frames, 16)."""
    return {
        "id": clip_id,
        "speaker": speaker,
        "text": text,
        "language": language,
        "audio": {"bytes": flac, "path": f"{clip_id}.flac"},
        "duration_s": num_samples / SAMPLE_RATE,
        "num_frames": int(codes.shape[0]),
        "audio_codes": codes.tolist(),
    }


def local_configs(dataset_dir: Path) -> dict[str, dict]:
    """Every finished speaker config in a local dataset folder: speaker -> its prepare_info.json content."""
    configs = {}
    for info in sorted(dataset_dir.glob(f"*/{schema.INFO_FILE}")):
        configs[info.parent.name] = json.loads(info.read_text())
    return configs


def write_card(dataset_dir: Path) -> Path:
    """(Re)write README.md and preparation_summary.json from every finished config in the folder."""
    infos = local_configs(dataset_dir)
    card = dataset_dir / schema.CARD_FILE
    card.write_text(schema.render_card(infos))
    summaries = {name: info.get("summary", {}) for name, info in infos.items()}
    (dataset_dir / schema.SUMMARY_FILE).write_text(json.dumps(summaries, indent=2, sort_keys=True))
    return card
