"""Training data: prepared speaker configs -> tokenized examples -> padded batches.

Reads the per-speaker configs written by data preparation, from the local DATASET_DIR or, when HF_DATASET_REPO
is set, from the Hub. Training never decodes audio for codes: ``audio_codes`` were precomputed.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from finetuning import atomic
from finetuning.constants import NUM_CODEBOOKS, SAMPLE_RATE
from finetuning.preparation import schema
from finetuning.settings import Settings
from finetuning.training.layout import instruct_text
from finetuning.training.step import assistant_text

logger = logging.getLogger(__name__)

TRAIN_COLUMNS = ["id", "speaker", "text", "language", "num_frames", "audio_codes", "instruct"]


class DataError(ValueError):
    """The prepared data cannot be used for training; the message names the speaker/split and the fix."""


COMMIT_LENGTH = 40  # hex digits of a full git commit id
HEX_DIGITS = "0123456789abcdef"


def pin_dataset_revision(settings: Settings, accelerator, api=None) -> Settings:
    """``settings`` with HF_DATASET_REVISION set to the Hub dataset's commit id, resolved once (by the main process,
    then shared), so that every process reads the same revision, the saved settings name it and a resume can tell
    when the repo moved on. Unchanged for a local dataset or a full commit id. ``api``: a ``huggingface_hub.HfApi``
    (default: one with HF_TOKEN). Raises DataError naming HF_DATASET_REPO when the revision cannot be resolved."""
    revision = settings.HF_DATASET_REVISION
    if not settings.HF_DATASET_REPO or (
        len(revision) == COMMIT_LENGTH and all(c in "0123456789abcdef" for c in revision)
    ):
        return settings
    commit, problem = None, None
    if accelerator.is_main_process:
        from huggingface_hub import HfApi

        api = api or HfApi(token=settings.HF_TOKEN or None)
        try:
            commit = api.dataset_info(settings.HF_DATASET_REPO, revision=revision or None).sha
        except Exception as error:  # offline, unknown repo or revision, no access: huggingface_hub raises many types
            problem = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    if accelerator.num_processes > 1:  # every process reads the one commit the main process found
        from accelerate.utils import broadcast_object_list

        commit, problem = broadcast_object_list([commit, problem])
    if commit is None:
        raise DataError(
            f"HF_DATASET_REPO={settings.HF_DATASET_REPO}: cannot resolve revision {revision or 'main'} ({problem}); "
            "check the repo id, HF_TOKEN and the network, or set HF_DATASET_REVISION to a full commit id"
        )
    logger.info("HF_DATASET_REPO=%s: training reads revision %s", settings.HF_DATASET_REPO, commit)
    return dataclasses.replace(settings, HF_DATASET_REVISION=commit)


def load_split(
    settings: Settings,
    speaker: str,
    split: str,
    columns: list[str] | None = None,
    streaming: bool = False,
    read_rows: int | None = None,
):
    """One speaker's split as a 🤗 ``Dataset`` (``IterableDataset`` when ``streaming``); None when the config has
    no such split. ``columns`` are projected at load: other columns (the audio) are never read; a stream decodes
    ``read_rows`` parquet rows at a time (default: one row group).

    Local folders are read from the shards of the config's current fingerprint (``prepare_info.json``), so a
    re-prepared speaker is never served from a stale cache. Columns added after schema 1
    (``schema.OPTIONAL_COLUMNS``) are left out of ``columns`` when a dataset lacks them (rows then lack the key).
    """
    import datasets

    if settings.HF_DATASET_REPO:
        try:
            projection = {"columns": columns, "batch_size": read_rows} if streaming and columns else {}
            ds = datasets.load_dataset(
                settings.HF_DATASET_REPO,
                name=speaker,
                split=split,
                streaming=streaming,
                token=settings.HF_TOKEN or None,
                revision=settings.HF_DATASET_REVISION or None,
                **projection,
            )
        except ValueError as error:  # unknown split
            if "split" in str(error).lower():
                return None
            raise
        if streaming or not columns:
            return ds
        return ds.select_columns([c for c in columns if c in ds.column_names or c not in schema.OPTIONAL_COLUMNS])
    root = Path(settings.DATASET_DIR)
    info_path = root / speaker / schema.INFO_FILE
    if not info_path.exists():
        raise DataError(
            f"speaker {speaker} is not prepared in {root} (no {schema.INFO_FILE}); run "
            "`uv run python finetuning/data_preparation.py` first or set HF_DATASET_REPO"
        )
    info = atomic.read_json(info_path)
    if not isinstance(info, dict) or "fingerprint" not in info:
        raise DataError(
            f"{info_path} is damaged (cut short by a crash?); run `uv run python finetuning/data_preparation.py "
            f"--speaker {speaker}` again"
        )
    fingerprint = info["fingerprint"]
    files = sorted((root / speaker).glob(schema.split_pattern(speaker, split, fingerprint).split("/", 1)[1]))
    if not files:
        return None
    if columns:
        import pyarrow.parquet as pq

        present = set(pq.read_schema(files[0]).names)
        columns = [c for c in columns if c in present or c not in schema.OPTIONAL_COLUMNS]
    if streaming:
        return datasets.load_dataset(
            "parquet",
            data_files=[str(f) for f in files],
            split="train",
            streaming=True,
            columns=columns,
            batch_size=read_rows,
        )
    quiet = not datasets.utils.are_progress_bars_disabled()
    if quiet:  # one bar per tiny shard read is noise, not progress
        datasets.utils.disable_progress_bars()
    try:
        return datasets.Dataset.from_parquet([str(f) for f in files], columns=columns)
    finally:
        if quiet:
            datasets.utils.enable_progress_bars()


def load_references(settings: Settings, speaker: str, columns: list[str] | None = None):
    """The speaker's reference split (its reference clips); raises DataError when it has none."""
    refs = load_split(settings, speaker, schema.REFERENCE_SPLIT, columns)
    if refs is None or len(refs) == 0:
        raise DataError(f"speaker {speaker} has no reference split; re-run data preparation")
    return refs


