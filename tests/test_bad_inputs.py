"""Every bad input gets one line: each case runs a real entry point in a subprocess, as a user would, and checks
the exit code, exactly one ``error:`` line on stderr naming the key, file or speaker, and no traceback. Where
skipping is right (a bad line in a source), the run goes on and the skip is logged and counted."""

import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import REPO_ROOT, VOICES_DIR, make_settings, speechlike, subprocess_env, write_wav

COMMANDS = REPO_ROOT / "finetuning"
PARALLEL_COMMANDS = 3  # independent failing commands run side by side: each spends seconds importing torch


def run(args: list[str], cwd: Path, **environ: str) -> subprocess.CompletedProcess:
    env = {**subprocess_env(), **environ}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env, check=False
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, code: int, *names: str) -> str:
    """The command exited with ``code`` and wrote exactly one ``error:`` line, naming each of ``names``."""
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == code and len(errors) == 1, (proc.returncode, proc.stderr[-3000:])
    for name in names:
        assert name in errors[0], (name, errors[0])
    return errors[0]


def write_env(path: Path, **values) -> Path:
    path.write_text("".join(f"{key}={value}\n" for key, value in values.items()))
    return path


def model_env(tmp_path: Path, model_dir: Path, **values) -> Path:
    base = {
        "INIT_MODEL_PATH": model_dir,
        "TOKENIZER_PATH": model_dir / "speech_tokenizer",
        "VOICES_DIR": VOICES_DIR,
        "DATASET_DIR": tmp_path / "dataset",
        "OUTPUT_DIR": tmp_path / "run",
        "DEVICE": "cpu",
        "MIXED_PRECISION": "no",
        "DATALOADER_WORKERS": 0,
        "REPORT_TO": "none",
    }
    return write_env(tmp_path / f"{len(list(tmp_path.glob('*.env')))}.env", **{**base, **values})


@pytest.mark.parametrize(
    ("value", "expected"),
    [("abc", "LEARNING_RATE='abc' is not a number"), ("inf", "finite"), ("nan", "finite")],
)
def test_settings_command_refuses_a_bad_number_in_one_line(tmp_path, value, expected):
    proc = run(["-m", "finetuning.settings"], tmp_path, LEARNING_RATE=value)
    assert_one_line_error(proc, 2, "LEARNING_RATE", expected)


def test_an_environment_variable_one_edit_from_a_key_is_warned_about(tmp_path):
    proc = run(["-m", "finetuning.settings"], tmp_path, LEARNING_RAET="1e-4", SEDE="3")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr
    assert "LEARNING_RAET" in proc.stderr and "did you mean LEARNING_RATE" in proc.stderr
    assert "did you mean SEED" in proc.stderr
    assert json.loads(proc.stdout)["LEARNING_RATE"] == 2e-5  # the misspelt variable was not read


