"""One source, many speakers: a manifest entry with a ``speaker_column`` becomes one speaker config per speaker.

A LibriTTS- or VCTK-like corpus keeps every speaker in one file (jsonl / csv / LJSpeech / 🤗 dataset) with a
speaker column. Its manifest entry (the key is the group's name, listed in TRAIN_SPEAKERS like a speaker)::

    "libri": {"source": "data/libri.jsonl", "speaker_column": "speaker", "min_clips": 20, "min_minutes": 5,
              "speakers": ["84", "174"], "prefix": "libri_", "references": {"84": ["refs/84.wav"]}}

* ``speakers``: the column values to keep (default: every speaker found).
* ``min_clips`` / ``min_minutes``: speakers with fewer source clips / minutes of audio are left out, logged and
  counted (``skipped`` of ``expand_group``).
* Config names are ``prefix`` + the value, made safe (lower case; anything but letters, digits, ``_`` and
  ``-`` becomes ``_``). The default prefix is the group's name and ``_``. Two values that become one name are
  refused, naming both.
* ``references``: clips per speaker value; a speaker without any (and without ``ref_audio`` in its rows) gets
  its cleanest kept clips picked automatically (``pick_references``).
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from finetuning.constants import SAMPLE_RATE
from finetuning.preparation.audio import clipped_fraction, silence_fraction
from finetuning.preparation.sources import (
    DEFAULT_SPEAKER_COLUMN,
    Instructions,
    SourceError,
    SourceItem,
    SpeakerSpec,
    read_source,
)

logger = logging.getLogger(__name__)

AUTO_REFERENCE_CLIPS = 1  # clips picked as a speaker's reference when none is given
REFERENCE_MIN_S = 3.0  # picked references are at least this long when the speaker has such clips
SECONDS_PER_MINUTE = 60.0
_UNSAFE = re.compile(r"[^a-z0-9_-]+")


@dataclass(frozen=True)
class SpeakerGroup:
    """A manifest entry whose source holds many speakers (see the module docstring)."""

    name: str
    source: str
    format: str | None
    language: str | None
    speaker_column: str = DEFAULT_SPEAKER_COLUMN
    speakers: tuple[str, ...] | None = None
    min_clips: int = 1
    min_minutes: float = 0.0
    prefix: str = ""
    references: dict[str, tuple[str, ...]] = field(default_factory=dict)
    instructions: Instructions = Instructions()


def group_from_entry(name: str, entry: dict) -> SpeakerGroup | None:
    """The group a manifest entry declares, or None for a single-speaker entry (no ``speaker_column``)."""
    if "speaker_column" not in entry:
        return None
    if "source" not in entry:
        raise SourceError(f'manifest entry {name}: a speaker_column needs a "source"')
    wanted = entry.get("speakers")
    refs = entry.get("references", {})
    if not isinstance(refs, dict):
        raise SourceError(f'manifest entry {name}: "references" maps each speaker value to its clip(s)')
    return SpeakerGroup(
        name=name,
        source=str(entry["source"]),
        format=entry.get("format"),
        language=entry.get("language"),
        speaker_column=str(entry["speaker_column"]),
        speakers=None if wanted in (None, "all") else tuple(str(s) for s in wanted),
        min_clips=int(entry.get("min_clips", 1)),
        min_minutes=float(entry.get("min_minutes", 0.0)),
        prefix=str(entry.get("prefix", f"{name}_")),
        references={str(k): tuple([v] if isinstance(v, str) else v) for k, v in refs.items()},
        instructions=Instructions.from_entry(name, entry),
    )


def safe_config_name(prefix: str, value: str) -> str:
    """``prefix + value`` as a dataset config and speaker name: lower case, runs of other characters -> ``_``."""
    return _UNSAFE.sub("_", f"{prefix}{value}".lower()).strip("_") or "speaker"


def clip_seconds(audio: Path | bytes | None) -> float:
    """Duration of an undecoded clip from its header (no decoding); 0 when it cannot be read."""
    import io

    import soundfile as sf

    if audio is None:
        return 0.0
    try:
        info = sf.info(io.BytesIO(audio) if isinstance(audio, bytes) else str(audio))
    except Exception:  # missing or unreadable: the quality gate rejects and counts it later
        return 0.0
    return info.frames / info.samplerate if info.samplerate else 0.0


def expand_group(
    group: SpeakerGroup, token: str | None = None
) -> tuple[list[tuple[SpeakerSpec, list[SourceItem]]], dict[str, str]]:
    """Read the group's source once and split it: ([(spec, items)] per kept speaker, sorted by config name;
    {speaker value: why it was left out}). Rows without a speaker value are left out and counted under ``""``.

    Raises SourceError for an unreadable source, a wanted speaker that is not in it, two values with one safe
    name, or a group left with no speaker.
    """
    by_speaker: dict[str, list[SourceItem]] = defaultdict(list)
    rows = read_source(group.source, group.format, None, token, group.speaker_column, group.instructions.column)
    for item in rows:
        by_speaker[item.speaker or ""].append(item)
    skipped: dict[str, str] = {}
    if "" in by_speaker:
        skipped[""] = f"{len(by_speaker.pop(''))} rows without a {group.speaker_column!r} value"
    missing = sorted(set(group.speakers or ()) - set(by_speaker))
    if missing:
        raise SourceError(f"group {group.name}: speakers {missing} are not in {group.source}")
    planned: dict[str, tuple[SpeakerSpec, list[SourceItem]]] = {}
    for value in sorted(group.speakers or by_speaker):
        items = by_speaker[value]
        minutes = sum(clip_seconds(item.audio) for item in items) / SECONDS_PER_MINUTE if group.min_minutes else 0
        if len(items) < group.min_clips or minutes < group.min_minutes:
            skipped[value] = f"{len(items)} clips, {minutes:.1f} min (min_clips {group.min_clips}, "
            skipped[value] += f"min_minutes {group.min_minutes})"
            continue
        name = safe_config_name(group.prefix, value)
        if name in planned:
            raise SourceError(
                f"group {group.name}: speakers {planned[name][1][0].speaker!r} and {value!r} both "
                f"become config {name!r}; set a different prefix or rename one"
            )
        references = group.references.get(value, ())
        spec = SpeakerSpec(
            name=name,
            source=group.source,
            format=group.format,
            language=group.language,
            references=references,
            auto_references=not references and not any(item.reference_audio for item in items),
            instructions=group.instructions,
        )
        planned[name] = (spec, items)
    for value, why in skipped.items():
        logger.warning("group %s: speaker %r left out: %s", group.name, value, why)
    if not planned:
        raise SourceError(f"group {group.name}: no speaker of {group.source} is left after the filters ({skipped})")
    return [planned[name] for name in sorted(planned)], skipped


def cleanliness(samples: np.ndarray) -> tuple[float, float, int]:
    """How clean a 24 kHz clip is by the quality gate's measures, lower is cleaner: (clipped fraction,
    silence fraction, -number of samples)."""
    return clipped_fraction(samples), silence_fraction(samples), -len(samples)


def pick_references(measures: list[tuple[float, float, int]], count: int = AUTO_REFERENCE_CLIPS) -> list[int]:
    """Indices of the cleanest clips by their ``cleanliness``: fewest clipped samples, then least silence, then
    longest; among clips of at least REFERENCE_MIN_S when the speaker has any (an embedding needs speech)."""
    long_enough = [i for i, measure in enumerate(measures) if -measure[2] / SAMPLE_RATE >= REFERENCE_MIN_S]
    candidates = long_enough or list(range(len(measures)))
    return sorted(candidates, key=measures.__getitem__)[:count]