def load_reference_audio(settings: Settings, speaker: str) -> list[np.ndarray]:
    """The speaker's reference clips as (samples,) float32 arrays at 24 kHz; DataError for a clip that is not
    24 kHz mono, as preparation writes them.

    The clips are read with soundfile: the dataset's own audio decoding passes every clip through
    ``librosa.to_mono``, whose first call imports librosa's audio module and loads its numba kernels, seconds
    at the start of every run."""
    import io

    import soundfile as sf
    from datasets import Audio

    clips = []
    for row in load_references(settings, speaker).cast_column("audio", Audio(decode=False)):
        stored = row["audio"]
        samples, sample_rate = sf.read(io.BytesIO(stored["bytes"]) if stored["bytes"] else stored["path"])
        if samples.ndim != 1 or sample_rate != SAMPLE_RATE:
            raise DataError(
                f"speaker {speaker}: reference clip {row.get('id', stored['path'])} is not {SAMPLE_RATE} Hz mono "
                f"({sample_rate} Hz, shape {samples.shape}); re-run data preparation"
            )
        clips.append(samples.astype(np.float32))
    return clips


@dataclass
class Example:
    """One utterance ready for the step: text_ids (Lt,) long, codes (T, 16) int16 (codes are < 2048; ``collate``
    widens them), a quarter of the memory of int64. ``language`` is the row's, or "auto" when the sample's draw
    trains the languageless prefix; ``layout`` the text layout drawn for it (None: the step's); ``instruct_ids``
    (Li,) long the tokenised user turn of its instruction (``layout.instruct_text``), None without one. Voice-clone
    training (``training.clone``) adds the reference clip's row and x-vector (D,), and in ICL mode its transcript
    content ids (Lr,) long and codes (R, 16) int16."""

    id: str
    speaker: int
    language: str
    text_ids: torch.Tensor
    codes: torch.Tensor
    layout: str | None = None
    xvector_row: int = -1
    xvector: torch.Tensor | None = None
    ref_text_ids: torch.Tensor | None = None
    ref_codes: torch.Tensor | None = None
    instruct_ids: torch.Tensor | None = None

    def instruct_size(self) -> int:
        """Talker positions the instruction adds (0 without one)."""
        return 0 if self.instruct_ids is None else self.instruct_ids.numel()

    def reference_size(self) -> int:
        """Talker positions the ICL reference adds (0 without one)."""
        return 0 if self.ref_codes is None else self.ref_text_ids.numel() + self.ref_codes.shape[0]


def example_from_row(row: dict, speaker_index: int, tokenizer) -> Example | None:
    """One dataset row (training columns) as an Example; None for a row with no text or no (T, 16) codes."""
    codes = np.asarray(row["audio_codes"], dtype=np.int16)
    if codes.ndim != 2 or codes.shape[0] == 0 or codes.shape[1] != NUM_CODEBOOKS or not row["text"]:
        return None
    ids = tokenizer(assistant_text(row["text"]), return_tensors="pt")["input_ids"][0]
    instruct = (row.get("instruct") or "").strip()
    instruct_ids = tokenizer(instruct_text(instruct), return_tensors="pt")["input_ids"][0] if instruct else None
    return Example(
        id=row["id"],
        speaker=speaker_index,
        language=row["language"],
        text_ids=ids,
        codes=torch.from_numpy(codes),
        instruct_ids=instruct_ids,
    )


def build_examples(dataset, speaker_index: int, tokenizer, speaker: str, split: str) -> tuple[list[Example], int]:
    """Tokenize rows; rows with no codes or no text are skipped, counted and logged. Returns (examples, skipped)."""
    examples, skipped = [], 0
    for row in dataset:
        example = example_from_row(row, speaker_index, tokenizer)
        if example is None:
            skipped += 1
            logger.warning("speaker %s/%s: skipping row %s (empty text or codes)", speaker, split, row["id"])
            continue
        examples.append(example)
    return examples, skipped


