"""A CustomVoice init's preset speakers: the checks made before any model loads, and the rows new speakers take."""

import json

import pytest
from conftest import make_settings

from finetuning.training.export import ExportError, speaker_rows
from finetuning.training.presets import InitModelError, check_init_model

PRESETS = {"vivian": 3000, "eric": 3002}  # a gap at 3001, as released checkpoints leave gaps between their rows


def _model_dir(tmp_path, kind: str):
    """A folder whose config.json names ``kind`` and, for a custom_voice one, its presets: all these checks read."""
    folder = tmp_path / kind
    folder.mkdir()
    talker = {"spk_id": PRESETS, "spk_is_dialect": {"vivian": False, "eric": "sichuan_dialect"}, "vocab_size": 3072}
    config = {"tts_model_type": kind, "talker_config": talker if kind == "custom_voice" else {"spk_id": {}}}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_new_speakers_take_the_free_rows_beside_the_presets():
    assert speaker_rows(["Alice", "bob"], 3072, PRESETS) == {**PRESETS, "alice": 3001, "bob": 3003}
    assert speaker_rows(["alice"], 3072) == {"alice": 3000}
    with pytest.raises(ExportError, match="already preset"):
        speaker_rows(["Vivian"], 3072, PRESETS)
    with pytest.raises(ExportError, match="vocabulary has 3004 rows"):
        speaker_rows(["a", "b", "c"], 3004, PRESETS)


def test_custom_voice_init_checks_name_the_key_and_the_fix(tmp_path):
    folder, base_dir = _model_dir(tmp_path, "custom_voice"), _model_dir(tmp_path, "base")
    ok = make_settings(tmp_path, folder, TRAIN_SPEAKERS="alice", SPEAKER_ENCODER_PATH=base_dir)
    assert check_init_model(ok, folder) == "custom_voice"
    cases = {
        "SPEAKER_ENCODER_PATH to the Base model": dict(TRAIN_SPEAKERS="alice"),
        "vivian is already a preset speaker": dict(TRAIN_SPEAKERS="vivian", SPEAKER_ENCODER_PATH=base_dir),
        "TRAINING_MODE=voice_clone needs a Base model": dict(
            TRAIN_SPEAKERS="alice", SPEAKER_ENCODER_PATH=base_dir, TRAINING_MODE="voice_clone"
        ),
    }
    for message, values in cases.items():
        with pytest.raises(InitModelError, match=message):
            check_init_model(make_settings(tmp_path, folder, **values), folder)
    base = make_settings(tmp_path, base_dir, REPLAY_FRACTION=0.3)
    with pytest.raises(InitModelError, match="REPLAY_FRACTION=0.3 replays the preset speakers"):
        check_init_model(base, base_dir)


def test_export_config_keeps_the_presets_dialects(tmp_path):
    from finetuning.training.export import custom_voice_config

    folder = _model_dir(tmp_path, "custom_voice")
    config = custom_voice_config(
        json.loads((folder / "config.json").read_text()), speaker_rows(["alice"], 3072, PRESETS)
    )
    talker = config["talker_config"]
    assert talker["spk_id"] == {**PRESETS, "alice": 3001}
    assert talker["spk_is_dialect"] == {"vivian": False, "eric": "sichuan_dialect", "alice": False}
