"""Which speakers to prepare and from where: SPEAKERS_MANIFEST entries, else the ``VOICES_DIR`` convention.

A manifest is a JSON object ``{speaker: {"source": ..., "format": ..., "language": ..., "reference": [...],
"instruct": ...}}``; relative paths start from the manifest's folder (``finetuning/preparation/README.md``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from finetuning.preparation.sources import FORMATS, Instructions, SpeakerSpec
from finetuning.resources import is_hub_id
from finetuning.settings import Settings


class PreparationError(RuntimeError):
    """Preparation cannot continue for a speaker; the message names the speaker and what to fix."""


def default_reference(settings: Settings, name: str) -> str:
    return str(Path(settings.VOICES_DIR) / f"{name}.wav")


def _read_manifest(settings: Settings) -> tuple[dict, Path]:
    """SPEAKERS_MANIFEST as {speaker: entry} and the folder its relative paths start from."""
    path = Path(settings.SPEAKERS_MANIFEST)
    if not path.is_file():
        raise PreparationError(f"SPEAKERS_MANIFEST={path} does not exist (or is not a file)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PreparationError(f"SPEAKERS_MANIFEST={path} is not valid JSON: {error}") from None
    if not isinstance(manifest, dict) or not all(isinstance(entry, dict) for entry in manifest.values()):
        raise PreparationError(f'SPEAKERS_MANIFEST={path} must be a JSON object {{"speaker": {{"source": ...}}}}')
    return manifest, path.parent


def _manifest_path(folder: Path, value: str, fmt: str | None = "file") -> str:
    """A manifest path against the manifest's folder. A source of format ``hf`` (or of no format, shaped
    owner/name without a file suffix) that is no such path stays as given: a Hub dataset id."""
    path = Path(value).expanduser()
    beside = folder / path
    hub = fmt == "hf" or (fmt is None and is_hub_id(value) and not path.suffix)
    return str(path if path.is_absolute() or (hub and not beside.exists()) else beside)


def resolve_speakers(settings: Settings, names: Sequence[str] | None = None) -> list[SpeakerSpec]:
    """Speaker specs from SPEAKERS_MANIFEST entries, else the convention ``VOICES_DIR/<speaker>/``.

    A manifest is a JSON object ``{speaker: {"source": ..., "format": ..., "language": ..., "reference": [...]}}``;
    every key is optional, and relative ``source`` / ``reference`` paths start from the manifest's folder. Without
    an entry, the source is ``VOICES_DIR/<speaker>`` (``metadata.jsonl`` or an LJSpeech-style folder) and the
    reference is ``VOICES_DIR/<speaker>.wav``. Raises PreparationError for a manifest that is missing or not JSON.
    """
    manifest, folder = _read_manifest(settings) if settings.SPEAKERS_MANIFEST else ({}, Path("."))
    voices = Path(settings.VOICES_DIR)
    specs = []
    for name in names or settings.TRAIN_SPEAKERS:
        entry = manifest.get(name, {})
        fmt = entry.get("format")
        if fmt is not None and fmt not in FORMATS:
            raise PreparationError(f"speaker {name}: format {fmt!r} in the manifest is not one of {FORMATS}")
        refs = entry.get("reference")
        refs = [default_reference(settings, name)] if refs is None else [refs] if isinstance(refs, str) else refs
        specs.append(
            SpeakerSpec(
                name=name,
                source=_manifest_path(folder, entry["source"], fmt) if "source" in entry else str(voices / name),
                format=fmt,
                language=entry.get("language"),
                references=tuple(_manifest_path(folder, r) if "reference" in entry else r for r in refs),
                instructions=Instructions.from_entry(name, entry),
            )
        )
    return specs
