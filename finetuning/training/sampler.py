"""Batch membership: speaker mixing, duration buckets under a padded-length budget, sharding, exact resume.

``DurationBatchSampler`` plans each epoch from (seed, epoch) alone, so every process computes the same plan and
takes its own share. It also owns the data position: its ``state_dict`` (epoch, batches trained on in that epoch,
seed) is saved with every training state (``accelerator.register_for_checkpointing``), so a resumed run re-creates
the plan and skips the batches already trained on:

1. **Mixing** — ``proportional``: every example once, shuffled. ``balanced``: temperature sampling — speaker s
   with n_s examples contributes m_s = n_max · (n_s / n_max)^α samples per epoch, so its share is ∝ n_s^α
   (α = 0: every speaker as often as the largest, α = 1: proportional), and at most ``max_repeat`` × n_s
   (0 = no cap). The largest speaker contributes each example once; smaller ones cycle through their shuffled
   examples. A 1-hour speaker beside a 50-hour one repeats 50× with α = 0, √50 ≈ 7× with α = 0.5.
2. **Buckets** — lengths are split into ``num_buckets`` quantile ranges; walking the shuffled order, an
   example joins the open batch of its bucket, and a batch closes when one more example would take
   ``batch size × longest length`` over ``max_batch_tokens``. An example longer than the budget alone forms a
   batch of one (never dropped). With ``max_batch_tokens=0`` batches are simply ``batch_size`` consecutive
   examples (no bucketing).
3. **Shuffle and shard** — batch order is shuffled; the batch count is cut to a multiple of the process count
   (every process must take the same number of steps) and process ``r`` takes batches ``r, r+n, r+2n, ...``,
   so processes see disjoint samples.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence

import numpy as np

MIXING = ("balanced", "proportional")


def bucket_edges(lengths: Sequence[int], num_buckets: int) -> np.ndarray:
    """The ``num_buckets - 1`` length quantiles that split ``lengths`` into buckets (duplicates merged)."""
    quantiles = np.linspace(0, 1, max(num_buckets, 1) + 1)[1:-1]
    return np.unique(np.quantile(np.asarray(lengths), quantiles)) if len(quantiles) else np.array([])


def speaker_samples(counts: dict[int, int], mixing: str, alpha: float, max_repeat: float) -> dict[int, int]:
    """Samples each speaker contributes to one epoch, from its example count ``counts[s]`` (the module docstring's
    mixing rule: proportional = n_s; balanced = n_max · (n_s / n_max)^α, at most ``max_repeat`` × n_s when > 0).
    Map-style and streaming data share it."""
    if mixing == "proportional":
        return dict(counts)
    largest = max(counts.values())
    shares = {s: round(largest * (n / largest) ** alpha) for s, n in counts.items()}
    if max_repeat > 0:
        shares = {s: min(m, int(max_repeat * counts[s])) for s, m in shares.items()}
    return shares  # each >= n_s: (n_s / n_max)^α >= n_s / n_max for 0 <= α <= 1, and max_repeat >= 1


class DataPosition:
    """Where training is in the data, saved with every training state: the epoch, this process's batches of it
    already trained on, and the seed that planned it. The loop calls ``batch_done()`` after each batch it trained
    on (a loader fetches ahead, so yielding a batch does not mean training on it)."""

    seed: int
    epoch: int = 0
    batches_done: int = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.batches_done = 0

    def batch_done(self) -> None:
        self.batches_done += 1

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_done": self.batches_done, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state``'s position. Raises ValueError when it comes from a run with another seed."""
        if state["seed"] != self.seed:
            raise ValueError(f"resuming with SEED={self.seed}, but the saved run used {state['seed']}")
        self.epoch, self.batches_done = int(state["epoch"]), int(state["batches_done"])


