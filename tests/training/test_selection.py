"""Hand back the best model, not the last: ``best/`` and early stopping on a tiny run built to overfit.

Two clips per speaker train, two are held out, at a high constant learning rate: the validation loss falls for a
few evaluations, then rises as the model memorises its four clips (the logged curve is printed). ``best/`` must hold
exactly the weights of the evaluation with the lowest validation loss, compared tensor by tensor with the training
state saved at that step, and load with stock ``from_pretrained``. Early stopping ends the same run PATIENCE
evaluations after that step, also when the run is killed after the best step and resumed (the selection history
comes back with the state).
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, assert_stock_loadable_export, make_settings, subprocess_env, write_env_file

from finetuning.training.export import BEST_DIR, INFO_FILE
from finetuning.training.selection import Selection

pytestmark = pytest.mark.slow  # trains tiny models

SPEAKERS = ("english_speaker", "swahili_speaker")
EVAL_STEPS = 4
STEPS = 40  # measured: the validation loss is lowest near step 16 and rises by ~2 nats by step 40
PATIENCE = 3
SPEAKER_ROWS = (3000, 3001)  # set from the speaker embeddings at export, not trained


def _values(**extra) -> dict:
    return {
        "TRAIN_SPEAKERS": ",".join(SPEAKERS),
        "VALIDATION_FRACTION": 0.5,  # 2 of 4 clips per speaker held out
        "MAX_BATCH_TOKENS": 0,
        "BATCH_SIZE": 4,  # every training clip in each batch
        "GRADIENT_ACCUMULATION_STEPS": 1,
        "LEARNING_RATE": 1e-2,
        "LR_SCHEDULE": "constant",
        "WARMUP_STEPS": 0,
        "WEIGHT_DECAY": 0.0,
        "MAX_STEPS": STEPS,
        "LOGGING_STEPS": EVAL_STEPS,
        "EVAL_STEPS": EVAL_STEPS,
        "EVAL_MAX_BATCHES": 0,
        "SAVE_STEPS": EVAL_STEPS,
        "SAVE_TOTAL_LIMIT": STEPS // EVAL_STEPS + 1,  # every state kept, to compare best/ with its step's state
        "REPORT_TO": "none",
        **extra,
    }


@pytest.fixture(scope="module")
def prepared(tiny_model_dir, tmp_path_factory):
    from finetuning.preparation.prepare import prepare_dataset

    root = tmp_path_factory.mktemp("selection")
    prepare_dataset(make_settings(root, tiny_model_dir, **_values()), max_samples=4, report=lambda _: None)
    return root, tiny_model_dir


def _train(prepared, name, **extra):
    from finetuning.training.loop import train

    root, model_dir = prepared
    settings = make_settings(root, model_dir, OUTPUT_DIR=root / name, **_values(**extra))
    return settings, train(settings)


@pytest.fixture(scope="module")
def overfit(prepared):
    return _train(prepared, "overfit")


def curve(result) -> list[tuple[int, float]]:
    """(step, eval_loss) of every evaluation the selection recorded, as logged to metrics.jsonl."""
    return [(r["step"], r["select/eval_loss"]) for r in result.history if "select/eval_loss" in r]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def assert_same_as_state(export: Path, state: Path) -> None:
    """Every tensor of ``export`` equals the training state's (its ``model.`` keys), speaker rows aside."""
    exported, saved = _weights(export), _weights(state)
    assert set(exported) == {k.removeprefix("model.") for k in saved if not k.startswith("model.speaker_encoder.")}
    for name, tensor in exported.items():
        expected = saved[f"model.{name}"]
        if name == "talker.model.codec_embedding.weight":
            keep = torch.ones(tensor.shape[0], dtype=torch.bool)
            keep[list(SPEAKER_ROWS)] = False
            tensor, expected = tensor[keep], expected[keep]
        assert torch.equal(tensor, expected), name