def test_commands_name_the_bad_path_in_one_line(tmp_path, tiny_model_dir):
    (tmp_path / "a_file").write_text("not a folder")
    no_weights = shutil.copytree(tiny_model_dir, tmp_path / "no_weights")
    (no_weights / "model.safetensors").unlink()
    no_config = shutil.copytree(tiny_model_dir, tmp_path / "no_config")
    (no_config / "config.json").unlink()
    custom_voice = shutil.copytree(tiny_model_dir, tmp_path / "custom_voice")  # no speaker encoder config needed
    config = json.loads((custom_voice / "config.json").read_text())
    (custom_voice / "config.json").write_text(json.dumps({**config, "tts_model_type": "custom_voice"}))
    finetune, generate = str(COMMANDS / "finetune.py"), str(COMMANDS / "generate.py")
    prepare = str(COMMANDS / "data_preparation.py")
    speak = ["--speaker", "english_speaker", "--output", str(tmp_path / "out.wav")]
    cases = {  # name: (arguments, exit code, what the error line must name)
        "output_dir_under_a_file": (
            [finetune, "--env-file", str(model_env(tmp_path, tiny_model_dir, OUTPUT_DIR=tmp_path / "a_file/run"))],
            1,
            ["OUTPUT_DIR=", "a_file/run", "cannot be created"],
        ),
        "init_model_path_missing": (
            [finetune, "--env-file", str(model_env(tmp_path, tiny_model_dir, INIT_MODEL_PATH=tmp_path / "nope"))],
            1,
            ["INIT_MODEL_PATH=", "no such folder"],
        ),
        "custom_voice_init_without_speaker_encoder": (
            [finetune, "--env-file", str(model_env(tmp_path, custom_voice))],
            1,
            ["INIT_MODEL_PATH=", "CustomVoice", "SPEAKER_ENCODER_PATH"],
        ),
        "tokenizer_path_missing": (
            [prepare, "--env-file", str(model_env(tmp_path, tiny_model_dir, TOKENIZER_PATH="./tokenizers/nope"))],
            1,
            ["TOKENIZER_PATH=./tokenizers/nope", "no such folder"],
        ),
        "checkpoint_missing": (
            [generate, "--checkpoint", str(tmp_path / "missing"), "--text", "Hello.", *speak],
            1,
            ["missing", "no such folder"],
        ),
        "checkpoint_without_weights": (
            [generate, "--checkpoint", str(no_weights), "--text", "Hello.", *speak],
            1,
            ["no_weights", "model.safetensors"],
        ),
        "checkpoint_without_config": (
            [generate, "--checkpoint", str(no_config), "--text", "Hello.", *speak],
            1,
            ["no_config", "config.json"],
        ),
        "empty_text": ([generate, "--checkpoint", str(tiny_model_dir), "--text", "   ", *speak], 2, ["--text"]),
        "speaker_leaving_dataset_dir": (
            [prepare, "--env-file", str(model_env(tmp_path, tiny_model_dir)), "--speaker", "english_speaker,../x"],
            2,
            ["--speaker='../x' is not allowed", "lower-case names"],
        ),
    }
    with ThreadPoolExecutor(PARALLEL_COMMANDS) as pool:
        procs = dict(zip(cases, pool.map(lambda case: run(case[0], tmp_path), cases.values()), strict=True))
    for name, (_, code, names) in cases.items():
        print(f"{name}: {assert_one_line_error(procs[name], code, *names)}")
    assert not (tmp_path / "out.wav").exists() and not (tmp_path / "x").exists()


def test_hub_id_that_cannot_be_fetched_offline_is_told_apart_from_a_missing_folder(tmp_path, monkeypatch):
    from finetuning.resources import ModelUnavailable, resolve_model_dir

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelUnavailable, match="INIT_MODEL_PATH=someone/uncached-model is not a local folder.*offline"):
        resolve_model_dir("someone/uncached-model", key="INIT_MODEL_PATH")
    (tmp_path / "models").mkdir()  # models/ exists here: models/base is a local path, not a Hub id
    with pytest.raises(ModelUnavailable, match="INIT_MODEL_PATH=models/base: no such folder"):
        resolve_model_dir("models/base", key="INIT_MODEL_PATH")


def _jsonl(rows: list) -> bytes:
    return b"".join((row if isinstance(row, bytes) else json.dumps(row).encode()) + b"\n" for row in rows)