class DurationBatchSampler(DataPosition):
    """Yields lists of example indices for one process. ``lengths[i]`` is example i's padded-cost length (talker
    positions) and ``speakers[i]`` its speaker index; ``epoch_lengths(e)``, when given, the lengths of epoch e as its
    samples were drawn (layout, language, a voice-clone reference or none), at most ``lengths``: budgets use them.

    ``set_epoch(e)`` selects the epoch's plan from its first batch; the loop calls ``batch_done()`` after each
    batch it trained on (the dataloader fetches ahead, so yielding a batch does not mean training on it), and an
    iteration begins after the batches done. ``len()`` is this process's batch count for the current epoch.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        speakers: Sequence[int],
        batch_size: int,
        max_batch_tokens: int = 0,
        num_buckets: int = 5,
        mixing: str = "proportional",
        mixing_alpha: float = 0.0,
        max_repeat: float = 0.0,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        epoch_lengths: Callable[[int], Sequence[int]] | None = None,
    ):
        if len(lengths) != len(speakers) or not lengths:
            raise ValueError("the sampler needs one length and one speaker per example, and at least one example")
        if mixing not in MIXING:
            raise ValueError(f"unknown speaker mixing {mixing!r}; use one of {MIXING}")
        if not 0 <= mixing_alpha <= 1 or not (max_repeat == 0 or max_repeat >= 1):
            raise ValueError(f"mixing_alpha must be in [0, 1] ({mixing_alpha}) and max_repeat 0 or >= 1 ({max_repeat})")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside 0..{num_replicas - 1}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.speakers = np.asarray(speakers, dtype=np.int64)
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        self.mixing = mixing
        self.mixing_alpha = mixing_alpha
        self.max_repeat = max_repeat
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.batches_done = 0  # this process's batches of the current epoch already trained on
        self.bucket_edges = bucket_edges(self.lengths, num_buckets)
        self.epoch_lengths = epoch_lengths
        self._planned: tuple[int, list[list[int]]] | None = None

    def examples_per_speaker(self) -> list[int]:
        """Training examples of each speaker index 0..max (0 for a speaker index without examples)."""
        return np.bincount(self.speakers).tolist()

    def samples_per_speaker(self) -> dict[int, int]:
        """Samples each speaker contributes to one epoch (see the module docstring's mixing rule)."""
        counts = {int(s): int(n) for s, n in zip(*np.unique(self.speakers, return_counts=True), strict=True)}
        return speaker_samples(counts, self.mixing, self.mixing_alpha, self.max_repeat)

    def _epoch_order(self, rng: random.Random) -> list[int]:
        if self.mixing == "proportional":
            order = list(range(len(self.lengths)))
            rng.shuffle(order)
            return order
        order = []
        for speaker, target in self.samples_per_speaker().items():
            members = np.flatnonzero(self.speakers == speaker).tolist()
            rng.shuffle(members)
            order.extend(members[i % len(members)] for i in range(target))
        rng.shuffle(order)
        return order

    def plan(self, epoch: int) -> list[list[int]]:
        """Every process's batches for ``epoch`` (before sharding), deterministic in (seed, epoch)."""
        if self._planned is None or self._planned[0] != epoch:
            self._planned = (epoch, self._plan(epoch))
        return self._planned[1]

    def _plan(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        order = self._epoch_order(rng)
        # Budgets use the epoch's drawn lengths where they vary (a voice-clone reference counts only when drawn);
        # the buckets stay those of ``lengths``, each example's longest.
        lengths = self.lengths if self.epoch_lengths is None else np.asarray(self.epoch_lengths(epoch))
        if self.max_batch_tokens <= 0:
            batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        else:
            batches = []
            open_batches: dict[int, list[int]] = {}
            for index in order:
                bucket = int(np.searchsorted(self.bucket_edges, self.lengths[index], side="right"))
                current = open_batches.setdefault(bucket, [])
                longest = max([lengths[index], *(lengths[i] for i in current)])
                if current and (len(current) + 1) * longest > self.max_batch_tokens:
                    batches.append(current)
                    current = open_batches[bucket] = []
                current.append(index)
            batches.extend(batch for _, batch in sorted(open_batches.items()) if batch)
        rng.shuffle(batches)
        return batches

    def _shard(self) -> list[list[int]]:
        batches = self.plan(self.epoch)
        usable = len(batches) - len(batches) % self.num_replicas
        return batches[self.rank : usable : self.num_replicas]

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._shard()[self.batches_done :]

    def __len__(self) -> int:
        return len(self._shard())


def padding_fraction(batches: Sequence[Sequence[int]], lengths: Sequence[int]) -> float:
    """Share of padded positions in ``batches``: 1 − Σ lengths / Σ (batch size × longest length)."""
    real = padded = 0
    for batch in batches:
        sizes = [lengths[i] for i in batch]
        real += sum(sizes)
        padded += len(sizes) * max(sizes)
    return 1.0 - real / padded if padded else 0.0
