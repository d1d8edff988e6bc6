"""Data preparation: sources -> quality gate -> 24 kHz audio + precomputed codes -> one config per speaker.

Run once per dataset (``finetuning/data_preparation.py`` is the command). Each speaker config carries a
fingerprint of its sources' content, the processing settings and the speech tokenizer; a re-run whose
fingerprint matches skips the speaker entirely (no decoding, no encoding). A changed speaker is rebuilt alone,
and a new speaker is added without touching the others.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import shutil
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from finetuning import atomic
from finetuning.constants import SAMPLE_RATE
from finetuning.locks import folder_lock
from finetuning.preparation import schema
from finetuning.preparation.audio import (
    AudioDecodeError,
    QualityThresholds,
    encode_flac,
    load_mono_24k,
    rms_dbfs,
)
from finetuning.preparation.clip_cache import CACHE_DIR as CLIP_CACHE
from finetuning.preparation.clip_cache import ClipCache
from finetuning.preparation.clips import ClipProcessor, ClipWork, log_rejections
from finetuning.preparation.encoder import SpeechEncoder
from finetuning.preparation.fingerprint import fingerprint, hash_audio, tokenizer_identity, unreadable_files
from finetuning.preparation.from_recordings import CACHE_DIR as RECORDINGS_CACHE
from finetuning.preparation.from_recordings import read_recordings
from finetuning.preparation.languages import LanguageError, ModelLanguages, read_model_languages, resolve_labels
from finetuning.preparation.manifest import PreparationError, default_reference, resolve_speakers
from finetuning.preparation.multispeaker import clip_seconds, expand_group, group_from_entry, pick_references
from finetuning.preparation.sources import (
    SourceError,
    SourceItem,
    SpeakerSpec,
    detect_format,
    read_source,
    unique_ids,
)
from finetuning.preparation.writing import SpeakerReport, format_report, make_row, write_card, write_split
from finetuning.resources import is_hub_id
from finetuning.settings import Settings, SettingsError
from finetuning.settings_rules import check_speakers

logger = logging.getLogger(__name__)

MIN_REFERENCE_S = 1.0


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


def plan_speakers(
    settings: Settings, names: Sequence[str] | None = None
) -> list[tuple[SpeakerSpec, list[SourceItem] | None]]:
    """(spec, items) for every speaker config to prepare: a single-speaker name gives its spec (items read
    later), a multi-speaker manifest entry (``speaker_column``) its speakers with their items, read once.
    Raises PreparationError for an unreadable group source or two configs of one name."""
    manifest_path = Path(settings.SPEAKERS_MANIFEST) if settings.SPEAKERS_MANIFEST else None
    manifest = json.loads(manifest_path.read_text(encoding="utf-8")) if manifest_path and manifest_path.exists() else {}
    plan: list[tuple[SpeakerSpec, list[SourceItem] | None]] = []
    for name in names or settings.TRAIN_SPEAKERS:
        try:
            group = group_from_entry(name, manifest.get(name, {}))
            if group is None:
                plan.extend((spec, None) for spec in resolve_speakers(settings, [name]))
            else:
                plan.extend(expand_group(group, settings.HF_TOKEN)[0])
        except (SourceError, OSError) as error:
            raise PreparationError(f"speaker {name}: {error}") from error
    counts = Counter(spec.name for spec, _ in plan)
    twice = sorted(name for name, count in counts.items() if count > 1)
    if twice:
        raise PreparationError(f"configs {twice} come from more than one manifest entry; rename one")
    return plan


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


def _load_references(spec: SpeakerSpec, items: list[SourceItem]) -> list[tuple[str, np.ndarray]]:
    candidates: list[Path | bytes] = [Path(r) for r in spec.references]
    for item in items:
        candidates.extend(item.reference_audio)
    references, seen = [], set()
    for candidate in candidates:
        key = hash_audio(candidate)
        if key in seen or key.startswith("unreadable") or key == "none":
            continue
        seen.add(key)
        try:
            samples = load_mono_24k(candidate)
        except (FileNotFoundError, AudioDecodeError) as error:
            logger.warning("speaker %s: reference %s unusable: %s", spec.name, candidate, error)
            continue
        if len(samples) / SAMPLE_RATE < MIN_REFERENCE_S or not np.isfinite(rms_dbfs(samples)):
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


def _label(item: SourceItem | None, spec: SpeakerSpec) -> str:
    """The language label a row carries before resolution: the item's, else the manifest's, else auto."""
    return str((item.language if item else None) or spec.language or schema.UNKNOWN_LANGUAGE)


def resolve_languages(
    spec: SpeakerSpec, items: list[SourceItem], model_languages: Callable[[], ModelLanguages]
) -> tuple[dict[str, str], list[str]]:
    """``languages.resolve_labels`` for every label of the speaker's items and manifest entry; a refused label
    raises PreparationError naming the speaker, the label and the allowed names."""
    try:
        return resolve_labels({_label(item, spec) for item in items} | {_label(None, spec)}, model_languages, spec.name)
    except LanguageError as error:
        raise PreparationError(f"speaker {spec.name}: {error}") from error


def prepare_speaker(
    spec: SpeakerSpec,
    settings: Settings,
    processor: ClipProcessor,
    output_dir: Path,
    tokenizer_id: str,
    max_samples: int | None = None,
    model_languages: Callable[[], ModelLanguages] | None = None,
    items: list[SourceItem] | None = None,
) -> SpeakerReport:
    """Prepare one speaker's config under ``output_dir/<speaker>`` unless its fingerprint is unchanged.

    ``max_samples`` keeps only the first N source items (quick trials); it changes the fingerprint.
    ``model_languages`` gives the Base model's language table (default: read from INIT_MODEL_PATH when needed).
    ``items`` are the speaker's source items when already read (a multi-speaker source); else the source is read.
    """
    seconds_in = None  # known up front for recordings; measured from the clips' headers otherwise
    if items is None:
        try:
            if (spec.format or detect_format(spec.source)) == "recordings":
                recorded = read_recordings(spec, settings, output_dir / RECORDINGS_CACHE / spec.name)
                items, seconds_in = recorded.items, recorded.seconds_in
            else:
                column = spec.instructions.column
                items = list(
                    read_source(spec.source, spec.format, spec.name, settings.HF_TOKEN, instruct_column=column)
                )
        except (SourceError, OSError) as error:
            raise PreparationError(f"speaker {spec.name}: cannot read {spec.source}: {error}") from error
    named = sorted({item.speaker for item in items if item.speaker})
    if len(named) > 1:
        logger.warning(
            "speaker %s: its source names %d speakers (%s); all rows are used as %s. To split them, declare "
            '"speaker_column" for this source in SPEAKERS_MANIFEST',
            spec.name,
            len(named),
            ", ".join(named[:5]),
            spec.name,
        )
    if max_samples is not None:
        items = items[:max_samples]
    duplicate_ids = unique_ids(spec.name, items)
    print_ = fingerprint(spec, items, settings, tokenizer_id)
    atomic.restore_previous(output_dir / spec.name)  # a config a crash left aside
    info_path = output_dir / spec.name / schema.INFO_FILE
    info = atomic.read_json(info_path)
    if info is None and info_path.exists():
        logger.warning("speaker %s: %s is damaged (cut short by a crash?); preparing again", spec.name, info_path)
    if info is not None:
        if info.get("fingerprint") == print_:
            logger.info("speaker %s: unchanged (fingerprint %s), nothing to prepare", spec.name, print_[:12])
            return SpeakerReport.from_summary(spec.name, False, print_, info.get("summary", {}))
        unreadable = unreadable_files(spec, items)
        if unreadable:  # a read error, not a change of the source: the good config stays
            raise PreparationError(
                f"speaker {spec.name}: {len(unreadable)} file(s) exist but cannot be read (first: {unreadable[0]}); "
                "the prepared config is kept as it is. Fix the access (permissions, disk, network share) and run again"
            )

    staging = output_dir / f".{spec.name}.tmp"
    staged = atomic.read_json(staging / schema.INFO_FILE)
    if staged is not None and staged.get("fingerprint") == print_:  # finished by a run killed before the swap
        logger.info("speaker %s: a finished staging folder matches; put in place without encoding", spec.name)
        atomic.replace_folder(staging, output_dir / spec.name)
        return SpeakerReport.from_summary(spec.name, True, print_, staged.get("summary", {}))
    if model_languages is None:
        model_languages = functools.cache(lambda: read_model_languages(settings.INIT_MODEL_PATH, settings.HF_TOKEN))
    languages, auto_prefix = resolve_languages(spec, items, model_languages)

    references = _load_references(spec, items)
    if not references and not spec.auto_references:
        tried = ", ".join(spec.references) or "none"
        default = spec.references == (default_reference(settings, spec.name),)
        fix = f"put one at {spec.references[0]} or list" if default else "fix the"
        raise PreparationError(
            f"speaker {spec.name}: no usable reference clip of at least {MIN_REFERENCE_S:.0f} s (tried: {tried}); "
            f'{fix} "reference" paths of this speaker in SPEAKERS_MANIFEST'
        )
    work = ClipWork(
        limits=quality_thresholds(settings),
        normalize_loudness=settings.NORMALIZE_LOUDNESS,
        target_lufs=settings.TARGET_LOUDNESS_LUFS,
        true_peak_ceiling_dbtp=settings.TRUE_PEAK_CEILING_DBTP,
        measure_cleanliness=not references,
    )
    cache = ClipCache(output_dir / CLIP_CACHE / spec.name, work, tokenizer_id)
    results = processor.run(items, work, desc=f"{spec.name}: gate and encode", cache=cache)
    log_rejections(results, items, spec.name)
    rejected = Counter(result.reason for result in results if result.reason is not None)
    kept = [(items[result.index], result) for result in results if result.reason is None]
    if not kept:
        reasons = ", ".join(f"{k}: {v}" for k, v in rejected.most_common()) or "the source has no rows"
        raise PreparationError(
            f"speaker {spec.name}: no clip passed the quality gate ({len(items)} read; {reasons}). Check the "
            f"source {spec.source} and the gate settings (MIN/MAX_DURATION_S, MAX_SILENCE_FRACTION, ...)."
        )
    if references:
        reference_rows = [(ref_id, encode_flac(samples), len(samples)) for ref_id, samples in references]
        ref_codes = processor.encoder.encode([samples for _, samples in references], desc=f"{spec.name}: references")
    else:
        picked = pick_references([result.cleanliness for _, result in kept])
        reference_rows = [(f"reference-{kept[i][0].id}", kept[i][1].flac, kept[i][1].num_samples) for i in picked]
        ref_codes = [kept[i][1].codes for i in picked]
        logger.info("speaker %s: no reference given, picked %s", spec.name, [kept[i][0].id for i in picked])

    splits = assign_splits([i.id for i, _ in kept], [i.split for i, _ in kept], settings, spec.name)
    rows: dict[str, list[dict]] = {name: [] for name in schema.ALL_SPLITS}
    for (item, clip), split in zip(kept, splits, strict=True):
        language = languages[_label(item, spec)]
        rows[split].append(
            make_row(
                spec.name,
                item.id,
                item.text.strip(),
                language,
                clip.flac,
                clip.num_samples,
                clip.codes,
                spec.instructions.resolve(item.instruct),
            )
        )
    for (ref_id, flac, num_samples), code in zip(reference_rows, ref_codes, strict=True):
        rows[schema.REFERENCE_SPLIT].append(
            make_row(spec.name, ref_id, "", languages[_label(None, spec)], flac, num_samples, code)
        )

    report = SpeakerReport(
        speaker=spec.name,
        prepared=True,
        fingerprint=print_,
        clips_total=len(items),
        kept=len(kept),
        hours_in=round((seconds_in or sum(clip_seconds(item.audio) for item in items)) / 3600.0, 6),
        hours_kept=round(sum(clip.num_samples for _, clip in kept) / SAMPLE_RATE / 3600.0, 6),
        rejected=dict(rejected),
        splits={name: len(r) for name, r in rows.items() if r},
        references=len(reference_rows),
        duplicate_ids=duplicate_ids,
        languages=dict(Counter(languages[_label(item, spec)] for item, _ in kept)),
        auto_prefix_languages=auto_prefix,
    )
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    for split, split_rows in rows.items():
        if split_rows:
            write_split(split_rows, staging, split, print_, settings.MAX_SHARD_SIZE_MB * 1e6)
    summary = report.as_dict()
    summary.pop("prepared_this_run")
    atomic.fsync_tree(staging)  # the shards are on disk before the info that marks the staging folder finished
    atomic.write_json(staging / schema.INFO_FILE, {"fingerprint": print_, "summary": summary}, indent=2)
    atomic.replace_folder(staging, output_dir / spec.name)  # the old config waits aside until the new one is in
    cache.clear()
    return report


def prepare_dataset(
    settings: Settings,
    speakers: Sequence[str] | None = None,
    encoder: SpeechEncoder | None = None,
    output_dir: str | Path | None = None,
    max_samples: int | None = None,
    report: Callable[[str], None] = print,
    processor: ClipProcessor | None = None,
) -> list[SpeakerReport]:
    """Prepare every requested speaker into one dataset folder; returns one report per speaker.

    The dataset card and ``preparation_summary.json`` are rewritten (atomically) as each speaker finishes, so
    the configs prepared so far stay loadable whatever happens next. A speaker that fails (unreadable source, no
    usable reference clip, no clip left after the gate, a refused language) does not stop the others: once they
    are done, PreparationError names every failed speaker and its fix. Single bad clips never fail a speaker:
    they are counted by reason in the summary and logged. ``processor`` (a caller's, left open) runs the clip
    work; by default one is made for PREPARATION_WORKERS processes and closed at the end.
    """
    try:  # each name becomes a folder of DATASET_DIR: "../x" would write outside it
        check_speakers("speakers", tuple(speakers or ()) or settings.TRAIN_SPEAKERS)
    except SettingsError as error:
        raise PreparationError(str(error)) from None
    output = Path(output_dir or settings.DATASET_DIR)
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise PreparationError(f"DATASET_DIR={output} cannot be created ({error.strerror}); choose another") from error
    with folder_lock(output, "DATASET_DIR"):  # FolderBusy while another preparation writes there
        return _prepare_all(settings, speakers, encoder, output, max_samples, report, processor)


def _prepare_all(
    settings: Settings,
    speakers: Sequence[str] | None,
    encoder: SpeechEncoder | None,
    output: Path,
    max_samples: int | None,
    report: Callable[[str], None],
    processor: ClipProcessor | None,
) -> list[SpeakerReport]:
    plan = plan_speakers(settings, speakers)
    if encoder is None:
        encoder = SpeechEncoder(settings.TOKENIZER_PATH, settings.DEVICE, settings.ENCODE_BATCH_SIZE, settings.HF_TOKEN)
    if not is_hub_id(encoder.tokenizer_path):
        encoder.folder()  # a wrong local TOKENIZER_PATH fails before any speaker is read
    own_processor = processor is None
    processor = processor or ClipProcessor(encoder, settings.PREPARATION_WORKERS)
    tokenizer_id = tokenizer_identity(settings.TOKENIZER_PATH)
    model_languages = functools.cache(lambda: read_model_languages(settings.INIT_MODEL_PATH, settings.HF_TOKEN))
    reports, failures = [], []
    configs = [spec.name for spec, _ in plan]
    if configs != list(speakers or settings.TRAIN_SPEAKERS):
        report(f"speaker configs: {len(configs)}; train on them with TRAIN_SPEAKERS={','.join(configs)}")
    try:
        for spec, items in plan:
            try:
                result = prepare_speaker(
                    spec, settings, processor, output, tokenizer_id, max_samples, model_languages, items
                )
            except PreparationError as error:
                failures.append(str(error))
                continue
            reports.append(result)
            write_card(output)
            report(format_report(result))
    finally:
        if own_processor:
            processor.close()
    if failures:
        done = f"; prepared: {', '.join(r.speaker for r in reports)}" if reports else ""
        raise PreparationError(" | ".join(failures) + done)
    write_card(output)
    return reports