def test_preparation_keeps_every_good_clip_names_bad_lines_and_keeps_finished_speakers(tmp_path, tiny_model_dir):
    """A source with good clips, a line of invalid UTF-8, a line that is not JSON, a path leaving the source
    folder and a repeated id; then a second speaker whose manifest reference is missing. The manifest sits in
    its own folder and names everything relative to it (the command runs from another folder)."""
    import datasets

    data = tmp_path / "data"
    write_wav(data / "refs" / "good_ref.wav", speechlike(3.0, seed=9))
    for index in range(3):
        write_wav(data / "good" / f"clip{index}.wav", speechlike(1.5, seed=index))
    (data / "good" / "metadata.jsonl").write_bytes(
        _jsonl(
            [
                {"audio": "clip0.wav", "text": "the first sentence", "id": "same"},
                {"audio": "clip1.wav", "text": "the second sentence", "id": "same"},
                {"audio": "clip2.wav", "text": "the third sentence"},
                b'{"audio": "clip0.wav", "text": "caf\xe9 au lait"}',  # Latin-1, not UTF-8
                b"audio=clip1.wav text=not json",
                {"audio": "../refs/good_ref.wav", "text": "a clip outside the source folder"},
            ]
        )
    )
    write_wav(data / "broken" / "clip0.wav", speechlike(1.5, seed=5))
    (data / "broken" / "metadata.jsonl").write_bytes(_jsonl([{"audio": "clip0.wav", "text": "a sentence"}]))
    manifest = {
        "good": {"source": "good/metadata.jsonl", "language": "english", "reference": "refs/good_ref.wav"},
        "broken": {"source": "broken", "reference": ["refs/missing.wav"]},
    }
    (data / "speakers.json").write_text(json.dumps(manifest))
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    env = model_env(
        tmp_path,
        tiny_model_dir,
        SPEAKERS_MANIFEST=data / "speakers.json",
        TRAIN_SPEAKERS="good,broken",
        DATASET_DIR=tmp_path / "dataset",
    )
    proc = run([str(COMMANDS / "data_preparation.py"), "--env-file", str(env)], workdir)

    assert_one_line_error(proc, 1, "speaker broken", str(data / "refs" / "missing.wav"), "prepared: good")
    assert "voices/broken.wav" not in proc.stderr
    source = data / "good" / "metadata.jsonl"
    assert f"{source}:4: bad_encoding" in proc.stderr
    assert f"{source}:5: not_json" in proc.stderr
    assert f"{source}:6: outside_source" in proc.stderr
    assert "speaker good: 1 duplicate id(s) renamed" in proc.stderr
    summary = json.loads((tmp_path / "dataset" / "preparation_summary.json").read_text())
    assert list(summary) == ["good"]
    assert summary["good"]["kept"] == 3 and summary["good"]["duplicate_ids"] == 1
    assert summary["good"]["rejected"] == {"bad_encoding": 1, "not_json": 1, "outside_source": 1}
    loaded = datasets.load_dataset(str(tmp_path / "dataset"), name="good")
    ids = sorted(row_id for split in ("train", "validation") for row_id in loaded[split]["id"])
    assert ids == ["clip2", "same", "same-2"]


@pytest.fixture(scope="module")
def saved_run(tiny_model_dir, tmp_path_factory):
    """A 2-step run of one speaker that saved a state at each step: (root, env values)."""
    from finetuning.preparation.prepare import prepare_dataset
    from finetuning.training.loop import train

    root = tmp_path_factory.mktemp("saved_run")
    values = {"TRAIN_SPEAKERS": "english_speaker", "VALIDATION_FRACTION": 0.0, "MAX_STEPS": 2, "SAVE_STEPS": 1}
    values.update({"GRADIENT_ACCUMULATION_STEPS": 1, "EVAL_STEPS": 0, "REPORT_TO": "none"})
    settings = make_settings(root, tiny_model_dir, **values)
    prepare_dataset(settings, max_samples=2, report=lambda _: None)
    train(settings)
    return root, values


def test_a_corrupt_resume_state_is_named_with_the_previous_one(saved_run, tiny_model_dir):
    root, values = saved_run
    states = root / "run" / "states"
    assert sorted(p.name for p in states.iterdir()) == ["step-00000001", "step-00000002"]
    weights = states / "step-00000002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a copy cut short
    env = model_env(root, tiny_model_dir, **values, RESUME_FROM="latest")
    proc = run([str(COMMANDS / "finetune.py"), "--env-file", str(env)], root)
    assert_one_line_error(proc, 1, "step-00000002", "truncated or corrupt", f"RESUME_FROM={states / 'step-00000001'}")


def test_an_export_dir_that_would_delete_inputs_is_refused_before_training(tmp_path, tiny_model_dir):
    """EXPORT_DIR = OUTPUT_DIR, a parent of OUTPUT_DIR holding an unrelated file, the Base model folder or a folder
    inside the dataset: each stops with one line naming the conflict, and nothing is written or removed."""
    base = shutil.copytree(tiny_model_dir, tmp_path / "base")  # a copy: a broken guard must not touch the fixture
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "notes.txt").write_text("mine")
    run_dir, dataset = tmp_path / "outputs" / "run", tmp_path / "dataset"
    finetune = str(COMMANDS / "finetune.py")
    cases = {  # name: (EXPORT_DIR, what the error line must name)
        "output_dir": (run_dir, ["is OUTPUT_DIR="]),
        "parent_of_output_dir": (tmp_path / "outputs", ["contains OUTPUT_DIR="]),
        "base_model": (base, ["is INIT_MODEL_PATH="]),
        "inside_dataset": (dataset / "model", ["is inside DATASET_DIR="]),
    }
    envs = {
        name: model_env(tmp_path, base, OUTPUT_DIR=run_dir, DATASET_DIR=dataset, EXPORT_DIR=export)
        for name, (export, _) in cases.items()
    }
    with ThreadPoolExecutor(PARALLEL_COMMANDS) as pool:
        outcomes = pool.map(lambda env: run([finetune, "--env-file", str(env)], tmp_path), envs.values())
        procs = dict(zip(cases, outcomes, strict=True))
    for name, (export, names) in cases.items():
        print(f"{name}: {assert_one_line_error(procs[name], 1, f'EXPORT_DIR={export}', *names, 'EXPORT_DIR to a new')}")
    assert not run_dir.exists() and not dataset.exists()  # refused before anything was written
    assert (tmp_path / "outputs" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in base.iterdir()) == sorted(p.name for p in tiny_model_dir.iterdir())


