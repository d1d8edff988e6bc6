"""Format ``recordings``: a speaker's long files become candidate clips with text, cached per recording.

For each recording (a file, or every file of a folder with one of RECORDING_EXTENSIONS, sorted by path):

1. decode it whole (``recordings.decode_recording``: PyAV, any container);
2. take its clips and texts from a sidecar ``.srt``/``.vtt`` when there is one, else cut it at pauses
   (``recordings``: silero-vad) and transcribe each clip with ``ASR_MODEL`` (``transcripts.Transcriber``);
3. measure each clip's voice against the speaker's reference clips (``speaker_filter``) when
   ``MIN_SPEAKER_SIMILARITY`` > 0;
4. write the clips (24 kHz FLAC) and a ``segments.json`` (times, text, confidence, similarity) to
   ``DATASET_DIR/.recordings/<speaker>/<key>/``; ``key`` hashes the recording's and sidecar's bytes and every
   setting that changes the cut, the text or the similarity, so a re-run reads the cache and adding one
   recording segments only that one. Entries of recordings no longer in the source are removed (none while a
recording cannot be read: its entry may be one of them). An entry is written to a staging folder, flushed and
renamed into place (``atomic.replace_folder``).

The clips then become ordinary ``SourceItem``s that go through the quality gate, the encoder and the speaker
config like any other source. A clip below ``MIN_ASR_CONFIDENCE`` is rejected as ``low_asr_confidence``, one
below ``MIN_SPEAKER_SIMILARITY`` as ``other_speaker``; these thresholds apply when reading the cache, so
changing them re-segments nothing. A recording that cannot be decoded is one ``unreadable`` rejection.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from finetuning import atomic
from finetuning.constants import SAMPLE_RATE
from finetuning.preparation.audio import AudioDecodeError, encode_flac, load_mono_24k
from finetuning.preparation.fingerprint import hash_audio
from finetuning.preparation.recordings import (
    Segment,
    SegmentRules,
    cut,
    decode_recording,
    plan_segments,
    speech_regions,
)
from finetuning.preparation.sources import (
    RECORDING_EXTENSIONS,
    RowError,
    SourceError,
    SourceItem,
    SpeakerSpec,
    rejected_item,
)
from finetuning.preparation.speaker_filter import ENCODER_NAME, SpeakerFilter
from finetuning.preparation.transcripts import Transcriber, find_sidecar, read_sidecar
from finetuning.resources import resolve_device
from finetuning.settings import Settings

logger = logging.getLogger(__name__)

CACHE_DIR = ".recordings"  # under DATASET_DIR; one folder per speaker, one entry per recording
CACHE_VERSION = 1
ENTRY_FILE = "segments.json"
HASH_CHUNK_BYTES = 1 << 20


@dataclass
class RecordingsRead:
    """A speaker's recordings as clips: ``items`` for the quality gate, ``seconds_in`` the recordings' total
    length, ``segmented`` the recordings cut this run (the others came from the cache)."""

    items: list[SourceItem] = field(default_factory=list)
    seconds_in: float = 0.0
    segmented: list[str] = field(default_factory=list)


def segment_rules(settings: Settings) -> SegmentRules:
    return SegmentRules(
        min_s=settings.SEGMENT_MIN_S,
        max_s=settings.SEGMENT_MAX_S,
        min_pause_s=settings.SEGMENT_MIN_PAUSE_S,
        pad_s=settings.SEGMENT_PAD_S,
        vad_threshold=settings.VAD_THRESHOLD,
    )


def list_recordings(source: str) -> list[Path]:
    """The recording files of a source: the file itself, or a folder's files with a recording extension (its
    subfolders too), sorted. Raises SourceError for a missing source or a folder without recordings."""
    path = Path(source)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise SourceError(f"{source} does not exist")
    found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in RECORDING_EXTENSIONS)
    if not found:
        raise SourceError(f"{source} holds no recordings ({', '.join(RECORDING_EXTENSIONS)})")
    return found


class _Models:
    """The ASR model and the speaker filter, each loaded on first need and once per speaker."""

    def __init__(self, spec: SpeakerSpec, settings: Settings):
        self.spec, self.settings = spec, settings
        self._transcriber: Transcriber | None = None
        self._filter: SpeakerFilter | None = None

    def transcriber(self, recording: Path) -> Transcriber:
        if self._transcriber is None:
            if not self.settings.ASR_MODEL:
                raise SourceError(f"{recording} has no .srt/.vtt beside it and ASR_MODEL is empty; add one of them")
            s = self.settings
            device = resolve_device(s.DEVICE)
            self._transcriber = Transcriber(s.ASR_MODEL, device, s.ASR_BATCH_SIZE, s.HF_TOKEN)
        return self._transcriber

    def speaker_filter(self) -> SpeakerFilter:
        if self._filter is None:
            self._filter = SpeakerFilter(_reference_audio(self.spec))
        return self._filter


def _reference_audio(spec: SpeakerSpec) -> list[np.ndarray]:
    references = []
    for path in spec.references:
        try:
            references.append(load_mono_24k(Path(path)))
        except (FileNotFoundError, AudioDecodeError) as error:
            logger.warning("speaker %s: reference %s unusable for the speaker filter: %s", spec.name, path, error)
    if not references:
        raise SourceError(
            f"the speaker filter needs a reference clip of {spec.name} (tried: {', '.join(spec.references) or 'none'})"
            '; list "reference" in SPEAKERS_MANIFEST or set MIN_SPEAKER_SIMILARITY=0'
        )
    return references


def _file_digest(path: Path) -> str:
    """SHA-256 of a file read in chunks (a video may be larger than the memory one wants to spend on it)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _cache_key(recording: Path, sidecar: Path | None, spec: SpeakerSpec, settings: Settings) -> str:
    filtered = settings.MIN_SPEAKER_SIMILARITY > 0
    what = {
        "version": CACHE_VERSION,
        "recording": _file_digest(recording),
        "sidecar": _file_digest(sidecar) if sidecar else None,
        "rules": segment_rules(settings).__dict__ if sidecar is None else None,
        "asr": [settings.ASR_MODEL, spec.language] if sidecar is None else None,
        "speaker_filter": [ENCODER_NAME, [hash_audio(Path(r)) for r in spec.references]] if filtered else None,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:20]


