"""Clip work of preparation — decode, quality gate, loudness, speech-tokenizer codes — in one process or several.

The work is cut into encode batches before any clip is decoded: a speaker's items sorted by their duration read
from the audio header (no decoding), ``ENCODE_BATCH_SIZE`` consecutive items per batch, so each tokenizer call
sees clips of similar length (little padding). The batches are the same whatever the number of processes, and
each batch is processed the same way wherever it runs, so ``PREPARATION_WORKERS=N`` writes exactly what one
process writes (same rows, same fingerprint). With N > 1, N spawned processes each load the speech tokenizer
once; on CUDA, worker ``i`` takes GPU ``i`` modulo the number of GPUs.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from tqdm.auto import tqdm

from finetuning.constants import SAMPLE_RATE
from finetuning.preparation.audio import (
    AudioDecodeError,
    QualityThresholds,
    encode_flac,
    load_mono_24k,
    normalize_loudness,
    quality_issue,
    resample,
)
from finetuning.preparation.encoder import SpeechEncoder
from finetuning.preparation.multispeaker import cleanliness, clip_seconds
from finetuning.preparation.sources import SourceItem

logger = logging.getLogger(__name__)

WORKER_START_TIMEOUT_S = 600.0  # a worker that has not loaded the tokenizer by then has failed
WARM_UP_LUFS = -23.0  # any level: the warm-up only loads the loudness meter

# Worker-process state, set once by ``_start_worker`` in each spawned process (the usual pool-initializer
# pattern): the process's own speech encoder. Never set in the parent process.
_WORKER: dict = {}


@dataclass(frozen=True)
class ClipWork:
    """What every clip goes through; picklable, sent to each worker with its batches."""

    limits: QualityThresholds
    normalize_loudness: bool
    target_lufs: float
    true_peak_ceiling_dbtp: float
    measure_cleanliness: bool  # compute clipping/silence of kept clips (automatic references need them)


@dataclass
class ClipResult:
    """One item's outcome: ``reason`` names the rejection, else the clip is kept with its stored audio (16-bit
    FLAC at 24 kHz), ``num_samples`` (24 kHz), ``codes`` (frames, 16) int16 and, when measured, its
    ``cleanliness`` (clipped fraction, silence fraction, -num_samples: lower is cleaner)."""

    index: int
    reason: str | None = None
    flac: bytes = b""
    num_samples: int = 0
    codes: np.ndarray | None = None
    cleanliness: tuple[float, float, int] | None = None


class BatchStore(Protocol):
    """Where finished batches are kept between runs (``clip_cache.ClipCache``)."""

    def key(self, batch: list[tuple[int, SourceItem]]) -> str: ...

    def load(self, key: str, batch: list[tuple[int, SourceItem]]) -> list[ClipResult] | None: ...

    def store(self, key: str, results: list[ClipResult]) -> None: ...


def encode_batches(items: list[SourceItem], batch_size: int) -> list[list[int]]:
    """Item indices in encode batches: sorted by header duration (ties by index), ``batch_size`` per batch."""
    durations = [clip_seconds(item.audio) for item in items]
    order = sorted(range(len(items)), key=lambda i: (durations[i], i))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def process_batch(batch: list[tuple[int, SourceItem]], work: ClipWork, encoder: SpeechEncoder) -> list[ClipResult]:
    """Decode, gate (and normalise) each ``(index, item)`` of one batch, then encode the kept clips in one call.

    Never raises for a bad clip: a missing file, an undecodable one or a failed gate becomes ``reason``.
    """
    results, kept = [], []
    for index, item in batch:
        result = ClipResult(index=index)
        results.append(result)
        if item.problem is not None:  # found while reading: bad_encoding, not_json, outside_source
            result.reason = item.problem
            continue
        if item.audio is None:
            result.reason = "missing_file"
            continue
        try:
            samples = load_mono_24k(item.audio)
        except FileNotFoundError:
            result.reason = "missing_file"
            continue
        except AudioDecodeError:
            result.reason = "unreadable"
            continue
        result.reason = quality_issue(samples, item.text, work.limits)
        if result.reason is not None:
            continue
        if work.normalize_loudness:
            samples = normalize_loudness(samples, work.target_lufs, work.true_peak_ceiling_dbtp)
        if work.measure_cleanliness:
            result.cleanliness = cleanliness(samples)
        kept.append((result, samples))
    if kept:
        codes = encoder.encode([samples for _, samples in kept], desc="", progress=False)
        for (result, samples), code in zip(kept, codes, strict=True):
            result.flac, result.num_samples, result.codes = encode_flac(samples), len(samples), code
    return results


def _start_worker(
    tokenizer_path: str, devices: list[str], batch_size: int, token: str | None, counter, barrier
) -> None:
    """Pool initializer: this worker's encoder on its device, tokenizer and audio libraries loaded up front."""
    with counter.get_lock():
        slot = counter.value
        counter.value += 1
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)  # N processes share the cores; one thread each avoids oversubscription
    encoder = SpeechEncoder(tokenizer_path, devices[slot % len(devices)], batch_size, token)
    noise = np.random.default_rng(0).uniform(-0.1, 0.1, SAMPLE_RATE).astype(np.float32)
    encoder.encode([noise], progress=False)
    # First calls import librosa's lazy submodules and compile its helpers (seconds): pay it before any batch.
    resample(noise, SAMPLE_RATE // 2)
    cleanliness(noise)
    normalize_loudness(noise, WARM_UP_LUFS, 0.0)
    encoder.clips_encoded = 0
    _WORKER.update(encoder=encoder, barrier=barrier)


def _wait_for_all_workers(_: int) -> None:
    _WORKER["barrier"].wait(timeout=WORKER_START_TIMEOUT_S)


def _run_in_worker(batch: list[tuple[int, SourceItem]], work: ClipWork) -> list[ClipResult]:
    return process_batch(batch, work, _WORKER["encoder"])


class ClipProcessor:
    """Runs a speaker's clip work in this process (``num_workers`` 1, with ``encoder``) or in a pool of
    ``num_workers`` spawned processes (started on first use, closed by ``close``)."""

    def __init__(self, encoder: SpeechEncoder, num_workers: int = 1):
        self.encoder = encoder
        self.num_workers = num_workers
        self._pool: ProcessPoolExecutor | None = None

    def _devices(self) -> list[str]:
        from finetuning.resources import resolve_device

        device = resolve_device(self.encoder.device)
        if device == "cuda":
            import torch

            return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        return [device]

    def _pool_for_work(self) -> ProcessPoolExecutor:
        if self._pool is None:
            context = multiprocessing.get_context("spawn")
            counter = context.Value("i", 0)
            barrier = context.Barrier(self.num_workers)
            encoder = self.encoder
            init = (encoder.tokenizer_path, self._devices(), encoder.batch_size, encoder.token, counter, barrier)
            self._pool = ProcessPoolExecutor(
                self.num_workers, mp_context=context, initializer=_start_worker, initargs=init
            )
        return self._pool

    def wait_until_ready(self) -> None:
        """Start the workers and return once every one of them has loaded (benchmarks start their clock here)."""
        if self.num_workers > 1:
            list(self._pool_for_work().map(_wait_for_all_workers, range(self.num_workers)))

    def run(
        self, items: list[SourceItem], work: ClipWork, desc: str, cache: BatchStore | None = None
    ) -> list[ClipResult]:
        """One ClipResult per item, in item order. With a ``cache``, batches stored by an earlier run are loaded
        instead of processed, and each processed batch is stored as it finishes."""
        batches = [[(i, items[i]) for i in batch] for batch in encode_batches(items, self.encoder.batch_size)]
        keys = [cache.key(batch) for batch in batches] if cache else [None] * len(batches)
        stored = [cache.load(key, batch) if cache else None for key, batch in zip(keys, batches, strict=True)]
        todo = [batch for batch, found in zip(batches, stored, strict=True) if found is None]
        done: Iterator[list[ClipResult]]
        if self.num_workers <= 1:
            done = (process_batch(batch, work, self.encoder) for batch in todo)
        else:
            done = self._pool_for_work().map(_run_in_worker, todo, [work] * len(todo))
        results: list[ClipResult | None] = [None] * len(items)
        with tqdm(total=len(items), desc=desc, unit="clip") as bar:
            for key, found in zip(keys, stored, strict=True):
                batch_results = found if found is not None else next(done)
                if found is None and cache is not None:
                    cache.store(key, batch_results)
                for result in batch_results:
                    results[result.index] = result
                bar.update(len(batch_results))
        return results  # type: ignore[return-value]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


def log_rejections(results: list[ClipResult], items: list[SourceItem], speaker: str) -> None:
    """Log every rejected clip with its origin (shown with ``-v``)."""
    for result in results:
        if result.reason is not None:
            item = items[result.index]
            logger.info("speaker %s: rejected %s (%s): %s", speaker, item.id, item.origin, result.reason)
