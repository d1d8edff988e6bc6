"""Data preparation: sources -> quality gate -> 24 kHz audio + precomputed codes -> one config per speaker.

Run once per dataset (``finetuning/data_preparation.py`` is the command). Each speaker config carries a
fingerprint of its sources' content, the processing settings and the speech tokenizer; a re-run whose
fingerprint matches skips the speaker entirely (no decoding, no encoding). A changed speaker is rebuilt alone,
and a new speaker is added without touching the others.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from finetuning.preparation import schema
from finetuning.preparation.audio import (
    TARGET_SAMPLE_RATE,
    AudioDecodeError,
    QualityThresholds,
    encode_flac,
    load_mono_24k,
    normalize_loudness,
    quality_issue,
    rms_dbfs,
)
from finetuning.preparation.sources import FORMATS, SourceError, SourceItem, read_source
from finetuning.settings import Settings

logger = logging.getLogger(__name__)

PROCESSING_VERSION = 1
MIN_REFERENCE_S = 1.0


class PreparationError(RuntimeError):
    """Preparation cannot continue for a speaker; the message names the speaker and what to fix."""


@dataclass(frozen=True)
class SpeakerSpec:
    """Where one speaker's data comes from."""

    name: str
    source: str
    format: str | None
    language: str | None
    references: tuple[str, ...]


@dataclass
class SpeakerReport:
    """What happened to one speaker in one run (JSON-serialisable via ``as_dict``)."""

    speaker: str
    prepared: bool
    fingerprint: str
    clips_total: int = 0
    kept: int = 0
    hours_kept: float = 0.0
    rejected: dict[str, int] = field(default_factory=dict)
    splits: dict[str, int] = field(default_factory=dict)
    references: int = 0

    def as_dict(self) -> dict:
        return {
            "speaker": self.speaker,
            "prepared_this_run": self.prepared,
            "fingerprint": self.fingerprint,
            "clips_total": self.clips_total,
            "kept": self.kept,
            "hours_kept": self.hours_kept,
            "rejected_total": sum(self.rejected.values()),
            "rejected": dict(sorted(self.rejected.items())),
            "splits": self.splits,
            "references": self.references,
        }


def quality_thresholds(settings: Settings) -> QualityThresholds:
    return QualityThresholds(
        min_duration_s=settings.MIN_DURATION_S,
        max_duration_s=settings.MAX_DURATION_S,
        max_silence_fraction=settings.MAX_SILENCE_FRACTION,
        max_clipped_fraction=settings.MAX_CLIPPED_FRACTION,
        min_rms_dbfs=settings.MIN_RMS_DBFS,
        min_chars_per_s=settings.MIN_CHARS_PER_S,
        max_chars_per_s=settings.MAX_CHARS_PER_S,
    )


def resolve_speakers(settings: Settings, names: Sequence[str] | None = None) -> list[SpeakerSpec]:
    """Speaker specs from SPEAKERS_MANIFEST entries, else the convention ``VOICES_DIR/<speaker>/``.

    A manifest is a JSON object ``{speaker: {"source": ..., "format": ..., "language": ..., "reference": [...]}}``;
    every key is optional. Without an entry, the source is ``VOICES_DIR/<speaker>`` (``metadata.jsonl`` or an
    LJSpeech-style folder) and the reference is ``VOICES_DIR/<speaker>.wav``.
    """
    manifest: dict = {}
    if settings.SPEAKERS_MANIFEST:
        path = Path(settings.SPEAKERS_MANIFEST)
        if not path.exists():
            raise PreparationError(f"SPEAKERS_MANIFEST={path} does not exist")
        manifest = json.loads(path.read_text(encoding="utf-8"))
    voices = Path(settings.VOICES_DIR)
    specs = []
    for name in names or settings.TRAIN_SPEAKERS:
        entry = manifest.get(name, {})
        fmt = entry.get("format")
        if fmt is not None and fmt not in FORMATS:
            raise PreparationError(f"speaker {name}: format {fmt!r} in the manifest is not one of {FORMATS}")
        refs = entry.get("reference", [str(voices / f"{name}.wav")])
        specs.append(
            SpeakerSpec(
                name=name,
                source=str(entry.get("source", voices / name)),
                format=fmt,
                language=entry.get("language"),
                references=tuple([refs] if isinstance(refs, str) else refs),
            )
        )
    return specs


