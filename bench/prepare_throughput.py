"""Data-preparation throughput on the bundled corpus with the tiny speech tokenizer; prints JSON.

    uv run python bench/prepare_throughput.py

Reports audio seconds prepared per wall second for a cold run (decode, gate, resample, encode, write) and the
wall time of a no-op re-run relative to it, measured in the same process. Import time is excluded (the
tokenizer and libraries are loaded before the clock starts).
"""

from __future__ import annotations

import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finetuning.preparation.encoder import SpeechEncoder  # noqa: E402
from finetuning.preparation.prepare import prepare_dataset  # noqa: E402
from finetuning.settings import load_settings  # noqa: E402
from finetuning.tiny_model import build_tiny_model  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_model(Path(tmp) / "tiny", seed=0)
        settings = load_settings(
            None,
            environ={},
            overrides={
                "VOICES_DIR": str(REPO_ROOT / "voices"),
                "DATASET_DIR": str(Path(tmp) / "dataset"),
                "TOKENIZER_PATH": str(model / "speech_tokenizer"),
                "DEVICE": "cpu",
            },
        )
        encoder = SpeechEncoder(settings.TOKENIZER_PATH, "cpu", settings.ENCODE_BATCH_SIZE)
        encoder._tokenizer = encoder._load()  # load outside the timed region
        warm = load_settings(
            None,
            environ={},
            overrides={
                **settings.public_dict(),
                "DATASET_DIR": str(Path(tmp) / "warm"),
                "TRAIN_SPEAKERS": "english_speaker",
            },
        )
        prepare_dataset(warm, encoder=encoder, max_samples=2, report=lambda _: None)  # JIT/caches warm-up

        start = time.perf_counter()
        reports = prepare_dataset(settings, encoder=encoder, report=lambda _: None)
        cold_s = time.perf_counter() - start
        start = time.perf_counter()
        prepare_dataset(settings, encoder=encoder, report=lambda _: None)
        noop_s = time.perf_counter() - start

    audio_s = sum(r.hours_kept for r in reports) * 3600.0
    print(
        json.dumps(
            {
                "benchmark": "prepare_throughput",
                "speakers": len(reports),
                "clips": sum(r.kept for r in reports),
                "audio_seconds": round(audio_s, 2),
                "first_run_wall_s": round(cold_s, 3),
                "audio_seconds_per_wall_second": round(audio_s / cold_s, 2),
                "noop_rerun_wall_s": round(noop_s, 4),
                "noop_rerun_relative_to_first": round(noop_s / cold_s, 4),
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
