"""Hand back the best model, not the last: ``best/`` and early stopping on a tiny run built to overfit.

Two clips per speaker train, two are held out, at a high constant learning rate: the validation loss falls for a
few evaluations, then rises as the model memorises its four clips (the logged curve is printed). ``best/`` must hold
exactly the weights of the evaluation with the lowest validation loss, compared tensor by tensor with the training
state saved at that step, and load with stock ``from_pretrained``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import assert_stock_loadable_export, make_settings

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
