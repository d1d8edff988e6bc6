"""Training speed of this tree against an earlier commit, side by side in one invocation; prints JSON.

    uv run python bench/train_speedup.py [--baseline 8262908] [--reps 3] [--steps 400] [--batchings NAME ...]

The baseline commit is checked out once as a git worktree (``--baseline-tree``, default
``/tmp/qwen3-tts-bench-<commit>``). Both versions train the same tiny ``equal`` model on the same prepared bundled
corpus with the real loop, on the CPU, in fp32, one thread, no accumulation, no data workers, for two batchings:
fixed batches of 4 and duration buckets. Every run is its own subprocess whose ``finetuning`` package is that
version's tree (PYTHONPATH and cwd), and the runs alternate A/B/A/B so drift in the machine's load hits both.
Steady state is every step after the first logging window (warm-up: first steps, allocator growth). Two measures:
samples per CPU second of the training process (one thread, so it counts the work and not the other jobs on a
shared machine: the figure to compare) and the loop's own wall-clock samples/s. The JSON gives the mean per
version, the ratio new / baseline and the ratio of each A/B pair.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
LOG_EVERY = 10  # optimizer steps per logging window
WARMUP_WINDOWS = 1  # logging windows left out of the steady state
BATCHINGS = {
    "fixed_batches_of_4": {"BATCH_SIZE": 4, "MAX_BATCH_TOKENS": 0},
    "duration_buckets": {"MAX_BATCH_TOKENS": 256, "NUM_BUCKETS": 5},
}
COMMON = {  # keys both versions know; everything else keeps each version's default
    "DEVICE": "cpu",
    "MIXED_PRECISION": "no",
    "GRADIENT_ACCUMULATION_STEPS": 1,
    "LOGGING_STEPS": LOG_EVERY,
    "EVAL_STEPS": 0,
    "SAVE_STEPS": 0,
    "REPORT_TO": "none",
    "DATALOADER_WORKERS": 0,
    "SPEAKER_MIXING": "proportional",
    "SEED": 0,
}


def worker(tree: Path, overrides: dict) -> dict:
    """Train with the ``finetuning`` package of ``tree`` (run in a fresh interpreter); steady-state figures.

    Besides the loop's own wall-clock samples/s, every micro-batch's end (``Accelerator.backward``) is stamped
    with this process's CPU time and every collated batch's size is counted, which gives samples per CPU second:
    with one thread it measures the work itself, unlike wall time, on a machine other jobs share.
    """
    sys.path.insert(0, str(tree))
    import torch
    from accelerate import Accelerator

    torch.set_num_threads(1)
    import finetuning
    from finetuning.settings import load_settings

    try:
        from finetuning.training import data
        from finetuning.training.loop import train
    except ModuleNotFoundError:  # the layout before the stage packages
        from finetuning.train import train

        from finetuning import data

    if not Path(finetuning.__file__).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"imported {finetuning.__file__}, not the tree {tree}")
    batch_sizes, cpu_stamps = [], []
    collate, backward = data.collate, Accelerator.backward

    def counted_collate(examples):
        batch_sizes.append(len(examples))
        return collate(examples)

    def stamped_backward(self, loss, **kwargs):
        backward(self, loss, **kwargs)
        cpu_stamps.append(time.process_time())

    data.collate, Accelerator.backward = counted_collate, stamped_backward
    result = train(load_settings(None, environ={}, overrides=overrides))
    windows = [r for r in result.history if "train/samples_per_s" in r][WARMUP_WINDOWS:]
    if not windows:
        raise SystemExit(f"too few steps to time: use --steps of at least {(WARMUP_WINDOWS + 1) * LOG_EVERY}")
    first = WARMUP_WINDOWS * LOG_EVERY  # micro-batch index where the steady state starts
    return {
        "samples_per_s": statistics.fmean(w["train/samples_per_s"] for w in windows),
        "samples_per_cpu_s": sum(batch_sizes[first + 1 :]) / (cpu_stamps[-1] - cpu_stamps[first]),
        "padding_fraction": statistics.fmean(w["train/padding_fraction"] for w in windows),
    }


def run_worker(tree: Path, overrides: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", str(tree), json.dumps(overrides)]
    done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"run in {tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def baseline_tree(commit: str, path: Path | None) -> Path:
    """A checkout of ``commit``: ``path`` if given and present, else a git worktree made once."""
    tree = path or Path(tempfile.gettempdir()) / f"qwen3-tts-bench-{commit}"
    if not (tree / "finetuning").is_dir():
        subprocess.run(["git", "-C", str(REPO_ROOT), "worktree", "add", "--detach", str(tree), commit], check=True)
    return tree


def prepare(root: Path, **overrides) -> dict:
    """The tiny ``equal`` model and the prepared bundled corpus, made once by this tree (both versions share the
    dataset schema); returns the settings both versions train with (COMMON, then ``overrides``)."""
    sys.path.insert(0, str(REPO_ROOT))
    from finetuning.preparation.prepare import prepare_dataset
    from finetuning.settings import load_settings
    from finetuning.tiny_model import build_tiny_model

    model = build_tiny_model(root / "tiny", layout="equal", seed=0)
    base = {
        **COMMON,
        **overrides,
        "VOICES_DIR": str(REPO_ROOT / "voices"),
        "DATASET_DIR": str(root / "dataset"),
        "INIT_MODEL_PATH": str(model),
        "TOKENIZER_PATH": str(model / "speech_tokenizer"),
    }
    prepare_dataset(load_settings(None, environ={}, overrides=base), report=lambda _: None)
    return base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="8262908", help="commit to compare with")
    parser.add_argument("--baseline-tree", type=Path, help="an existing checkout of --baseline")
    parser.add_argument("--reps", type=int, default=3, help="runs per version and batching")
    parser.add_argument(
        "--steps", type=int, default=400, help="optimizer steps per run (shorter runs give noisier ratios)"
    )
    parser.add_argument(
        "--batchings", nargs="+", choices=list(BATCHINGS), default=list(BATCHINGS), help="which batchings to run"
    )
    args = parser.parse_args()
    trees = {"baseline": baseline_tree(args.baseline, args.baseline_tree), "new": REPO_ROOT}
    batchings = {name: BATCHINGS[name] for name in args.batchings}
    runs: dict[str, dict[str, list[dict]]] = {b: {v: [] for v in trees} for b in batchings}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = prepare(root)
        for rep in range(args.reps):
            for batching, batch_settings in batchings.items():
                for version, tree in trees.items():  # alternating: baseline, new, baseline, new, ...
                    output_dir = str(root / f"{batching}-{version}-{rep}")
                    overrides = {**base, **batch_settings, "OUTPUT_DIR": output_dir, "MAX_STEPS": args.steps}
                    runs[batching][version].append(run_worker(tree, overrides))
    summary = {}
    for batching, by_version in runs.items():
        padding = {v: round(rs[0]["padding_fraction"], 4) for v, rs in by_version.items()}
        summary[batching] = {"padding_fraction": padding}
        for key in ("samples_per_cpu_s", "samples_per_s"):
            mean = {v: statistics.fmean(r[key] for r in rs) for v, rs in by_version.items()}
            summary[batching][key] = {v: round(m, 2) for v, m in mean.items()}
            summary[batching][f"{key}_speedup"] = round(mean["new"] / mean["baseline"], 3)
            summary[batching][f"{key}_speedup_per_rep"] = [
                round(n[key] / b[key], 3) for b, n in zip(by_version["baseline"], by_version["new"], strict=True)
            ]
    report = {
        "baseline": args.baseline,
        "setup": "tiny equal model, bundled corpus (2 speakers), CPU, fp32, 1 thread, no accumulation, no workers",
        "steps_per_run": args.steps,
        "steady_state_after_steps": WARMUP_WINDOWS * LOG_EVERY,
        "reps": args.reps,
        **summary,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        print(json.dumps(worker(Path(sys.argv[2]), json.loads(sys.argv[3]))))
    else:
        main()
