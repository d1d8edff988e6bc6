"""Kill anywhere: a preparation, a short training run with saves and its export, each SIGKILLed at points chosen
from the write sites, then run again.

A forked copy of this process (all imports done once, here) counts the calls to every write site: the functions
of ``finetuning.atomic``, clip-cache entries, parquet shards, training states and the export. A run killed at call
N (before that call does anything) is followed by the same run again. Each time: nothing good was lost at the kill
(a config, the previous export: the old copy or the new one is complete), the re-run finishes, and its outputs
equal an uninterrupted run's (dataset files byte for byte, final weights bit for bit).

The suite tries ``POINTS`` kill points per phase, spread evenly over that phase's write calls;
``--kill-every-site`` adds the run over every write call of every phase (``test_kill_at_every_write_site``, minutes:
too long for the suite).
"""

import hashlib
import shutil
from pathlib import Path

import datasets
import pytest
import torch
from accelerate import Accelerator
from conftest import make_settings, prepare_small_dataset, run_killed
from safetensors.torch import load_file

from finetuning import atomic
from finetuning.preparation import clip_cache
from finetuning.preparation.encoder import SpeechEncoder
from finetuning.preparation.prepare import prepare_dataset
from finetuning.preparation.writing import local_configs
from finetuning.training.checkpointing import resolve_resume
from finetuning.training.export import RunExports
from finetuning.training.loop import train

POINTS = 4  # kill points per phase in the quick run
SPEAKER = "english_speaker"
WRITES = [(atomic, name) for name in ("fsync_file", "fsync_dir", "write_bytes", "replace_folder")]
PREPARATION_SITES = [*WRITES, (clip_cache.ClipCache, "store"), (datasets.Dataset, "to_parquet")]
COPIES = [(shutil, "copy2"), (shutil, "copyfile")]  # base-model files copied into an export
TRAINING_SITES = [*WRITES, *COPIES, (Accelerator, "save_state"), (RunExports, "export")]
TRAINING = {
    "MAX_STEPS": 4,
    "SAVE_STEPS": 1,
    "SAVE_TOTAL_LIMIT": 2,
    "GRADIENT_ACCUMULATION_STEPS": 1,
    "MAX_BATCH_TOKENS": 160,
    "LEARNING_RATE": 1e-3,
    "WARMUP_STEPS": 0,
    "EVAL_STEPS": 0,
    "LOGGING_STEPS": 1,
    "VALIDATION_FRACTION": 0.0,
    "REPORT_TO": "none",
    "RESUME_FROM": "latest",  # the same command after a kill continues from the newest complete state
}


def spread(count: int, points: int | None) -> list[int]:
    """``points`` call numbers spread evenly over 1..count (every one when ``points`` is None)."""
    if points is None or points >= count:
        return list(range(1, count + 1))
    return sorted({1 + round(i * (count - 1) / (points - 1)) for i in range(points)})