def _hash_audio(audio: Path | bytes | None) -> str:
    if audio is None:
        return "none"
    if isinstance(audio, bytes):
        return hashlib.sha256(audio).hexdigest()
    try:
        return hashlib.sha256(Path(audio).read_bytes()).hexdigest()
    except OSError:
        return f"unreadable:{audio}"


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
        "TARGET_LOUDNESS_DBFS",
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
        "references": [_hash_audio(Path(r)) for r in spec.references],
    }
    digest.update(json.dumps(header, sort_keys=True).encode())
    for item in items:
        row = [item.id, item.text, item.language, item.split, _hash_audio(item.audio)]
        row += [_hash_audio(r) for r in item.reference_audio]
        digest.update(json.dumps(row).encode())
    return digest.hexdigest()


def assign_splits(ids: list[str], given: list[str | None], settings: Settings, speaker: str) -> list[str]:
    """Keep splits the source gives; otherwise a deterministic seeded split per speaker.

    The seeded split ranks clips by a hash of (seed, speaker, id), so it does not depend on input order or on
    the machine. At least one clip stays in train.
    """
    if any(g is not None for g in given):
        return [g or "train" for g in given]
    count = len(ids)

    def held_out(fraction: float) -> int:
        return 0 if fraction <= 0 or count < 2 else max(1, round(fraction * count))

    n_validation = held_out(settings.VALIDATION_FRACTION)
    n_test = min(held_out(settings.TEST_FRACTION), max(0, count - 1 - n_validation))
    order = sorted(range(count), key=lambda i: hashlib.sha256(f"{settings.SEED}:{speaker}:{ids[i]}".encode()).digest())
    splits = ["train"] * count
    for rank, index in enumerate(order):
        if rank < n_validation:
            splits[index] = "validation"
        elif rank < n_validation + n_test:
            splits[index] = "test"
    return splits


class SpeechEncoder:
    """Loads the 12 Hz speech tokenizer once, on first use, and encodes 24 kHz clips in batches."""

    def __init__(self, tokenizer_path: str, device: str = "auto", batch_size: int = 8, token: str | None = None):
        self.tokenizer_path = tokenizer_path
        self.device = device
        self.batch_size = batch_size
        self.token = token or None
        self.clips_encoded = 0
        self._tokenizer = None

    def _load(self):
        import torch
        from qwen_tts import Qwen3TTSTokenizer

        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        kwargs = {"token": self.token} if self.token else {}
        tokenizer = Qwen3TTSTokenizer.from_pretrained(self.tokenizer_path, **kwargs)
        tokenizer.model.to(device).eval()
        tokenizer.device = torch.device(device)
        return tokenizer

    def encode(self, clips: list[np.ndarray], desc: str = "encoding") -> list[np.ndarray]:
        """24 kHz mono clips -> codes, each (frames, 16) int16. Batches sorted by length to limit padding."""
        if self._tokenizer is None:
            self._tokenizer = self._load()
        order = sorted(range(len(clips)), key=lambda i: len(clips[i]))
        codes: list[np.ndarray | None] = [None] * len(clips)
        with tqdm(total=len(clips), desc=desc, unit="clip") as bar:
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                encoded = self._tokenizer.encode([clips[i] for i in batch], sr=TARGET_SAMPLE_RATE)
                for index, code in zip(batch, encoded.audio_codes, strict=True):
                    codes[index] = code.cpu().numpy().astype(np.int16)
                bar.update(len(batch))
        self.clips_encoded += len(clips)
        return codes  # type: ignore[return-value]


def _load_references(spec: SpeakerSpec, items: list[SourceItem]) -> list[tuple[str, np.ndarray]]:
    candidates: list[Path | bytes] = [Path(r) for r in spec.references]
    for item in items:
        candidates.extend(item.reference_audio)
    references, seen = [], set()
    for candidate in candidates:
        key = _hash_audio(candidate)
        if key in seen or key.startswith("unreadable") or key == "none":
            continue
        seen.add(key)
        try:
            samples = load_mono_24k(candidate)
        except (FileNotFoundError, AudioDecodeError) as error:
            logger.warning("speaker %s: reference %s unusable: %s", spec.name, candidate, error)
            continue
        if len(samples) / TARGET_SAMPLE_RATE < MIN_REFERENCE_S or not np.isfinite(rms_dbfs(samples)):
            logger.warning(
                "speaker %s: reference %s is shorter than %.1f s or silent",
                spec.name,
                candidate,
                MIN_REFERENCE_S,
            )
            continue
        name = candidate.stem if isinstance(candidate, Path) else f"ref{len(references)}"
        references.append((f"reference-{name}", samples))
    return references


