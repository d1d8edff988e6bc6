"""Time to the first training step of ``finetuning/finetune.py`` on the tiny kit, and where it goes; prints JSON.

    uv run python bench/startup.py [--reps 3] [--baseline-tree DIR]

The kit is the tests' and the demo's: the tiny random ``equal`` model (``finetuning.tiny_model``) and the two
bundled speakers prepared from ``voices/`` (4 clips each), made once in a temporary folder. Each rep is a fresh
interpreter pinned to one CPU core (``OMP_NUM_THREADS=1``) that runs the command's own ``main`` with a ``.env``
holding only the kit's paths and ``DEVICE=cpu`` (after one untimed warm-up run, which writes the bytecode and
numba caches a user's first run leaves behind): every other setting keeps its default (tensorboard tracker,
2 dataloader workers, bf16 autocast, full fine-tune, no auxiliary losses). The clock starts before the
interpreter is spawned and stops when the first micro-batch's backward returns; the process then exits.
With ``--baseline-tree`` (a checkout of an earlier commit, e.g. ``git worktree add /tmp/base COMMIT``) the same
kit is timed with both trees' commands, alternating A/B, and the ratios this tree / baseline are printed.

Phases, in seconds of wall time and of the process's own CPU time (user + system, dataloader workers not counted;
on a machine other jobs share, the CPU figure is the one to compare), median over reps: ``interpreter`` (Python
start), ``import_command`` (``finetuning.finetune`` and the settings), ``import_training`` (the modules ``main``
imports before training), then each named stage of ``finetuning.training.loop`` as it runs (accelerator, model
load, dataset load, speaker embeddings, engine, ...), ``first_step`` (forward and backward of the first batch)
and ``other`` (what lies between, the first batch's loading included).
``imported_at_first_step`` says which optional packages were loaded by then; ``import_self_s`` (one more run
under ``python -X importtime``) sums each top-level package's own import time, which shows what those cost.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
OPTIONAL_PACKAGES = ("deepspeed", "peft", "tensorboard", "wandb", "matplotlib", "speechbrain", "jiwer", "librosa")
LOOP_STAGES = {  # finetuning.training.loop name -> phase
    "make_accelerator": "accelerator",
    "prepare_output_dir": "output_dir",
    "load_base_model": "model_load",
    "load_training_examples": "dataset_load",
    "compute_speaker_embeddings": "speaker_embeddings",
    "make_train_loader": "dataloader",
    "apply_lora": "lora",
    "build_auxiliary_losses": "auxiliary_losses",
    "TalkerStep": "step_module",
    "make_optimizer": "optimizer",
}
ENGINE_STAGES = {"prepare_engine": "engine_prepare"}


class FirstStepDone(BaseException):
    """Raised after the first backward: nothing in the command catches it."""


def worker(tree: str, env_file: str, spawned_at: float) -> None:
    """One timed start of ``tree``'s command (runs in its own interpreter); prints the phases as one JSON line."""
    stamps = {"interpreter": time.time() - spawned_at}
    cpu = {"interpreter": time.process_time()}  # this process's CPU seconds (user + system) since it started
    clock, cpu_clock = time.time(), time.process_time()

    def lap(name: str) -> None:
        nonlocal clock, cpu_clock
        now, cpu_now = time.time(), time.process_time()
        stamps[name] = stamps.get(name, 0.0) + now - clock
        cpu[name] = cpu.get(name, 0.0) + cpu_now - cpu_clock
        clock, cpu_clock = now, cpu_now

    sys.path.insert(0, tree)
    from finetuning import finetune  # noqa: F401  (what `python finetuning/finetune.py` imports first)

    if not Path(finetune.__file__).resolve().is_relative_to(Path(tree).resolve()):
        raise SystemExit(f"imported {finetune.__file__}, not the tree {tree}")
    from finetuning.settings import load_settings

    load_settings(env_file)
    lap("import_command")
    import finetuning.resources  # noqa: F401  (main's imports, in its order)
    import finetuning.training.checkpointing  # noqa: F401
    import finetuning.training.data  # noqa: F401
    import finetuning.training.engines as engines
    import finetuning.training.export  # noqa: F401
    import finetuning.training.loop as loop
    import finetuning.training.lora  # noqa: F401

    lap("import_training")

    def timed(function, phase: str):
        def wrapper(*args, **kwargs):
            lap("other")
            try:
                return function(*args, **kwargs)
            finally:
                lap(phase)

        return wrapper

    step_class = loop.TalkerStep
    for name, phase in LOOP_STAGES.items():
        setattr(loop, name, timed(getattr(loop, name), phase))
    for name, phase in ENGINE_STAGES.items():
        setattr(engines, name, timed(getattr(engines, name), phase))
    from accelerate import Accelerator

    backward = Accelerator.backward

    def first_backward(self, loss, **kwargs):
        backward(self, loss, **kwargs)
        lap("first_step")
        raise FirstStepDone

    def first_batch(self, *args, **kwargs):  # the step module's forward: the batch is in hand
        lap("other")
        return forward(self, *args, **kwargs)

    forward = step_class.__call__
    step_class.__call__ = first_batch
    Accelerator.backward = first_backward
    try:
        finetune.main(["--env-file", env_file])
    except FirstStepDone:
        pass
    else:
        raise SystemExit("the run ended without a training step")
    modules = [p for p in OPTIONAL_PACKAGES if p in sys.modules]
    print(json.dumps({"wall": stamps, "cpu": cpu, "imported_at_first_step": modules}), flush=True)
    os._exit(0)  # dataloader workers and trackers: nothing more to time


