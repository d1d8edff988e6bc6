"""Resume after a hard kill, keep-last-N states, and two processes under ``accelerate launch``."""

import json
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import (
    REPO_ROOT,
    assert_stock_loadable_export,
    free_port,
    prepare_small_dataset,
    subprocess_env,
    write_env_file,
)

FINETUNE = str(REPO_ROOT / "finetuning" / "finetune.py")
STEPS = 16
SAVE_STEPS = 4


@pytest.fixture(scope="module")
def prepared(tiny_model_dir, tmp_path_factory):
    return prepare_small_dataset(tmp_path_factory, "resume", tiny_model_dir), tiny_model_dir


def _env_file(root, model_dir, name, **extra):
    values = {
        "MIXED_PRECISION": "no",
        "MAX_STEPS": STEPS,
        "SAVE_STEPS": SAVE_STEPS,
        "SAVE_TOTAL_LIMIT": 2,
        "MAX_BATCH_TOKENS": 160,
        "GRADIENT_ACCUMULATION_STEPS": 2,
        "LEARNING_RATE": 1e-3,
        "WARMUP_STEPS": 5,
        "EVAL_STEPS": 0,
        "LOGGING_STEPS": 5,
        "DATALOADER_WORKERS": 0,
        "VALIDATION_FRACTION": 0.0,
        "USE_AUXILIARY_LOSSES": "true",  # resumed crops and cadence must match too
        "AUX_LOSS_EVERY_N_STEPS": 3,  # not a divisor of the accumulation-aligned save points
        **extra,
    }
    return write_env_file(root, model_dir, name, values)


def _finetune(env_file):
    return subprocess.run(
        [sys.executable, FINETUNE, "--env-file", str(env_file)],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=600,
    )


def _weights(export_dir):
    from safetensors.torch import load_file

    return load_file(str(export_dir / "model.safetensors"))


def _states(output_dir):
    return sorted(p.name for p in (output_dir / "states").glob("step-*"))