def _segment(recording: Path, sidecar: Path | None, folder: Path, models: _Models) -> None:
    """Cut one recording into clips and write its cache entry (atomically: a crash leaves no half entry)."""
    samples = decode_recording(recording)
    duration_s = len(samples) / SAMPLE_RATE
    confidences: list[float | None]
    if sidecar is not None:
        cues = read_sidecar(sidecar)
        segments = [Segment(s.start_s, min(s.end_s, duration_s), s.text) for s in cues if s.start_s < duration_s]
        if len(segments) < len(cues):
            logger.warning(
                "%s: %d cues start after the recording's end and are left out", sidecar, len(cues) - len(segments)
            )
        confidences = [None] * len(segments)
    else:
        rules = segment_rules(models.settings)
        with tqdm(total=100.0, desc=f"{recording.name}: find speech", unit="%") as bar:
            regions = speech_regions(samples, rules, progress=lambda done: bar.update(done - bar.n))
        segments = plan_segments(regions, samples, rules)
        if not segments:
            logger.warning("%s: no speech found (VAD_THRESHOLD %s)", recording, rules.vad_threshold)
        clips = [cut(samples, s) for s in segments]
        transcribed = models.transcriber(recording).transcribe(
            clips, models.spec.language, desc=f"{recording.name}: transcribe"
        )
        segments = [Segment(s.start_s, s.end_s, text) for s, (text, _) in zip(segments, transcribed, strict=True)]
        confidences = [confidence for _, confidence in transcribed]
    clips = [cut(samples, s) for s in segments]
    similarities: list[float | None] = [None] * len(clips)
    if models.settings.MIN_SPEAKER_SIMILARITY > 0 and clips:
        speaker_filter = models.speaker_filter()
        similarities = [speaker_filter.similarity(c) for c in tqdm(clips, desc=f"{recording.name}: voices")]
    staging = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    rows = []
    for index, (segment, clip) in enumerate(zip(segments, clips, strict=True)):
        (staging / f"{index:05d}.flac").write_bytes(encode_flac(clip))
        rows.append(
            {
                "file": f"{index:05d}.flac",
                "start_s": round(segment.start_s, 3),
                "end_s": round(segment.end_s, 3),
                "text": segment.text,
                "asr_confidence": confidences[index],
                "speaker_similarity": similarities[index],
            }
        )
    entry = {"recording": str(recording), "duration_s": duration_s, "segments": rows}
    (staging / ENTRY_FILE).write_text(json.dumps(entry, indent=1))
    atomic.replace_folder(staging, folder)


def _items(entry: dict, folder: Path, recording: Path, settings: Settings) -> list[SourceItem]:
    """The cached clips of one recording as source items; a clip under a threshold carries its rejection."""
    items = []
    for index, row in enumerate(entry["segments"]):
        origin = f"{recording}@{row['start_s']:.2f}-{row['end_s']:.2f}s"
        item = SourceItem(
            id=f"{recording.stem}-{index:05d}", text=row["text"], audio=folder / row["file"], origin=origin
        )
        confidence, similarity = row["asr_confidence"], row["speaker_similarity"]
        if confidence is not None and confidence < settings.MIN_ASR_CONFIDENCE:
            item.audio, item.problem = None, "low_asr_confidence"
        elif similarity is not None and similarity < settings.MIN_SPEAKER_SIMILARITY:
            item.audio, item.problem = None, "other_speaker"
        items.append(item)
    return items


def read_recordings(spec: SpeakerSpec, settings: Settings, cache_root: Path) -> RecordingsRead:
    """Clips of every recording of ``spec.source`` (see the module docstring), cached under ``cache_root``.

    Raises SourceError for a missing source, a folder without recordings, a recording needing ASR while
    ASR_MODEL is empty or cannot load, unreadable subtitles, or a speaker filter without a usable reference.
    """
    recordings = list_recordings(spec.source)
    models = _Models(spec, settings)
    read, keys, unreadable = RecordingsRead(), set(), False
    for recording in recordings:
        sidecar = find_sidecar(recording)
        try:
            key = _cache_key(recording, sidecar, spec, settings)
            folder = cache_root / key
            atomic.restore_previous(folder)
            entry = atomic.read_json(folder / ENTRY_FILE)
            if entry is None:  # never segmented, or the entry was cut short
                _segment(recording, sidecar, folder, models)
                read.segmented.append(str(recording))
                entry = json.loads((folder / ENTRY_FILE).read_text())
        except (FileNotFoundError, PermissionError, AudioDecodeError) as error:
            read.items.append(rejected_item(recording.stem, str(recording), RowError("unreadable", str(error))))
            unreadable = True
            continue
        keys.add(key)
        read.seconds_in += entry["duration_s"]
        read.items.extend(_items(entry, folder, recording, settings))
    # An unreadable recording has no key this run: its cache may be one of the unmatched ones, so none is removed.
    stale = [] if unreadable else [p for p in cache_root.glob("*") if p.name not in keys and not p.name.startswith(".")]
    for folder in stale:
        shutil.rmtree(folder, ignore_errors=True)
    logger.info("speaker %s: %d recordings, %d segmented this run", spec.name, len(recordings), len(read.segmented))
    return read