def test_files_cut_short_by_a_crash_are_named_or_skipped_never_a_json_error(saved_run, tiny_model_dir, tmp_path):
    """Copies of a saved run: the newest state's marker and identity file cut short, the last metrics line torn.
    RESUME_FROM=latest skips the state whose marker is torn and finishes; RESUME_FROM naming the state with the
    torn identity file stops with one line naming the file and the older state."""
    root, values = saved_run
    envs = {}
    for name in ("named", "latest"):
        run_dir = shutil.copytree(root / "run", tmp_path / name, ignore=shutil.ignore_patterns("model"))
        newest = run_dir / "states" / "step-00000002"
        (newest / "run_identity.json").write_text('{"SEED": 4')
        (newest / "progress.done").write_text("")
        metrics = run_dir / "metrics.jsonl"
        metrics.write_text(metrics.read_text() + '{"step": 2, "train/lo')
        resume = newest if name == "named" else "latest"
        paths = {"DATASET_DIR": root / "dataset", "OUTPUT_DIR": run_dir, "RESUME_FROM": resume}
        envs[name] = model_env(tmp_path, tiny_model_dir, **{**values, **paths})
    finetune = str(COMMANDS / "finetune.py")
    with ThreadPoolExecutor(2) as pool:
        refused, resumed = pool.map(lambda env: run([finetune, "--env-file", str(env)], tmp_path), envs.values())
    older = tmp_path / "named" / "states" / "step-00000001"
    assert_one_line_error(refused, 1, "run_identity.json is damaged", f"RESUME_FROM={older}")
    assert resumed.returncode == 0 and "Traceback" not in resumed.stderr, resumed.stderr[-3000:]
    assert "dropped 1 damaged line" in resumed.stderr
    metrics = tmp_path / "latest" / "metrics.jsonl"
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()][-1] == 2  # the torn line gone


def test_a_second_run_on_the_same_folders_stops_with_the_lock(saved_run, tiny_model_dir, tmp_path):
    """Two concurrent training runs on one OUTPUT_DIR: the first is paused (SIGSTOP) once it holds the lock; the
    second stops with one line naming the first's pid, and so does a preparation of the DATASET_DIR the first reads;
    the first then finishes and releases both. (Readers sharing DATASET_DIR, a training refused while a preparation
    writes it, and a lock left by a process that is gone: ``tests/test_locks.py``.)"""
    import os
    import signal
    import time

    from finetuning.locks import LOCK_FILE, READER_PREFIX

    root, values = saved_run
    env = model_env(
        tmp_path, tiny_model_dir, **{**values, "SAVE_STEPS": 0, "MAX_STEPS": 1}, DATASET_DIR=root / "dataset"
    )
    finetune = [sys.executable, str(COMMANDS / "finetune.py"), "--env-file", str(env)]
    first = subprocess.Popen(
        finetune, cwd=tmp_path, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    lock = tmp_path / "run" / LOCK_FILE
    deadline = time.monotonic() + 240
    reading = root / "dataset" / f"{READER_PREFIX}{first.pid}"
    while not reading.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(first.pid, signal.SIGSTOP)
    try:
        assert lock.read_text() == str(first.pid)
        second = run(finetune[1:], tmp_path)
        busy = run([str(COMMANDS / "data_preparation.py"), "--env-file", str(env)], tmp_path)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert_one_line_error(second, 1, f"another run is using OUTPUT_DIR={tmp_path / 'run'} (pid {first.pid})")
    assert_one_line_error(busy, 1, f"another run is using DATASET_DIR={root / 'dataset'} (pid {first.pid})")
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-3000:]
    assert not lock.exists() and not list((root / "dataset").glob(f"{READER_PREFIX}*"))  # released at the end
