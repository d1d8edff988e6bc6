"""Training data as a stream (``DATA_STREAMING=true``): memory bounded by buffers, not by the corpus.

Each speaker's train split is read as a 🤗 ``IterableDataset`` of parquet shards with column projection at load
(``columns=``: the audio column is never read, locally or from the Hub), in row batches of STREAM_READ_ROWS.
The speakers are combined (``balanced``: each speaker contributes the samples the map-style sampler gives it,
``sampler.speaker_samples`` under SPEAKER_MIXING_ALPHA and SPEAKER_MAX_REPEAT, smaller speakers cycling through
their rows, in a random interleaving seeded by (seed, epoch); ``proportional``: concatenated), shared between
processes with ``split_dataset_by_node``, and shuffled through a bounded buffer of STREAM_SHUFFLE_BUFFER
examples, reseeded every epoch. Examples then go through a bucketing buffer (at most one open batch per duration
bucket) that closes a batch when one more example would take ``batch size × longest length`` over
MAX_BATCH_TOKENS, exactly as the map-style sampler does; bucket edges are length quantiles from a metadata pass
(text and ``num_frames`` only).

The same metadata pass gives the epoch's batch count of every process; all processes stop at the smallest, so
they take the same number of steps. The position (epoch, batches trained on, seed) is saved with every training
state; a resumed run replays the epoch's deterministic stream and skips the batches already trained on, so
resume is exact. Each row's layout and language are drawn as in map-style training (``training.conditioning``),
keyed by its speaker and id. Codes stay int16 until ``collate`` widens them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np

from finetuning.settings import Settings
from finetuning.training.conditioning import Conditioning, stream_key
from finetuning.training.data import TRAIN_COLUMNS, DataError, Example, collate, example_from_row, load_split
from finetuning.training.sampler import DataPosition, bucket_edges, speaker_samples
from finetuning.training.step import AUTO_LANGUAGE, sequence_length

logger = logging.getLogger(__name__)

STREAM_READ_ROWS = 64  # parquet rows decoded at a time per stream
LENGTH_COLUMNS = ["id", "text", "language", "num_frames"]  # what the metadata pass reads


def mix_speakers(streams: tuple, quotas: tuple[int, ...], seed: tuple[int, int]) -> Iterator[dict]:
    """Rows of ``streams`` (one per speaker, each re-read from its start when exhausted), ``quotas[s]`` of speaker
    s in all, each row tagged with its ``speaker_index``: the next row's speaker is drawn with probability
    ∝ its remaining quota (``numpy`` generator seeded by ``seed`` = (SEED, epoch)), so the speakers are spread
    evenly through the epoch."""
    rng = np.random.default_rng(list(seed))
    remaining = np.asarray(quotas, dtype=np.int64)
    readers = [iter(stream) for stream in streams]
    while remaining.sum() > 0:
        speaker = int(rng.choice(len(remaining), p=remaining / remaining.sum()))
        row = next(readers[speaker], None)
        if row is None:  # this speaker's rows are used up: it cycles (its quota exceeds its row count)
            readers[speaker] = iter(streams[speaker])
            row = next(readers[speaker])
        remaining[speaker] -= 1
        yield row | {"speaker_index": speaker}


def bucket_batches(
    entries: Iterator[tuple[object, int]], edges: np.ndarray, batch_size: int, max_batch_tokens: int
) -> Iterator[list[object]]:
    """Group ``(item, length)`` pairs into batches: with a budget, at most one open batch per bucket of
    ``edges`` (a batch closes when one more item would take ``size × longest`` over ``max_batch_tokens``; an
    item over the budget alone is a batch of one); without one, ``batch_size`` consecutive items. The rest is
    flushed at the end in bucket order."""
    open_batches: dict[int, tuple[list[object], int]] = {}
    for item, length in entries:
        bucket = int(np.searchsorted(edges, length, side="right")) if max_batch_tokens > 0 else 0
        members, longest = open_batches.get(bucket, ([], 0))
        longest_with = max(longest, length)
        full = (
            len(members) >= batch_size
            if max_batch_tokens <= 0
            else (len(members) + 1) * longest_with > max_batch_tokens
        )
        if members and full:
            yield members
            members, longest_with = [], length
        members.append(item)
        open_batches[bucket] = (members, longest_with)
    for bucket in sorted(open_batches):
        if open_batches[bucket][0]:
            yield open_batches[bucket][0]


class StreamingBatches(DataPosition):
    """Collated training batches of this process, read as a stream; also its own batch sampler for the loop
    (``epoch``, ``set_epoch``, ``batch_done``, ``state_dict``/``load_state_dict``, ``len``)."""

    def __init__(self, settings: Settings, tokenizer, talker_config, num_replicas: int = 1, rank: int = 0):
        self.settings = settings
        self.tokenizer = tokenizer
        self.talker_config = talker_config
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = settings.SEED
        self.conditioning = Conditioning.from_settings(settings)
        self.epoch = 0
        self.batches_done = 0
        self.skipped = 0
        rows = dict(enumerate(self.examples_per_speaker()))
        for index, count in rows.items():
            if not count:
                raise DataError(
                    f"speaker {settings.TRAIN_SPEAKERS[index]} has no training rows; re-run data preparation or "
                    "remove the speaker from TRAIN_SPEAKERS"
                )
        mixing = (settings.SPEAKER_MIXING, settings.SPEAKER_MIXING_ALPHA, settings.SPEAKER_MAX_REPEAT)
        self.quotas = tuple(speaker_samples(rows, *mixing).values())  # each speaker's samples per epoch
        # The bucket edges of the whole stream (every process's share), so that every process buckets alike and
        # computes the same batch counts for all of them.
        lengths = [length for r in range(num_replicas) for _, length in self._lengths(0, r)]
        if not lengths:
            raise ValueError("the training stream is empty; re-run data preparation")
        self.edges = bucket_edges(lengths, settings.NUM_BUCKETS)
        self._counts: dict[int, int] = {}

    def examples_per_speaker(self) -> list[int]:
        """Training rows of each speaker in TRAIN_SPEAKERS order (part of the run identity checked on resume)."""
        counts = []
        for speaker in self.settings.TRAIN_SPEAKERS:
            ids = load_split(self.settings, speaker, "train", ["id"], streaming=True, read_rows=STREAM_READ_ROWS)
            counts.append(sum(1 for _ in ids))
        return counts

    def _stream(self, epoch: int, rank: int, columns: list[str]):
        import datasets
        from datasets.distributed import split_dataset_by_node

        streams = [
            load_split(self.settings, speaker, "train", columns, streaming=True, read_rows=STREAM_READ_ROWS)
            for speaker in self.settings.TRAIN_SPEAKERS
        ]
        if self.settings.SPEAKER_MIXING == "balanced" and len(streams) > 1:
            # tuples, not lists: from_generator would split lists into shards
            mixing = {"streams": tuple(streams), "quotas": self.quotas, "seed": (self.seed, epoch)}
            combined = datasets.IterableDataset.from_generator(mix_speakers, gen_kwargs=mixing)
        else:
            tagged = [stream.map(lambda row, i=i: {"speaker_index": i}) for i, stream in enumerate(streams)]
            combined = datasets.concatenate_datasets(tagged)
        shard = split_dataset_by_node(combined, rank=rank, world_size=self.num_replicas)
        shuffled = shard.shuffle(seed=self.seed, buffer_size=self.settings.STREAM_SHUFFLE_BUFFER)
        shuffled.set_epoch(epoch)
        return shuffled

    def _length(self, num_text_tokens: int, num_frames: int, language: str, epoch: int, key: int) -> int:
        """Talker positions of a row as drawn in ``epoch`` (its layout and language, ``training.conditioning``)."""
        auto, layout = self.conditioning.draw(epoch, key)
        language = AUTO_LANGUAGE if auto else language
        return sequence_length(self.talker_config, num_text_tokens, num_frames, language, layout)

    def _lengths(self, epoch: int, rank: int) -> Iterator[tuple[str, int]]:
        from finetuning.training.step import assistant_text

        for row in self._stream(epoch, rank, LENGTH_COLUMNS):
            if not row["text"] or not row["num_frames"]:
                continue
            tokens = len(self.tokenizer(assistant_text(row["text"]))["input_ids"])
            key = stream_key(row["speaker_index"], row["id"])
            yield row["id"], self._length(tokens, row["num_frames"], row["language"], epoch, key)

    def _batches(self, entries) -> Iterator[list]:
        settings = self.settings
        return bucket_batches(entries, self.edges, settings.BATCH_SIZE, settings.MAX_BATCH_TOKENS)

    def __len__(self) -> int:
        """Batches every process takes this epoch: the smallest count over the processes."""
        if self.epoch not in self._counts:
            counts = [sum(1 for _ in self._batches(self._lengths(self.epoch, r))) for r in range(self.num_replicas)]
            self._counts[self.epoch] = min(counts)
        return self._counts[self.epoch]

    def _examples(self) -> Iterator[tuple[Example, int]]:
        for row in self._stream(self.epoch, self.rank, TRAIN_COLUMNS):
            example = example_from_row(row, row["speaker_index"], self.tokenizer)
            if example is None:
                self.skipped += 1
                logger.warning("speaker %s: skipping row %s (empty text or codes)", row["speaker"], row["id"])
                continue
            example = self.conditioning.apply(example, self.epoch, stream_key(row["speaker_index"], row["id"]))
            yield (
                example,
                sequence_length(
                    self.talker_config,
                    example.text_ids.numel(),
                    example.codes.shape[0],
                    example.language,
                    example.layout,
                    instruct=example.instruct_size(),
                ),
            )

    def __iter__(self) -> Iterator[dict]:
        """Collated batches (see ``data.collate``) from the first batch not yet trained on."""
        total = len(self)
        for index, batch in enumerate(self._batches(self._examples())):
            if index >= total:
                return
            if index >= self.batches_done:
                yield collate(batch)


def stream_languages(settings: Settings) -> dict[str, str]:
    """Each speaker's language, from the first row of its train stream (the language column alone)."""
    languages = {}
    for speaker in settings.TRAIN_SPEAKERS:
        stream = load_split(settings, speaker, "train", ["language"], streaming=True, read_rows=STREAM_READ_ROWS)
        languages[speaker] = next(iter(stream))["language"]
    return languages