def test_best_holds_the_weights_of_the_lowest_validation_loss(overfit, tiny_model_dir):
    settings, result = overfit
    logged = curve(result)
    print("\nstep  eval_loss  (SELECT_BY=eval_loss, probe: every validation batch)")
    for step, value in logged:
        print(f"{step:4d}  {value:9.4f}")
    steps = [s for s, _ in logged]
    assert steps == list(range(EVAL_STEPS, STEPS + 1, EVAL_STEPS))  # every EVAL_STEPS step and the last
    best_step, best_value = min(logged, key=lambda item: item[1])
    assert steps[0] < best_step < steps[-1], "the curve must fall, then rise"
    assert logged[0][1] - best_value > 1.0 and logged[-1][1] - best_value > 1.0, logged

    info = json.loads((result.best_dir / INFO_FILE).read_text())
    assert result.best_dir == Path(settings.OUTPUT_DIR) / BEST_DIR
    assert info["selection"]["step"] == info["optimizer_steps"] == best_step
    assert info["selection"]["select_by"] == "eval_loss" and info["selection"]["better"] == "lower"
    assert math.isclose(info["selection"]["value"], best_value)
    assert "lowest eval_loss" in info["selection"]["reason"]
    states = Path(settings.OUTPUT_DIR) / "states"
    assert_same_as_state(result.best_dir, states / f"step-{best_step:08d}")
    assert_same_as_state(result.export_dir, states / f"step-{STEPS:08d}")  # the last export stays the last
    assert not torch.equal(
        _weights(result.best_dir)["talker.model.layers.0.mlp.up_proj.weight"],
        _weights(result.export_dir)["talker.model.layers.0.mlp.up_proj.weight"],
    )
    assert_stock_loadable_export(result.best_dir, tiny_model_dir, SPEAKERS)
    assert not list(Path(settings.OUTPUT_DIR).glob(".best-*")), "staging folders must not be left behind"


def test_generate_speaks_with_the_best_export(overfit, tmp_path):
    from finetuning.generate import main

    _, result = overfit
    output = tmp_path / "best.wav"
    argv = ["--checkpoint", str(result.best_dir), "--speaker", SPEAKERS[0], "--text", "Hello there."]
    assert main([*argv, "--output", str(output), "--greedy", "--max_new_tokens", "4", "--device", "cpu"]) == 0
    assert output.stat().st_size > 0


def test_early_stopping_stops_patience_evaluations_after_the_best(prepared, overfit):
    _, full = overfit
    settings, result = _train(prepared, "early", EARLY_STOPPING_PATIENCE=PATIENCE)
    best_step = min(curve(full), key=lambda item: item[1])[0]
    assert result.early_stopped and result.optimizer_steps == best_step + PATIENCE * EVAL_STEPS
    assert curve(result) == curve(full)[: len(curve(result))]  # the same run, up to where it stopped
    info = json.loads((result.best_dir / INFO_FILE).read_text())
    assert info["selection"]["step"] == best_step
    assert json.loads((result.export_dir / INFO_FILE).read_text())["optimizer_steps"] == result.optimizer_steps
    states = Path(settings.OUTPUT_DIR) / "states"
    assert (states / f"step-{result.optimizer_steps:08d}" / "progress.done").exists()  # state saved at the stop
    best, full_best = _weights(result.best_dir), _weights(full.best_dir)
    assert all(torch.equal(best[name], full_best[name]) for name in full_best)