def _gate(spec: SpeakerSpec, items: list[SourceItem], settings: Settings):
    limits = quality_thresholds(settings)
    kept, rejected = [], Counter()
    for item in tqdm(items, desc=f"{spec.name}: quality gate", unit="clip"):
        reason = None
        samples = None
        if item.audio is None:
            reason = "missing_file"
        else:
            try:
                samples = load_mono_24k(item.audio)
            except FileNotFoundError:
                reason = "missing_file"
            except AudioDecodeError:
                reason = "unreadable"
        if reason is None:
            reason = quality_issue(samples, item.text, limits)
        if reason is not None:
            rejected[reason] += 1
            logger.info("speaker %s: rejected %s (%s): %s", spec.name, item.id, item.origin, reason)
            continue
        if settings.NORMALIZE_LOUDNESS:
            samples = normalize_loudness(samples, settings.TARGET_LOUDNESS_DBFS)
        kept.append((item, samples))
    return kept, rejected


def _unique_ids(items: list[SourceItem]) -> None:
    seen: Counter = Counter()
    for item in items:
        seen[item.id] += 1
        if seen[item.id] > 1:
            item.id = f"{item.id}-{seen[item.id]}"


def _write_split(rows: list[dict], folder: Path, split: str, fingerprint: str, max_shard_bytes: float) -> None:
    import datasets

    features = schema.features()
    shards: list[list[dict]] = [[]]
    size = 0.0
    for row in rows:
        row_bytes = len(row["audio"]["bytes"]) + row["num_frames"] * schema.NUM_CODEBOOKS * 2 + len(row["text"])
        if shards[-1] and size + row_bytes > max_shard_bytes:
            shards.append([])
            size = 0.0
        shards[-1].append(row)
        size += row_bytes
    for index, shard in enumerate(shards):
        columns = {name: [row[name] for row in shard] for name in features}
        dataset = datasets.Dataset.from_dict(columns, features=features)
        dataset.to_parquet(str(folder / schema.shard_name(split, fingerprint, index, len(shards))))


def _row(speaker: str, clip_id: str, text: str, language: str, samples: np.ndarray, codes: np.ndarray) -> dict:
    return {
        "id": clip_id,
        "speaker": speaker,
        "text": text,
        "language": language,
        "audio": {"bytes": encode_flac(samples), "path": f"{clip_id}.flac"},
        "duration_s": len(samples) / TARGET_SAMPLE_RATE,
        "num_frames": int(codes.shape[0]),
        "audio_codes": codes.tolist(),
    }