def make_kit(root: Path) -> Path:
    """The tiny model and the prepared bundled speakers under ``root``; returns the run's ``.env``."""
    sys.path.insert(0, str(REPO_ROOT))
    from finetuning.preparation.prepare import prepare_dataset
    from finetuning.settings import load_settings
    from finetuning.tiny_model import build_tiny_model

    model = build_tiny_model(root / "tiny", layout="equal", seed=0)
    values = {
        "INIT_MODEL_PATH": model,
        "TOKENIZER_PATH": model / "speech_tokenizer",
        "VOICES_DIR": REPO_ROOT / "voices",
        "DATASET_DIR": root / "dataset",
        "OUTPUT_DIR": root / "run",
        "DEVICE": "cpu",
    }
    env_file = root / "startup.env"
    env_file.write_text("".join(f"{key}={value}\n" for key, value in values.items()))
    settings = load_settings(env_file, overrides={"VALIDATION_FRACTION": "0"})
    prepare_dataset(settings, max_samples=4, report=lambda line: print(line, file=sys.stderr))
    return env_file


def run_worker(env_file: Path, tree: Path = REPO_ROOT, importtime: bool = False) -> tuple[dict, str]:
    """One timed start of ``tree``'s command in a fresh interpreter on one core: (phases, stderr)."""
    from finetuning.settings import FIELDS

    env = {key: value for key, value in os.environ.items() if key not in FIELDS and key != "PYTHONDONTWRITEBYTECODE"}
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    core = min(os.sched_getaffinity(0))
    flags = ["-X", "importtime"] if importtime else []
    command = [sys.executable, *flags, str(Path(__file__).resolve()), "--worker", str(tree), str(env_file)]
    command.append(str(time.time()))
    done = subprocess.run(
        ["taskset", "-c", str(core), *command], cwd=env_file.parent, env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"the timed run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def import_self_times(stderr: str) -> dict[str, float]:
    """Seconds of each top-level package's own import time, from ``-X importtime`` lines, largest first."""
    totals: dict[str, float] = {}
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, _, name = (part.strip() for part in line[len("import time:") :].split("|"))
        top = name.split(".")[0]
        totals[top] = totals.get(top, 0.0) + int(self_us) / 1e6
    return {k: round(v, 3) for k, v in sorted(totals.items(), key=lambda kv: -kv[1]) if v >= 0.05}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--baseline-tree", type=Path, help="a checkout of an earlier commit, timed A/B with this tree")
    parser.add_argument("--worker", nargs=3, metavar=("TREE", "ENV_FILE", "SPAWNED_AT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], args.worker[1], float(args.worker[2]))
        return
    trees = {"this_tree": REPO_ROOT}
    if args.baseline_tree:
        trees = {"baseline": args.baseline_tree.resolve(), **trees}
    with tempfile.TemporaryDirectory() as tmp:
        with contextlib.redirect_stdout(sys.stderr):  # qwen_tts prints a banner on import: stdout is the JSON
            env_file = make_kit(Path(tmp))
        for tree in trees.values():  # warm-up, not timed: writes bytecode and numba's caches, as a first run does
            run_worker(env_file, tree)
        runs = {name: [] for name in trees}
        for _ in range(args.reps):  # A/B/A/B: drift in the machine's load hits both
            for name, tree in trees.items():
                runs[name].append(run_worker(env_file, tree)[0])
        _, importtime_stderr = run_worker(env_file, importtime=True)
    report = {
        "kit": "tiny equal model, bundled speakers (4 clips each), default settings, DEVICE=cpu, one core",
        "reps": args.reps,
        **{name: summary(name_runs) for name, name_runs in runs.items()},
        "import_self_s": import_self_times(importtime_stderr),
    }
    if args.baseline_tree:
        report["baseline_tree"] = str(args.baseline_tree)
        for clock in ("time", "cpu"):
            key = f"{clock}_to_first_step_s"
            report[f"{clock}_ratio_this_tree_vs_baseline"] = round(
                report["this_tree"][key] / report["baseline"][key], 3
            )
    print(json.dumps(report, indent=2))


def summary(runs: list[dict]) -> dict:
    """Medians over reps of the time to the first step (wall and CPU) and of each phase; each rep's totals."""
    phases = list(runs[0]["wall"])

    def medians(clock: str) -> dict[str, float]:
        return {k: round(statistics.median(r[clock].get(k, 0.0) for r in runs), 3) for k in phases}

    totals = {clock: [sum(r[clock].values()) for r in runs] for clock in ("wall", "cpu")}
    return {
        "time_to_first_step_s": round(statistics.median(totals["wall"]), 3),
        "cpu_to_first_step_s": round(statistics.median(totals["cpu"]), 3),
        "time_to_first_step_each_s": [round(t, 3) for t in totals["wall"]],
        "cpu_to_first_step_each_s": [round(t, 3) for t in totals["cpu"]],
        "phases_wall_median_s": medians("wall"),
        "phases_cpu_median_s": medians("cpu"),
        "imported_at_first_step": runs[0]["imported_at_first_step"],
    }


if __name__ == "__main__":
    main()
