"""Training throughput on the bundled corpus with the tiny model, duration bucketing on vs off; prints JSON.

    uv run python bench/train_throughput.py [--steps 60]

Both runs use the real loop (``finetuning.training.loop.train``) on the same prepared data, in this process, on the CPU
(or the GPU when one is present and DEVICE allows it). Figures come from the loop's own throughput logging over
the timed steps (the first logging window, which includes warm-up, is left out): samples/s, audio seconds per
second, optimizer steps/s, padding fraction, plus the process's peak RSS. Report them as ratios between the two
runs of one invocation.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train_speedup import LOG_EVERY, prepare  # noqa: E402

from finetuning.settings import load_settings  # noqa: E402
from finetuning.training.loop import train  # noqa: E402


def run(base: dict, root: Path, name: str, steps: int, **overrides) -> dict:
    settings = load_settings(
        None, environ={}, overrides={**base, "OUTPUT_DIR": str(root / name), "MAX_STEPS": steps, **overrides}
    )
    result = train(settings)
    windows = [r for r in result.history if "train/samples_per_s" in r][1:]
    if not windows:
        raise SystemExit(f"too few steps to time: use --steps of at least {2 * LOG_EVERY}")

    def mean(key: str) -> float:
        return sum(w[key] for w in windows) / len(windows)

    return {
        "samples_per_s": round(mean("train/samples_per_s"), 2),
        "audio_s_per_s": round(mean("train/audio_s_per_s"), 2),
        "optimizer_steps_per_s": round(mean("train/optimizer_steps_per_s"), 3),
        "padding_fraction": round(mean("train/padding_fraction"), 4),
        "settings": {k: settings.public_dict()[k] for k in ("BATCH_SIZE", "MAX_BATCH_TOKENS", "NUM_BUCKETS")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = prepare(root, DEVICE="auto", SEED=42)  # the speed-up benchmark's model, corpus and loop settings
        fixed = run(base, root, "fixed", args.steps, BATCH_SIZE=4, MAX_BATCH_TOKENS=0)
        bucketed = run(base, root, "bucketed", args.steps, MAX_BATCH_TOKENS=256, NUM_BUCKETS=5)
    print(
        json.dumps(
            {
                "corpus": "bundled voices (2 speakers, 26 training clips), tiny model",
                "steps_per_run": args.steps,
                "fixed_batches": fixed,
                "duration_buckets": bucketed,
                "audio_s_per_s_ratio_buckets_vs_fixed": round(bucketed["audio_s_per_s"] / fixed["audio_s_per_s"], 3),
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