def prepare_speaker(
    spec: SpeakerSpec,
    settings: Settings,
    encoder: SpeechEncoder,
    output_dir: Path,
    tokenizer_id: str,
    max_samples: int | None = None,
) -> SpeakerReport:
    """Prepare one speaker's config under ``output_dir/<speaker>`` unless its fingerprint is unchanged.

    ``max_samples`` keeps only the first N source items (quick trials); it changes the fingerprint.
    """
    try:
        items = list(read_source(spec.source, spec.format, spec.name, settings.HF_TOKEN))
    except (SourceError, OSError) as error:
        raise PreparationError(f"speaker {spec.name}: cannot read {spec.source}: {error}") from error
    if max_samples is not None:
        items = items[:max_samples]
    _unique_ids(items)
    print_ = fingerprint(spec, items, settings, tokenizer_id)
    info_path = output_dir / spec.name / schema.INFO_FILE
    if info_path.exists():
        info = json.loads(info_path.read_text())
        if info.get("fingerprint") == print_:
            logger.info("speaker %s: unchanged (fingerprint %s), nothing to prepare", spec.name, print_[:12])
            report = SpeakerReport(speaker=spec.name, prepared=False, fingerprint=print_)
            summary = info.get("summary", {})
            report.clips_total = summary.get("clips_total", 0)
            report.kept = summary.get("kept", 0)
            report.hours_kept = summary.get("hours_kept", 0.0)
            report.rejected = summary.get("rejected", {})
            report.splits = summary.get("splits", {})
            report.references = summary.get("references", 0)
            return report

    references = _load_references(spec, items)
    if not references:
        tried = ", ".join(spec.references) or "none"
        raise PreparationError(
            f"speaker {spec.name}: no usable reference clip (tried: {tried}). Put a clean clip of at least "
            f'{MIN_REFERENCE_S:.0f} s at {Path(settings.VOICES_DIR) / (spec.name + ".wav")} or list "reference" '
            "for this speaker in SPEAKERS_MANIFEST."
        )
    kept, rejected = _gate(spec, items, settings)
    if not kept:
        reasons = ", ".join(f"{k}: {v}" for k, v in rejected.most_common()) or "the source has no rows"
        raise PreparationError(
            f"speaker {spec.name}: no clip passed the quality gate ({len(items)} read; {reasons}). Check the "
            f"source {spec.source} and the gate settings (MIN/MAX_DURATION_S, MAX_SILENCE_FRACTION, ...)."
        )
    codes = encoder.encode([samples for _, samples in kept], desc=f"{spec.name}: encoding")
    ref_codes = encoder.encode([samples for _, samples in references], desc=f"{spec.name}: references")

    splits = assign_splits([i.id for i, _ in kept], [i.split for i, _ in kept], settings, spec.name)
    rows: dict[str, list[dict]] = {name: [] for name in schema.ALL_SPLITS}
    for (item, samples), code, split in zip(kept, codes, splits, strict=True):
        language = item.language or spec.language or schema.UNKNOWN_LANGUAGE
        rows[split].append(_row(spec.name, item.id, item.text.strip(), language, samples, code))
    for (ref_id, samples), code in zip(references, ref_codes, strict=True):
        rows[schema.REFERENCE_SPLIT].append(
            _row(spec.name, ref_id, "", spec.language or schema.UNKNOWN_LANGUAGE, samples, code)
        )

    report = SpeakerReport(
        speaker=spec.name,
        prepared=True,
        fingerprint=print_,
        clips_total=len(items),
        kept=len(kept),
        hours_kept=round(sum(len(s) for _, s in kept) / TARGET_SAMPLE_RATE / 3600.0, 6),
        rejected=dict(rejected),
        splits={name: len(r) for name, r in rows.items() if r},
        references=len(references),
    )
    staging = output_dir / f".{spec.name}.tmp"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    for split, split_rows in rows.items():
        if split_rows:
            _write_split(split_rows, staging, split, print_, settings.MAX_SHARD_SIZE_MB * 1e6)
    summary = report.as_dict()
    summary.pop("prepared_this_run")
    (staging / schema.INFO_FILE).write_text(json.dumps({"fingerprint": print_, "summary": summary}, indent=2))
    final = output_dir / spec.name
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)
    return report


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


def prepare_dataset(
    settings: Settings,
    speakers: Sequence[str] | None = None,
    encoder: SpeechEncoder | None = None,
    output_dir: str | Path | None = None,
    max_samples: int | None = None,
    report: Callable[[str], None] = print,
) -> list[SpeakerReport]:
    """Prepare every requested speaker into one dataset folder; returns one report per speaker.

    Raises PreparationError (naming the speaker and the fix) for an unreadable source, a speaker without a
    usable reference clip, or a speaker left with no clip after the gate. Single bad clips never abort the run:
    they are counted by reason in the summary and logged.
    """
    output = Path(output_dir or settings.DATASET_DIR)
    output.mkdir(parents=True, exist_ok=True)
    specs = resolve_speakers(settings, speakers)
    if encoder is None:
        encoder = SpeechEncoder(settings.TOKENIZER_PATH, settings.DEVICE, settings.ENCODE_BATCH_SIZE, settings.HF_TOKEN)
    tokenizer_id = tokenizer_identity(settings.TOKENIZER_PATH)
    reports = []
    for spec in specs:
        result = prepare_speaker(spec, settings, encoder, output, tokenizer_id, max_samples)
        reports.append(result)
        report(_format_report(result))
    write_card(output)
    return reports


def _format_report(r: SpeakerReport) -> str:
    if not r.prepared:
        return f"{r.speaker}: unchanged, skipped ({r.kept} clips, {r.hours_kept * 60:.1f} min)"
    rejected = ", ".join(f"{k}={v}" for k, v in sorted(r.rejected.items())) or "none"
    splits = ", ".join(f"{k}={v}" for k, v in r.splits.items())
    return (
        f"{r.speaker}: kept {r.kept}/{r.clips_total} clips ({r.hours_kept * 60:.2f} min); "
        f"splits: {splits}; rejected: {rejected}"
    )
