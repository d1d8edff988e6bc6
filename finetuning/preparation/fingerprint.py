"""Fingerprints of a speaker config: what it was prepared from and how, so a re-run can skip what is unchanged.

A config's fingerprint hashes the content of its sources (audio bytes, transcripts, languages, given splits,
reference clips), the settings that change what preparation writes and the speech tokenizer's identity.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from finetuning.preparation import schema
from finetuning.preparation.sources import SourceItem, SpeakerSpec
from finetuning.settings import Settings

PROCESSING_VERSION = 2  # 2: language labels resolved against the model (ISO codes mapped)


def hash_audio(audio: Path | bytes | None) -> str:
    if audio is None:
        return "none"
    if isinstance(audio, bytes):
        return hashlib.sha256(audio).hexdigest()
    try:
        return hashlib.sha256(Path(audio).read_bytes()).hexdigest()
    except OSError:
        return f"unreadable:{audio}"


def unreadable_files(spec: SpeakerSpec, items: list[SourceItem]) -> list[Path]:
    """Files of ``items`` (audio and references) and ``spec``'s references that exist but cannot be read
    (permissions, I/O errors, a folder in a file's place): their fingerprint would change without the source
    changing. Reads every file, like ``fingerprint``."""
    paths = [Path(r) for r in spec.references]
    paths += [a for item in items for a in (item.audio, *item.reference_audio) if isinstance(a, Path)]
    return [p for p in paths if p.exists() and hash_audio(p).startswith("unreadable:")]


def tokenizer_identity(path: str) -> str:
    """Content hash of a local speech tokenizer (config + weights), or the Hub id for a remote one."""
    folder = Path(path)
    if not folder.is_dir():
        return f"hub:{path}"
    digest = hashlib.sha256()
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        file = folder / name
        if file.exists():
            digest.update(file.read_bytes())
    return digest.hexdigest()


def processing_settings(settings: Settings) -> dict:
    """The settings that change what preparation writes; they enter every fingerprint."""
    keys = (
        "VALIDATION_FRACTION",
        "TEST_FRACTION",
        "MIN_DURATION_S",
        "MAX_DURATION_S",
        "MAX_SILENCE_FRACTION",
        "MAX_CLIPPED_FRACTION",
        "MIN_RMS_DBFS",
        "MIN_CHARS_PER_S",
        "MAX_CHARS_PER_S",
        "NORMALIZE_LOUDNESS",
        "TARGET_LOUDNESS_LUFS",
        "TRUE_PEAK_CEILING_DBTP",
        "MAX_SHARD_SIZE_MB",
        "SEED",
    )
    return {k: getattr(settings, k) for k in keys}


def fingerprint(spec: SpeakerSpec, items: list[SourceItem], settings: Settings, tokenizer_id: str) -> str:
    digest = hashlib.sha256()
    header = {
        "schema": schema.SCHEMA_VERSION,
        "processing": PROCESSING_VERSION,
        "speaker": spec.name,
        "language": spec.language,
        "settings": processing_settings(settings),
        "tokenizer": tokenizer_id,
        "references": [hash_audio(Path(r)) for r in spec.references],
        "instructions": [spec.instructions.column, spec.instructions.labels, spec.instructions.default],
    }
    digest.update(json.dumps(header, sort_keys=True).encode())
    for item in items:
        row = [item.id, item.text, item.language, item.split, hash_audio(item.audio), item.instruct]
        row += [hash_audio(r) for r in item.reference_audio]
        if item.problem is not None:  # a reason found before the gate (recordings: one that thresholds decide)
            row.append(item.problem)
        digest.update(json.dumps(row).encode())
    return digest.hexdigest()