def load_examples(
    settings: Settings, tokenizer, split: str, streaming: bool | None = None
) -> tuple[list[Example], dict[str, int]]:
    """Examples of every TRAIN_SPEAKERS config for ``split``, in dataset order.

    ``streaming`` (default DATA_STREAMING) reads the rows as a stream of the training columns only; map-style
    loading goes through the 🤗 cache. Both give the same examples (training itself streams through
    ``streaming.StreamingBatches`` instead). Raises DataError for a speaker with no usable rows in train.
    """
    streaming = settings.DATA_STREAMING if streaming is None else streaming
    examples, skipped = [], {}
    for index, speaker in enumerate(settings.TRAIN_SPEAKERS):
        dataset = load_split(settings, speaker, split, TRAIN_COLUMNS, streaming=streaming)
        rows, skipped[speaker] = build_examples(dataset or [], index, tokenizer, speaker, split)
        if split == "train" and not rows:
            raise DataError(
                f"speaker {speaker} has no usable training rows ({skipped[speaker]} skipped); re-run data "
                "preparation or remove the speaker from TRAIN_SPEAKERS"
            )
        examples.extend(rows)
    return examples, skipped


def load_training_examples(settings: Settings, tokenizer) -> tuple[list[Example], list[Example]]:
    """(train, validation) examples of every TRAIN_SPEAKERS config; skipped training rows are logged per speaker."""
    train, skipped = load_examples(settings, tokenizer, "train")
    if any(skipped.values()):
        logger.warning("skipped training rows per speaker: %s", skipped)
    return train, load_examples(settings, tokenizer, "validation")[0]


def instruction_use(settings: Settings) -> tuple[bool, ...]:
    """Whether TRAIN_SPEAKERS' training clips carry an instruction: (False,) none, (True,) all, (False, True) some.
    Reads the ``instruct`` column alone (a dataset prepared before it existed has none)."""
    used: set[bool] = set()
    for speaker in settings.TRAIN_SPEAKERS:
        rows = load_split(settings, speaker, "train", ["id", "instruct"], streaming=settings.DATA_STREAMING)
        used.update(bool((row.get("instruct") or "").strip()) for row in rows or [])
    return tuple(sorted(used)) or (False,)


def speaker_languages(examples: list[Example], speakers: tuple[str, ...]) -> dict[str, str]:
    """Each speaker's language in ``examples`` (its first example's), keyed by name: recorded in the export as
    generation's default language."""
    languages: dict[str, str] = {}
    for example in examples:
        languages.setdefault(speakers[example.speaker], example.language)
    return languages


def collate(examples: list[Example]) -> dict:
    """Batch of examples (kept as lists: the step builds variable-length sequences itself).

    id         list[str]
    text_ids   list[(Lt_b,) long]
    codes      list[(T_b, 16) long]  widened from the examples' int16
    speaker    (B,) long      index into TRAIN_SPEAKERS
    language   list[str]
    num_frames (B,) long
    layout     list[str]      each utterance's text layout, when drawn per sample (TRAINING_LAYOUT=mixed)
    instruct_ids list[(Li_b,) long | None]  each utterance's instruction ids, when any utterance has one
    voice-clone examples (``xvector_row`` set) add:
    xvector_row  (B,) long                    row (training clip) of each reference
    xvector      (B, D)                       each reference's x-vector, in the table's dtype
    ref_text_ids list[(Lr_b,) long | None]    ICL reference transcript content ids, None in x-vector mode
    ref_codes    list[(R_b, 16) long | None]  ICL reference codes, None in x-vector mode
    """
    batch = {
        "id": [e.id for e in examples],
        "text_ids": [e.text_ids for e in examples],
        "codes": [e.codes.long() for e in examples],
        "speaker": torch.tensor([e.speaker for e in examples], dtype=torch.long),
        "language": [e.language for e in examples],
        "num_frames": torch.tensor([e.codes.shape[0] for e in examples], dtype=torch.long),
    }
    if any(e.layout is not None for e in examples):
        batch["layout"] = [e.layout for e in examples]
    if any(e.instruct_ids is not None for e in examples):
        batch["instruct_ids"] = [e.instruct_ids for e in examples]
    if any(e.xvector_row >= 0 for e in examples):
        batch["xvector_row"] = torch.tensor([e.xvector_row for e in examples], dtype=torch.long)
        batch["xvector"] = torch.stack([e.xvector for e in examples])
        batch["ref_text_ids"] = [e.ref_text_ids for e in examples]
        batch["ref_codes"] = [None if e.ref_codes is None else e.ref_codes.long() for e in examples]
    return batch


def make_train_loader(examples: list[Example], batch_sampler, workers: int, pin_memory: bool):
    """Batches chosen by ``batch_sampler`` (``finetuning.training.sampler.DurationBatchSampler``), collated in
    ``workers`` processes with prefetch, in pinned memory when a GPU will receive them (copied with
    ``non_blocking``)."""
    return torch.utils.data.DataLoader(
        examples,
        batch_sampler=batch_sampler,
        collate_fn=collate,
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=2 if workers else None,
        persistent_workers=workers > 0,  # the batch sampler runs in this process, so set_epoch still applies
    )
