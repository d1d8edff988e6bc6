"""Readers for the input formats a speaker's corpus may come in.

Every reader yields ``SourceItem``s; audio stays undecoded (a path or bytes) until the quality gate. A source
holding many speakers is split into one speaker config each by ``finetuning.preparation.multispeaker``.

Formats (``format`` in the speakers manifest, or detected from the path):
  * ``jsonl``     one JSON object per line: ``audio`` (or ``audio_path``, the seed-004 layout) and ``text``;
                  optional ``id``, ``language``, ``split``, ``ref_audio``, ``speaker``, ``instruct``. A line that
                  is not valid UTF-8 or not a JSON object becomes a rejected item (``bad_encoding``,
                  ``not_json``) naming ``file:line``.
  * ``ljspeech``  a folder with ``metadata.csv``/``metadata.txt`` (``id|text[|normalised text]``, or
                  ``id|text|speaker`` for a multi-speaker source) or ``metadata.tsv`` (``id<TAB>text``), audio in
                  ``wavs/<id>.<ext>`` or ``<id>.<ext>``; an instruction field by its 0-based index
                  (``instruct_column``: e.g. 3 for ``id|text|normalised|instruct``).
  * ``chatml``    a JSON list (or JSONL) of ``{"messages": [...], "speaker": ...}`` conversations: each
                  assistant turn's text + audio becomes a sample, the user turn's audio a reference clip and
                  the user turn's text the sample's instruction.
  * ``hf``        a 🤗 dataset (local folder saved with ``save_to_disk``/parquet, or a Hub id) with ``audio`` and
                  ``text`` columns, optional ``speaker`` (rows of other speakers are skipped), ``language``,
                  ``id``, ``instruct``; its splits are kept.
  * ``recordings`` long files (a file or a folder of them) cut into clips with text by
                  ``finetuning.preparation.from_recordings``; not read here.

Every format may give each clip an instruction (``instruct``, or the column ``instruct_column`` names in the
manifest): a style ("Speak in an angry tone.") or, for voice design, a voice description. The manifest maps label
values to instructions (``"instructions": {"angry": "Speak in an angry tone."}`` for an emotion column) and gives a
speaker-wide ``"instruct"`` for clips without one (``Instructions``). Empty = no instruction.

Relative audio paths resolve against the source's folder and must stay inside it: one that leaves it (``..``) is
rejected as ``outside_source``; an absolute path is taken as given on purpose. An ``hf`` dataset may come from
anyone: its rows name no file outside its own local folder (absolute or relative, symlinks resolved), and a Hub
dataset's rows name no local file at all (audio must be embedded bytes).
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".opus")
RECORDING_EXTENSIONS = (*AUDIO_EXTENSIONS, ".m4a", ".aac", ".mp4", ".mkv", ".webm", ".mov")
FORMATS = ("jsonl", "ljspeech", "chatml", "hf", "recordings")
GIVEN_SPLITS = ("train", "validation", "test")
METADATA_FILES = (("metadata.csv", "|"), ("metadata.txt", "|"), ("metadata.tsv", "\t"))
DEFAULT_SPEAKER_COLUMN = "speaker"
DEFAULT_INSTRUCT_COLUMN = "instruct"
_SPLIT_ALIASES = {"valid": "validation", "val": "validation", "dev": "validation", "eval": "validation"}


@dataclass(frozen=True)
class Instructions:
    """How a speaker's clips get their instruction: the source's ``column`` (a field name; for ``ljspeech`` a
    0-based field index; ChatML: the user turn's text; "" reads none from the source), each value mapped through
    ``labels`` (label -> instruction) when it is one, and ``default`` for a clip without one."""

    column: str = DEFAULT_INSTRUCT_COLUMN
    labels: tuple[tuple[str, str], ...] = ()
    default: str = ""

    @classmethod
    def from_entry(cls, name: str, entry: dict) -> Instructions:
        """From a manifest entry's ``instruct``, ``instruct_column`` and ``instructions`` keys; SourceError for a
        map that is not {label: instruction}."""
        labels = entry.get("instructions", {})
        if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
            raise SourceError(f'manifest entry {name}: "instructions" maps each label to its instruction text')
        column = str(entry.get("instruct_column", DEFAULT_INSTRUCT_COLUMN))
        return cls(column, tuple(sorted((str(k), v.strip()) for k, v in labels.items())), entry.get("instruct") or "")

    def resolve(self, value: str) -> str:
        """The instruction of a clip whose source gives ``value`` ("" = none)."""
        value = (value or "").strip() if self.column else ""
        return dict(self.labels).get(value, value) or self.default.strip()


@dataclass(frozen=True)
class SpeakerSpec:
    """Where one speaker's data comes from."""

    name: str
    source: str
    format: str | None
    language: str | None
    references: tuple[str, ...]
    auto_references: bool = False  # no clip given: pick the cleanest kept clips (multi-speaker sources)
    instructions: Instructions = Instructions()


class SourceError(ValueError):
    """A source cannot be read at all (bad path, bad format); the message says which speaker and what to fix."""


class RowError(SourceError):
    """One row of a source cannot be used; ``reason`` is its rejection reason in the preparation summary."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class SourceItem:
    """One candidate utterance: ``audio`` is a path or encoded bytes; ``split`` is None unless the source gives it."""

    id: str
    text: str
    audio: Path | bytes | None
    language: str | None = None
    split: str | None = None
    reference_audio: list[Path | bytes] = field(default_factory=list)
    origin: str = ""  # for messages: where the item came from
    problem: str | None = None  # a rejection found before the gate: bad_encoding, not_json, outside_source;
    # for recordings also unreadable, low_asr_confidence, other_speaker
    speaker: str | None = None  # the source's speaker column, when it has one
    instruct: str = ""  # the source's instruction (or label) for this clip; "" = none


def _speaker_value(value) -> str | None:
    """A speaker column's value as text (LibriTTS ids are numbers); None when missing or blank."""
    if value is None or str(value).strip() == "":
        return None
    return str(value).strip()


def rejected_item(item_id: str, origin: str, error: RowError) -> SourceItem:
    """A row that could not be read, kept so the quality gate counts and logs it under its own reason."""
    logger.warning("%s: %s (%s)", origin, error.reason, error)
    return SourceItem(id=item_id, text="", audio=None, origin=origin, problem=error.reason)


def _undecodable(text: str) -> bool:
    """True when a line read with ``errors="surrogateescape"`` held bytes that are not UTF-8."""
    return any("\udc80" <= char <= "\udcff" for char in text)


def normalise_split(name: str | None) -> str | None:
    if name is None or name == "":
        return None
    lowered = _SPLIT_ALIASES.get(str(name).lower(), str(name).lower())
    if lowered not in GIVEN_SPLITS:
        raise SourceError(f"split {name!r} is not one of {GIVEN_SPLITS} (or valid/val/dev)")
    return lowered


def detect_format(source: str) -> str:
    """Guess the format of a source path or Hub id."""
    path = Path(source)
    if path.is_dir():
        if any((path / name).exists() for name in ("metadata.csv", "metadata.tsv", "metadata.txt")):
            return "ljspeech"
        if (path / "metadata.jsonl").exists():
            return "jsonl"
        return "hf"
    if path.suffix == ".jsonl":
        return "jsonl"
    if path.suffix == ".json":
        return "chatml"
    if path.suffix.lower() in RECORDING_EXTENSIONS:
        return "recordings"
    if not path.exists() and source.count("/") == 1:
        return "hf"
    raise SourceError(f'cannot tell the format of {source!r}; set "format" to one of {FORMATS}')


def _resolve(base: Path, value: str) -> Path:
    """``value`` as a path: absolute as given, relative against ``base``, which it must not leave (RowError)."""
    candidate = Path(value)
    if candidate.is_absolute():
        return candidate
    root, resolved = Path(os.path.abspath(base)), Path(os.path.abspath(base / candidate))
    if not resolved.is_relative_to(root):
        raise RowError("outside_source", f"{value!r} leaves the source folder {base}; give an absolute path")
    return base / candidate


def _inside_dataset(folder: Path | None, value: str) -> Path:
    """An ``hf`` row's audio path: the file it names after resolving symlinks, which must lie inside the dataset's
    local ``folder`` (None for a Hub dataset: no local path is read). RowError ``outside_source`` otherwise."""
    if folder is None:
        raise RowError("outside_source", f"{value!r}: a Hub dataset's audio must be embedded, not a local path")
    root, resolved = Path(os.path.realpath(folder)), Path(os.path.realpath(folder / value))
    if not resolved.is_relative_to(root):
        raise RowError("outside_source", f"{value!r} is outside the dataset folder {folder} (links resolved)")
    return resolved


def _text_value(value) -> str:
    return "" if value is None else str(value).strip()


def _jsonl_item(
    path: Path, line: str, line_no: int, origin: str, speaker_column: str, instruct_column: str
) -> SourceItem:
    if _undecodable(line):
        raise RowError("bad_encoding", "the line is not valid UTF-8")
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise RowError("not_json", f"not valid JSON: {error}") from None
    if not isinstance(row, dict):
        raise RowError("not_json", f"a JSON {type(row).__name__}, not an object")
    audio_value = row.get("audio", row.get("audio_path"))
    audio = _resolve(path.parent, audio_value) if isinstance(audio_value, str) else None
    refs = row.get("ref_audio")
    return SourceItem(
        id=str(row.get("id") or (Path(audio_value).stem if isinstance(audio_value, str) else line_no)),
        text=str(row.get("text") or ""),
        audio=audio,
        language=row.get("language"),
        split=normalise_split(row.get("split")),
        reference_audio=[_resolve(path.parent, refs)] if isinstance(refs, str) else [],
        origin=origin,
        speaker=_speaker_value(row.get(speaker_column)),
        instruct=_text_value(row.get(instruct_column)),
    )


def read_jsonl(
    path: Path, speaker_column: str = DEFAULT_SPEAKER_COLUMN, instruct_column: str = DEFAULT_INSTRUCT_COLUMN
) -> Iterator[SourceItem]:
    if path.is_dir():
        path = path / "metadata.jsonl"
    if not path.exists():
        raise SourceError(f"{path} does not exist")
    with path.open(encoding="utf-8", errors="surrogateescape") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            origin = f"{path}:{line_no}"
            try:
                yield _jsonl_item(path, line, line_no, origin, speaker_column, instruct_column)
            except RowError as error:
                yield rejected_item(f"line{line_no:06d}", origin, error)


def read_ljspeech(
    folder: Path, speaker_field: int | None = None, instruct_field: int | None = None
) -> Iterator[SourceItem]:
    """``speaker_field``: 0-based index of a speaker field in each metadata line (``id|text|speaker``); the text
    is then the second field. ``instruct_field``: 0-based index of an instruction field (the text is then the
    second field too)."""
    candidates = [(folder / name, delim) for name, delim in METADATA_FILES if (folder / name).exists()]
    if not candidates:
        raise SourceError(f"{folder} has no metadata.csv, metadata.txt or metadata.tsv")
    metadata, delimiter = candidates[0]
    with metadata.open(encoding="utf-8", errors="surrogateescape", newline="") as handle:
        for line_no, fields in enumerate(csv.reader(handle, delimiter=delimiter, quoting=csv.QUOTE_NONE), 1):
            if not fields or not fields[0].strip():
                continue
            if _undecodable("".join(fields)):
                bad = RowError("bad_encoding", "the line is not valid UTF-8")
                yield rejected_item(f"line{line_no:06d}", f"{metadata}:{line_no}", bad)
                continue
            clip_id = Path(fields[0].strip()).stem
            speaker = None
            if speaker_field is not None or instruct_field is not None:
                if speaker_field is not None:
                    speaker = _speaker_value(fields[speaker_field] if speaker_field < len(fields) else None)
                text = fields[1] if len(fields) > 1 else ""
            else:
                text = fields[-1] if len(fields) > 2 and fields[-1].strip() else (fields[1] if len(fields) > 1 else "")
            audio = next(
                (
                    candidate
                    for stem_dir in (folder / "wavs", folder)
                    for ext in AUDIO_EXTENSIONS
                    if (candidate := stem_dir / f"{clip_id}{ext}").exists()
                ),
                folder / "wavs" / f"{clip_id}.wav",
            )
            instruct = fields[instruct_field] if instruct_field is not None and instruct_field < len(fields) else ""
            yield SourceItem(
                id=clip_id,
                text=text.strip(),
                audio=audio,
                origin=f"{metadata}:{line_no}",
                speaker=speaker,
                instruct=instruct.strip(),
            )


def _turn_parts(message: dict) -> tuple[list[str], list[str]]:
    content = message.get("content")
    if isinstance(content, str):
        return [content], []
    texts, audios = [], []
    for part in content or []:
        if part.get("type") == "text":
            texts.append(part.get("text", ""))
        elif part.get("type") == "audio":
            url = part.get("audio_url") or part.get("audio")
            if url:
                audios.append(url)
    return texts, audios


def _conversation_items(conversation: dict, index: int, path: Path) -> list[SourceItem]:
    refs: list[Path | bytes] = []
    items = []
    instruct = ""  # the latest user turn's text: the instruction of the assistant turns after it
    for message in conversation.get("messages", []):
        texts, audios = _turn_parts(message)
        if message.get("role") == "user":
            refs.extend(_resolve(path.parent, a) for a in audios)
            instruct = " ".join(t.strip() for t in texts if t.strip())
        elif message.get("role") == "assistant":
            texts, audios = _turn_parts(message)
            items.append(
                SourceItem(
                    id=f"{path.stem}-{index:06d}",
                    text=" ".join(t.strip() for t in texts if t.strip()),
                    audio=_resolve(path.parent, audios[0]) if audios else None,
                    language=conversation.get("language"),
                    reference_audio=list(refs),
                    origin=f"{path}#{index}",
                    speaker=_speaker_value(conversation.get("speaker")),
                    instruct=instruct,
                )
            )
    return items


def read_chatml(path: Path, speaker: str | None) -> Iterator[SourceItem]:
    """``speaker`` None keeps every conversation (each item then carries its conversation's speaker)."""
    if not path.exists():
        raise SourceError(f"{path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
        try:
            conversations = json.loads(text)
        except json.JSONDecodeError:
            conversations = [json.loads(line) for line in text.splitlines() if line.strip()]
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SourceError(f"{path} is neither a JSON list of conversations nor JSONL in UTF-8: {error}") from None
    if isinstance(conversations, dict):
        conversations = [conversations]
    for index, conversation in enumerate(conversations):
        if speaker is not None and conversation.get("speaker") not in (None, speaker):
            continue
        try:
            yield from _conversation_items(conversation, index, path)
        except RowError as error:
            yield rejected_item(f"{path.stem}-{index:06d}", f"{path}#{index}", error)


def read_hf(
    source: str,
    speaker: str | None,
    token: str | None,
    speaker_column: str = DEFAULT_SPEAKER_COLUMN,
    instruct_column: str = DEFAULT_INSTRUCT_COLUMN,
) -> Iterator[SourceItem]:
    """``speaker`` None keeps every row (each item then carries its ``speaker_column`` value); otherwise rows of
    other speakers are skipped. The audio column is read undecoded (bytes or path)."""
    import datasets

    path = Path(source)
    try:
        if (path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists():
            loaded = datasets.load_from_disk(str(path))
        else:
            loaded = datasets.load_dataset(source, token=token or None)
    except Exception as error:
        raise SourceError(f"cannot load the 🤗 dataset {source!r}: {error}") from error
    splits = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [(None, loaded)]
    for split_name, dataset in splits:
        missing = {"audio", "text"} - set(dataset.column_names)
        if missing:
            raise SourceError(f"the 🤗 dataset {source!r} lacks column(s) {sorted(missing)}")
        if "audio" in dataset.features and isinstance(dataset.features["audio"], datasets.Audio):
            dataset = dataset.cast_column("audio", datasets.Audio(decode=False))
        given_split = normalise_split(split_name) if split_name in (*GIVEN_SPLITS, *_SPLIT_ALIASES) else None
        for index, row in enumerate(dataset):
            if speaker is not None and row.get(speaker_column) not in (None, speaker):
                continue
            audio = row["audio"]
            if isinstance(audio, dict):
                audio = audio.get("bytes") or audio.get("path")
            if isinstance(audio, str):
                try:
                    audio = _inside_dataset(path if path.is_dir() else None, audio)
                except RowError as error:
                    yield rejected_item(f"{split_name or 'row'}-{index:06d}", f"{source}[{split_name}][{index}]", error)
                    continue
            yield SourceItem(
                id=str(row.get("id") or f"{split_name or 'row'}-{index:06d}"),
                text=str(row.get("text") or ""),
                audio=audio,
                language=row.get("language"),
                split=given_split,
                origin=f"{source}[{split_name}][{index}]",
                speaker=_speaker_value(row.get(speaker_column)),
                instruct=_text_value(row.get(instruct_column)),
            )


def read_source(
    source: str,
    fmt: str | None,
    speaker: str | None,
    token: str | None = None,
    speaker_column: str = DEFAULT_SPEAKER_COLUMN,
    instruct_column: str = DEFAULT_INSTRUCT_COLUMN,
) -> Iterator[SourceItem]:
    """Yield the items of one speaker's source; ``fmt`` None means detect it from the path.

    ``speaker`` None reads every speaker of a multi-speaker source; each item's ``speaker`` then holds the value
    of ``speaker_column`` (a field name; for ``ljspeech`` the 0-based index of a metadata field). Each item's
    ``instruct`` holds the value of ``instruct_column`` (likewise; an ``ljspeech`` source without a field index
    has none).
    """
    fmt = fmt or detect_format(source)
    if fmt == "jsonl":
        return read_jsonl(Path(source), speaker_column, instruct_column)
    if fmt == "ljspeech":
        if speaker is None and not str(speaker_column).isdigit():
            raise SourceError(
                f"for an ljspeech source, speaker_column is a field index (e.g. 2), not {speaker_column!r}"
            )
        instruct_field = int(instruct_column) if str(instruct_column).isdigit() else None
        return read_ljspeech(Path(source), int(speaker_column) if speaker is None else None, instruct_field)
    if fmt == "chatml":
        return read_chatml(Path(source), speaker)
    if fmt == "hf":
        return read_hf(source, speaker, token, speaker_column, instruct_column)
    if fmt == "recordings":
        raise SourceError("a recordings source holds one speaker: it cannot have a speaker_column")
    raise SourceError(f"unknown format {fmt!r}; use one of {FORMATS}")


def unique_ids(speaker: str, items: list[SourceItem]) -> int:
    """Give repeated ids a "-2", "-3", ... suffix (ids are unique within a config); returns how many were renamed."""
    seen: Counter = Counter()
    renamed = []
    for item in items:
        seen[item.id] += 1
        if seen[item.id] > 1:
            renamed.append(f"{item.id!r} -> {item.id}-{seen[item.id]} ({item.origin})")
            item.id = f"{item.id}-{seen[item.id]}"
    if renamed:
        logger.warning("speaker %s: %d duplicate id(s) renamed, e.g. %s", speaker, len(renamed), renamed[0])
    return len(renamed)