def hashes(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones left out) with its content hash."""
    files = [p.relative_to(folder) for p in sorted(folder.rglob("*")) if p.is_file()]
    files = [p for p in files if not any(part.startswith(".") for part in p.parts)]
    return {str(p): hashlib.sha256((folder / p).read_bytes()).hexdigest() for p in files}


# ---- preparation ----------------------------------------------------------------------------------------------


def _prepare(settings, max_samples: int) -> None:
    encoder = SpeechEncoder(settings.TOKENIZER_PATH, "cpu", settings.ENCODE_BATCH_SIZE)
    prepare_dataset(settings, encoder=encoder, max_samples=max_samples, report=lambda _: None)


def _config_complete(dataset: Path) -> str:
    """The speaker config in place (a copy a crash left aside put back, as the next run does): its fingerprint,
    after checking every shard it names reads."""
    atomic.restore_previous(dataset / SPEAKER)
    fingerprint = local_configs(dataset)[SPEAKER]["fingerprint"]
    for split in ("train", "reference"):
        files = sorted((dataset / SPEAKER).glob(f"{split}-{fingerprint[:12]}-*.parquet"))
        assert files and all(len(datasets.Dataset.from_parquet(str(f))) for f in files), split
    return fingerprint


def preparation_kills(root: Path, tiny_model_dir: Path, points: int | None) -> int:
    """Kill a preparation that re-prepares a speaker (an earlier config of it in place) at ``points`` write calls;
    returns the number of kill points tried."""
    settings = make_settings(root / "straight", tiny_model_dir, TRAIN_SPEAKERS=SPEAKER, ENCODE_BATCH_SIZE=2)
    _prepare(settings, 2)  # the earlier config
    earlier = _config_complete(Path(settings.DATASET_DIR))
    template = root / "template"
    shutil.copytree(settings.DATASET_DIR, template)
    _, trace = run_killed(lambda: _prepare(settings, 4), PREPARATION_SITES)
    straight = hashes(Path(settings.DATASET_DIR))
    new = _config_complete(Path(settings.DATASET_DIR))
    kills = spread(len(trace), points)
    for kill_at in kills:
        dataset = root / f"kill{kill_at}" / "dataset"
        shutil.copytree(template, dataset)
        killed = make_settings(dataset.parent, tiny_model_dir, TRAIN_SPEAKERS=SPEAKER, ENCODE_BATCH_SIZE=2)
        run = lambda killed=killed: _prepare(killed, 4)  # noqa: E731
        assert run_killed(run, PREPARATION_SITES, kill_at)[0], kill_at
        assert _config_complete(dataset) in (earlier, new), kill_at  # the earlier config or the new one, whole
        assert not run_killed(run, [])[0]
        assert hashes(dataset) == straight, kill_at
        shutil.rmtree(dataset.parent)
    print(f"preparation: {len(kills)} kill points of {len(trace)} write calls")
    return len(kills)


# ---- training and export ----------------------------------------------------------------------------------------


def _export_complete(export_dir: Path, exports: dict[str, dict[str, str]]) -> None:
    """EXPORT_DIR holds one whole export (a copy a crash left aside put back, as the next run does)."""
    atomic.restore_previous(export_dir)
    assert hashes(export_dir) in exports.values()


def training_kills(root: Path, tiny_model_dir: Path, points: int | None) -> dict[str, int]:
    """Kill a training run (an earlier export in its EXPORT_DIR) at ``points`` write calls of its training part and
    of its export; returns the kill points tried per phase. Re-runs end with the uninterrupted run's weights."""
    base = dict(TRAINING, DATASET_DIR=root / "dataset", DATALOADER_WORKERS=0)

    def settings(name: str, **extra):
        return make_settings(root / name, tiny_model_dir, **{**base, **extra})

    assert not run_killed(lambda: train(settings("earlier", MAX_STEPS=1)), [])[0]
    earlier_export = root / "earlier" / "run" / "model"
    straight = settings("straight", EXPORT_DIR=root / "straight" / "export")
    shutil.copytree(earlier_export, straight.EXPORT_DIR)
    _, trace = run_killed(lambda: train(straight), TRAINING_SITES)
    final = load_file(str(Path(straight.EXPORT_DIR) / "model.safetensors"))
    exports = {"earlier": hashes(earlier_export), "final": hashes(Path(straight.EXPORT_DIR))}
    export_call = trace.index("export") + 1
    phases = {"training": spread(export_call - 1, points), "export": spread(len(trace) - export_call + 1, points)}
    phases["export"] = [export_call - 1 + n for n in phases["export"]]
    for kill_at in phases["training"] + phases["export"]:
        killed = settings(f"kill{kill_at}", EXPORT_DIR=root / f"kill{kill_at}" / "export")
        shutil.copytree(earlier_export, killed.EXPORT_DIR)
        run = lambda killed=killed: train(killed)  # noqa: E731
        assert run_killed(run, TRAINING_SITES, kill_at)[0], kill_at
        _export_complete(Path(killed.EXPORT_DIR), exports)  # the earlier export or the new one, whole
        latest = resolve_resume("latest", killed.OUTPUT_DIR)
        newest = 0 if latest is None else int(latest.name.split("-")[1])
        assert latest is None or (latest / "progress.done").read_text() == str(newest)
        saved_before = trace[: kill_at - 1].count("save_state") - 1  # the last one begun may be cut short
        assert newest >= saved_before, kill_at  # the newest state saved before the kill is kept
        assert not run_killed(run, [])[0], kill_at
        weights = load_file(str(Path(killed.EXPORT_DIR) / "model.safetensors"))
        assert weights.keys() == final.keys()
        differing = [name for name in final if not torch.equal(weights[name], final[name])]
        assert not differing, f"kill at call {kill_at}: weights differ from the uninterrupted run's: {differing[:3]}"
        shutil.rmtree(root / f"kill{kill_at}")
    print(
        f"kill points: {len(phases['training'])} training, {len(phases['export'])} export "
        f"of {export_call - 1} and {len(trace) - export_call + 1} write calls"
    )
    return {phase: len(kills) for phase, kills in phases.items()}


@pytest.fixture(scope="module")
def prepared_root(tiny_model_dir, tmp_path_factory):
    return prepare_small_dataset(tmp_path_factory, "kill_anywhere", tiny_model_dir)


def test_kill_anywhere_a_few_points_per_phase(prepared_root, tiny_model_dir, tmp_path):
    assert preparation_kills(tmp_path / "prepare", tiny_model_dir, POINTS) == POINTS
    assert training_kills(prepared_root, tiny_model_dir, POINTS) == {"training": POINTS, "export": POINTS}


def test_kill_at_every_write_site(prepared_root, tiny_model_dir, tmp_path, request):
    if not request.config.getoption("--kill-every-site"):
        pytest.skip("the run over every write call takes minutes: pytest --kill-every-site")
    assert preparation_kills(tmp_path / "prepare", tiny_model_dir, None) >= 20
    assert min(training_kills(prepared_root, tiny_model_dir, None).values()) >= 20