@pytest.mark.parametrize("kill_after_step", [5 * EVAL_STEPS])  # after the best step (~16): the history must return
def test_a_run_killed_after_its_best_step_resumes_to_the_same_best_and_stop(prepared, overfit, kill_after_step):
    root, model_dir = prepared
    _, full = overfit
    best_step = min(curve(full), key=lambda item: item[1])[0]
    assert best_step < kill_after_step < best_step + PATIENCE * EVAL_STEPS
    values = _values(EARLY_STOPPING_PATIENCE=PATIENCE, RESUME_FROM="latest", MIXED_PRECISION="no", DATALOADER_WORKERS=0)
    env_file = write_env_file(root, model_dir, "killed", values)
    command = [sys.executable, str(REPO_ROOT / "finetuning" / "finetune.py"), "--env-file", str(env_file)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=subprocess_env())
    marker = root / "killed" / "states" / f"step-{kill_after_step:08d}" / "progress.done"
    deadline = time.monotonic() + 600
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert marker.exists() and proc.returncode == -signal.SIGKILL
    assert not (root / "killed" / "model").exists(), "the run finished before it could be killed"

    resumed = subprocess.run(command, capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "early stopping at step" in resumed.stderr
    info = json.loads((root / "killed" / BEST_DIR / INFO_FILE).read_text())
    last = json.loads((root / "killed" / "model" / INFO_FILE).read_text())
    assert info["selection"]["step"] == best_step and last["optimizer_steps"] == best_step + PATIENCE * EVAL_STEPS
    assert [s for s, _ in info["selection"]["history"]] == list(range(EVAL_STEPS, best_step + 1, EVAL_STEPS))
    best, full_best = _weights(root / "killed" / BEST_DIR), _weights(full.best_dir)
    for name, tensor in full_best.items():
        torch.testing.assert_close(best[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


AVERAGED = 3
# The export sums the states in float32 and divides once; torch.stack(...).mean(0) may round differently by an ulp.
AVERAGE_TOLERANCE = {"rtol": 1e-6, "atol": 1e-7}


def test_the_export_is_the_mean_of_the_best_states_and_loads_in_stock(prepared, overfit, tiny_model_dir):
    _, full = overfit
    settings, result = _train(prepared, "averaged", AVERAGE_CHECKPOINTS=AVERAGED, SAVE_TOTAL_LIMIT=2)
    best = [step for step, _ in sorted(curve(full), key=lambda item: item[1])[:AVERAGED]]
    info = json.loads((result.export_dir / INFO_FILE).read_text())
    assert info["averaged"] == {"average_by": "best", "states": AVERAGED, "steps": best}
    states = [_weights(Path(settings.OUTPUT_DIR) / "states" / f"step-{step:08d}") for step in best]  # kept by rotation
    exported = _weights(result.export_dir)
    for name, tensor in exported.items():
        mean = torch.stack([state[f"model.{name}"] for state in states]).mean(dim=0)
        if name == "talker.model.codec_embedding.weight":
            tensor, mean = tensor[: SPEAKER_ROWS[0]], mean[: SPEAKER_ROWS[0]]
        torch.testing.assert_close(tensor, mean, **AVERAGE_TOLERANCE, msg=name)
    assert not torch.equal(exported["talker.codec_head.weight"], states[0]["model.talker.codec_head.weight"])
    assert_stock_loadable_export(result.export_dir, tiny_model_dir, SPEAKERS)


def test_selection_history_survives_a_state_round_trip():
    selection = Selection("eval_loss", min_delta=0.1, patience=2)
    for step, value in ((4, 5.0), (8, 4.0), (12, 3.95), (16, 4.5)):
        selection.update(step, value)
    assert (selection.best_step, selection.since_best, selection.should_stop()) == (8, 2, True)  # 3.95: not by > 0.1
    restored = Selection("eval_loss", min_delta=0.1, patience=2)
    restored.load_state_dict(json.loads(json.dumps(selection.state_dict())))
    assert restored == selection
    with pytest.raises(ValueError, match="SELECT_BY"):
        Selection("wer").load_state_dict(selection.state_dict())


def test_score_combines_the_documented_terms_and_speech_metrics_average_over_speakers():
    from finetuning.training.selection import SCORE_TERMS, score, speaker_means

    scalars = {
        "eval/a/speaker_similarity": 0.8,
        "eval/b/speaker_similarity": 0.6,
        "eval/a/wer": 3.0,  # capped at 1 where no cer is reported
        "eval/b/wer": 0.5,
        "eval/a/naturalness": 3.0,
        "eval/b/naturalness": float("nan"),  # left out of the mean
        "eval/a/eos_failure_rate": 0.5,
        "eval/b/eos_failure_rate": 0.0,
    }
    means = speaker_means(scalars)
    assert means == pytest.approx(
        {"speaker_similarity": 0.7, "wer": 1.75, "naturalness": 3.0, "eos_failure_rate": 0.25}
    )
    assert SCORE_TERMS == {
        "speaker_similarity": 1.0,
        "cer": -1.0,
        "naturalness": 0.25,
        "eos_failure_rate": -1.0,
        "eval_loss": -0.1,
    }
    assert score(means, loss=2.0) == pytest.approx(0.7 - 1.0 + 0.25 * 3.0 - 0.25 - 0.1 * 2.0)
    assert Selection("score").value({"eval/codec0_loss": 1.0, "eval/sub_talker_loss": 2.0}, scalars, 0.5) == (
        pytest.approx(score(means, loss=2.0))
    )
    assert math.isnan(Selection("cer").value(None, scalars, 0.3))  # a metric no scorer reported


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"SELECT_BY": "wer"}, "SELECT_BY"),  # speech metrics need EVAL_GENERATE_STEPS
        ({"SELECT_BY": "none", "EARLY_STOPPING_PATIENCE": 2}, "EARLY_STOPPING_PATIENCE"),
        ({"AVERAGE_CHECKPOINTS": 2, "SAVE_STEPS": 0}, "AVERAGE_CHECKPOINTS"),
        ({"AVERAGE_CHECKPOINTS": 2, "EVAL_STEPS": 50, "SAVE_STEPS": 20}, "EVAL_STEPS"),
        ({"AVERAGE_CHECKPOINTS": 3, "AVERAGE_BY": "last", "SAVE_TOTAL_LIMIT": 2}, "SAVE_TOTAL_LIMIT"),
        ({"LORA_MERGE_SCALE": 1.5}, "LORA_MERGE_SCALE"),
    ],
)
def test_settings_that_cannot_select_average_or_scale_are_refused_naming_the_key(values, key):
    from finetuning.settings import SettingsError, load_settings

    with pytest.raises(SettingsError, match=f"^{key}="):
        load_settings(None, overrides={k: str(v) for k, v in values.items()}, environ={})
