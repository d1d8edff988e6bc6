"""The clip work's results kept on disk batch by batch, so a killed preparation resumes inside a speaker.

Every encode batch (``clips.encode_batches``: the same batches whatever the number of processes) is stored as it
finishes under ``DATASET_DIR/.clip_cache/<speaker>/<key>.npz``. The key hashes what decides the batch's result:
each clip's audio content, transcript and problem, in batch order, with the clip work (gate, loudness) and the
speech tokenizer's identity. A re-run after a kill loads the stored batches instead of decoding and encoding them
again, and writes exactly what an uninterrupted run writes. The speaker's cache is removed once its config is in
place. Entries hold plain arrays (no pickled objects), written atomically.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np

from finetuning import atomic
from finetuning.preparation.clips import ClipResult, ClipWork
from finetuning.preparation.fingerprint import PROCESSING_VERSION, hash_audio
from finetuning.preparation.sources import SourceItem

logger = logging.getLogger(__name__)

CACHE_DIR = ".clip_cache"  # under DATASET_DIR; one folder per speaker, one file per encode batch


class ClipCache:
    """One speaker's stored batches (``folder``) for one clip work and speech tokenizer."""

    def __init__(self, folder: Path, work: ClipWork, tokenizer_id: str):
        self.folder = Path(folder)
        self._context = json.dumps(
            {"work": asdict(work), "tokenizer": tokenizer_id, "processing": PROCESSING_VERSION}, sort_keys=True
        )
        self.hits = 0  # batches loaded instead of processed

    def key(self, batch: list[tuple[int, SourceItem]]) -> str:
        digest = hashlib.sha256(self._context.encode())
        for _, item in batch:
            digest.update(json.dumps([hash_audio(item.audio), item.text, item.problem]).encode())
        return digest.hexdigest()

    def load(self, key: str, batch: list[tuple[int, SourceItem]]) -> list[ClipResult] | None:
        """The stored results of ``batch`` (its ``key``; indices its own), or None when absent or unreadable."""
        path = self.folder / f"{key}.npz"
        try:
            with np.load(path, allow_pickle=False) as stored:
                meta = json.loads(bytes(stored["meta"]).decode())
                results = []
                for position, ((index, _), entry) in enumerate(zip(batch, meta, strict=True)):
                    result = ClipResult(index=index, reason=entry["reason"], num_samples=entry["num_samples"])
                    result.cleanliness = tuple(entry["cleanliness"]) if entry["cleanliness"] else None
                    if result.reason is None:
                        result.flac = stored[f"flac{position}"].tobytes()
                        result.codes = stored[f"codes{position}"]
                    results.append(result)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError) as error:  # cut short or damaged: process the batch again
            logger.warning("clip cache entry %s unreadable (%s); processing that batch again", path, error)
            return None
        self.hits += 1
        return results

    def store(self, key: str, results: list[ClipResult]) -> None:
        """Write a batch's ``results`` (in batch order) under its ``key``: the file appears complete or not at all."""
        meta, arrays = [], {}
        for position, result in enumerate(results):
            meta.append(
                {
                    "reason": result.reason,
                    "num_samples": result.num_samples,
                    "cleanliness": list(result.cleanliness) if result.cleanliness else None,
                }
            )
            if result.reason is None:
                arrays[f"flac{position}"] = np.frombuffer(result.flac, dtype=np.uint8)
                arrays[f"codes{position}"] = result.codes
        buffer = io.BytesIO()
        np.savez(buffer, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), **arrays)
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic.write_bytes(self.folder / f"{key}.npz", buffer.getvalue())

    def clear(self) -> None:
        """Remove the speaker's stored batches (its config is in place)."""
        shutil.rmtree(self.folder, ignore_errors=True)