@pytest.mark.slow
def test_hard_killed_run_resumes_to_the_same_weights(prepared):
    from finetuning.settings import load_settings
    from finetuning.training.loop import train

    root, model_dir = prepared
    # The uninterrupted run in this process (the same settings file); the killed one as a user runs it.
    train(load_settings(_env_file(root, model_dir, "straight"), environ={}))
    assert _states(root / "straight") == [f"step-{STEPS - SAVE_STEPS:08d}", f"step-{STEPS:08d}"]  # keep-last-2

    env_file = _env_file(root, model_dir, "killed", RESUME_FROM="latest")  # same settings as "straight"
    proc = subprocess.Popen(
        [sys.executable, FINETUNE, "--env-file", str(env_file)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=subprocess_env(),
    )
    marker = root / "killed" / "states" / f"step-{2 * SAVE_STEPS:08d}" / "progress.done"
    deadline = time.monotonic() + 600
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert marker.exists() and proc.returncode == -signal.SIGKILL
    assert not (root / "killed" / "model").exists(), "the run finished before it could be killed"
    assert len(_states(root / "killed")) <= 2

    resumed = subprocess.run(
        [sys.executable, FINETUNE, "--env-file", str(env_file)],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    a, b = _weights(root / "straight" / "model"), _weights(root / "killed" / "model")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)
    metrics = [json.loads(line) for line in (root / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == STEPS


@pytest.mark.slow
def test_sigterm_saves_a_state_and_exits_cleanly(prepared):
    root, model_dir = prepared
    env_file = _env_file(root, model_dir, "terminated", SAVE_STEPS=0, MAX_STEPS=100000)
    proc = subprocess.Popen(
        [sys.executable, FINETUNE, "--env-file", str(env_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
    )
    metrics = root / "terminated" / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while not metrics.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 130, err[-2000:]
    assert "RESUME_FROM=latest" in out
    assert len(_states(root / "terminated")) == 1


def test_bad_resume_path_is_a_clear_error(prepared):
    root, model_dir = prepared
    env_file = _env_file(root, model_dir, "bad_resume", RESUME_FROM=str(root / "no_such_state"))
    proc = _finetune(env_file)
    assert proc.returncode == 1 and "RESUME_FROM" in proc.stderr and "Traceback" not in proc.stderr


def _stream_shards(root, model_dir, epochs: int, **values) -> list[list[list[str]]]:
    """Per epoch, the id batches of the whole stream of ``values``'s settings, shard of rank 0 then rank 1 (as
    ``StreamingBatches`` plans them in one process), each cut to the count both processes take."""
    from conftest import make_settings
    from transformers import AutoTokenizer

    from finetuning.training.streaming import StreamingBatches

    settings = make_settings(root, model_dir, **values)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    talker_config = type("TalkerConfig", (), json.loads((model_dir / "config.json").read_text())["talker_config"])
    shards = [StreamingBatches(settings, tokenizer, talker_config, num_replicas=2, rank=r) for r in range(2)]
    planned = []
    for epoch in range(epochs):
        for shard in shards:
            shard.set_epoch(epoch)
        assert len(shards[0]) == len(shards[1]) > 0  # every process takes the same number of batches
        planned.append([[batch["id"] for batch in shard] for shard in shards])
    return planned


@pytest.mark.slow
def test_two_processes_see_disjoint_samples_and_end_identical(prepared):
    """Two processes on the data stream (DATA_STREAMING; map-style sharding runs in the engine tests): each trains
    on its own ``split_dataset_by_node`` shard, both stop every epoch at the same batch count."""
    root, model_dir = prepared
    streaming = {"DATA_STREAMING": "true", "SPEAKER_MIXING": "proportional", "STREAM_SHUFFLE_BUFFER": 4}
    # bf16: the mixed-precision path (autocast on the CPU) runs too, not only fp32
    env_file = _env_file(
        root, model_dir, "ddp", RECORD_SAMPLE_IDS="true", MAX_STEPS=6, SAVE_STEPS=6, MIXED_PRECISION="bf16", **streaming
    )
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",  # torchrun-style DDP; without CUDA (and DEVICE=cpu) the two processes use gloo on the CPU
        "--num_processes",
        "2",
        "--main_process_port",
        str(free_port()),
        FINETUNE,
        "--env-file",
        str(env_file),
    ]
    proc = subprocess.run(command, capture_output=True, text=True, env=subprocess_env(), timeout=900, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert len(re.findall(r"engine MULTI_CPU on cpu\S*, 2 process\(es\), mixed precision bf16", proc.stderr)) == 2
    logs = [
        [json.loads(line) for line in (root / "ddp" / f"samples_rank{r}.jsonl").read_text().splitlines()]
        for r in range(2)
    ]
    epochs = [[rec["epoch"] for rec in log if "epoch" in rec] for log in logs]
    assert len(epochs[0]) == len(epochs[1]) == 6 * 2 and epochs[0] == epochs[1]  # a batch record per micro-batch
    planned = _stream_shards(root, model_dir, max(epochs[0]) + 1, MAX_BATCH_TOKENS=160, **streaming)
    for epoch in set(epochs[0]):
        trained = [[rec["ids"] for rec in log if rec.get("epoch") == epoch] for log in logs]
        complete = epoch < max(epochs[0])  # the last epoch stops at MAX_STEPS
        assert trained == planned[epoch] if complete else trained == [p[: len(trained[0])] for p in planned[epoch]]
        seen = [{i for ids in batches for i in ids} for batches in trained]
        assert seen[0] and seen[1] and not seen[0] & seen[1]
    sums = [log[-1]["final_parameter_sum"] for log in logs]
    assert sums[0] == pytest.approx(sums[1], rel=1e-9)
    assert_stock_loadable_export(root / "ddp" / "model", model_dir, ("english_speaker", "swahili_speaker"))

    # The same run resumed in one process would replay another plan: refused, naming the process count.
    from finetuning.settings import load_settings
    from finetuning.training.checkpointing import ResumeError
    from finetuning.training.loop import train

    one_process = _env_file(root, model_dir, "ddp", MAX_STEPS=8, RESUME_FROM=root / "ddp" / "states" / "step-00000006")
    with pytest.raises(ResumeError, match=re.escape("num_processes (saved 2, now 1)")):
        train(load_settings(one_process, environ={}))


def test_resume_refuses_a_changed_seed_or_speaker_order_naming_each_key(prepared, tmp_path):
    from conftest import make_settings

    from finetuning.training.checkpointing import ResumeError
    from finetuning.training.loop import train

    root, model_dir = prepared
    common = {
        "OUTPUT_DIR": tmp_path / "run",
        "MAX_STEPS": 2,
        "SAVE_STEPS": 2,
        "MAX_BATCH_TOKENS": 160,
        "EVAL_STEPS": 0,
        "VALIDATION_FRACTION": 0.0,
        "REPORT_TO": "none",
    }
    train(make_settings(root, model_dir, **common))
    assert _states(tmp_path / "run") == ["step-00000002"]
    with pytest.raises(ResumeError, match="SEED") as refused:
        train(make_settings(root, model_dir, **common, RESUME_FROM="latest", SEED=7))
    assert "TRAIN_SPEAKERS" not in str(refused.value)
    reordered = "swahili_speaker,english_speaker"
    with pytest.raises(ResumeError) as refused:
        train(make_settings(root, model_dir, **common, RESUME_FROM="latest", SEED=7, TRAIN_SPEAKERS=reordered))
    message = str(refused.value)
    assert "SEED (saved 42, now 7)" in message and "TRAIN_SPEAKERS" in message and "swahili_speaker" in message


@pytest.mark.parametrize("optimizer, method", [("adamw_8bit", "full"), ("adafactor", "lora")])
def test_each_optimizer_resumes_to_the_same_weights(prepared, tmp_path, optimizer, method):
    """OPTIMIZER's state goes through the saved training state: a run resumed from its middle state (in another
    OUTPUT_DIR) ends with the straight run's weights; resuming it under another OPTIMIZER is refused."""
    from conftest import make_settings

    from finetuning.training.checkpointing import ResumeError, state_dir
    from finetuning.training.loop import train

    root, model_dir = prepared
    common = {
        "MAX_STEPS": 6,
        "SAVE_STEPS": 3,
        "MAX_BATCH_TOKENS": 160,
        "LEARNING_RATE": 1e-3,
        "WARMUP_STEPS": 2,
        "EVAL_STEPS": 0,
        "VALIDATION_FRACTION": 0.0,
        "REPORT_TO": "none",
        "OPTIMIZER": optimizer,
        "FINETUNE_METHOD": method,
    }
    straight = train(make_settings(root, model_dir, **common, OUTPUT_DIR=tmp_path / "straight"))
    middle = state_dir(tmp_path / "straight", 3)
    resumed = train(make_settings(root, model_dir, **common, OUTPUT_DIR=tmp_path / "resumed", RESUME_FROM=middle))
    assert straight.optimizer_steps == resumed.optimizer_steps == 6
    a, b = _weights(straight.export_dir), _weights(resumed.export_dir)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-7, msg=name)
    with pytest.raises(ResumeError, match=f"OPTIMIZER \\(saved '{optimizer}', now 'adamw'\\)"):
        train(
            make_settings(
                root, model_dir, **{**common, "OPTIMIZER": "adamw"}, OUTPUT_DIR=tmp_path / "changed", RESUME_FROM=middle
            )
        )


def test_resuming_from_an_older_state_sets_newer_ones_aside_and_rotation_keeps_it(prepared, tmp_path):
    """States 1, 2, 3; resume from step 1 (as the message about a corrupt state suggests) with 2 kept: the
    original 2 and 3 are moved aside untouched, the named state 1 and the new 2 stay, and 'latest' is the new 2.
    With SAVE_STEPS=0 the last step is saved before the export and removed once the export is in place."""
    from conftest import make_settings

    from finetuning.training.checkpointing import SUPERSEDED_DIR, resolve_resume, saved_states
    from finetuning.training.loop import train

    root, model_dir = prepared
    common = {"OUTPUT_DIR": tmp_path / "run", "DATASET_DIR": root / "dataset", "VALIDATION_FRACTION": 0.0}
    common.update({"GRADIENT_ACCUMULATION_STEPS": 1, "EVAL_STEPS": 0, "REPORT_TO": "none", "SAVE_STEPS": 1})
    train(make_settings(tmp_path, model_dir, **common, MAX_STEPS=3, SAVE_TOTAL_LIMIT=3))
    states = tmp_path / "run" / "states"
    original = {p.name: (p / "model.safetensors").read_bytes() for p in saved_states(tmp_path / "run")}
    assert sorted(original) == ["step-00000001", "step-00000002", "step-00000003"]

    named = states / "step-00000001"
    train(make_settings(tmp_path, model_dir, **common, MAX_STEPS=2, SAVE_TOTAL_LIMIT=2, RESUME_FROM=named))
    assert [p.name for p in saved_states(tmp_path / "run")] == ["step-00000001", "step-00000002"]
    assert (named / "model.safetensors").read_bytes() == original["step-00000001"]
    (aside,) = (tmp_path / "run" / SUPERSEDED_DIR).iterdir()
    assert {p.name: (p / "model.safetensors").read_bytes() for p in aside.iterdir()} == {
        name: data for name, data in original.items() if name != "step-00000001"
    }
    assert resolve_resume("latest", tmp_path / "run") == states / "step-00000002"

    saved = []
    import finetuning.training.loop as loop

    real_save = loop.save_training_state

    def recording_save(*args):
        saved.append((args[2], (tmp_path / "b" / "model").exists()))  # (step, exported yet?)
        return real_save(*args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "save_training_state", recording_save)
        no_saves = {**common, "OUTPUT_DIR": tmp_path / "b", "SAVE_STEPS": 0, "MAX_STEPS": 2}
        result = train(make_settings(tmp_path / "b", model_dir, **no_saves))
    assert saved == [(2, False)] and result.export_dir is not None and saved_states(tmp_path / "b") == []
