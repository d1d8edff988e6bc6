"""EXPORT_DIR guards in-process, case by case (the command-line refusal is in tests/test_bad_inputs.py)."""

import pytest

from finetuning.settings import SettingsError, load_settings
from finetuning.training.guards import check_export_dir


def _settings(tmp_path, **values):
    base = {"OUTPUT_DIR": tmp_path / "out" / "run", "DATASET_DIR": tmp_path / "data", "INIT_MODEL_PATH": "unused"}
    return load_settings(None, environ={}, overrides={**base, **values})


@pytest.mark.parametrize(
    ("export", "message"),
    [
        ("out/run", "is OUTPUT_DIR="),
        ("out", "contains OUTPUT_DIR="),
        (".", "contains OUTPUT_DIR="),
        ("data", "is DATASET_DIR="),
        ("data/x", "is inside DATASET_DIR="),
        ("base", "is INIT_MODEL_PATH="),
        ("base/speech_tokenizer", "is inside INIT_MODEL_PATH="),
        ("out/run/states", "the run's states folder"),
        ("out/run/states/step-00000001", "the run's states folder"),
        ("out/run/eval_checkpoint", "the run's eval_checkpoint folder"),
        ("link_to_base", "is INIT_MODEL_PATH="),
        ("mine", "holds files this package did not write"),
        ("a_file", "is a file"),
    ],
)
def test_an_export_dir_that_would_delete_something_is_refused(tmp_path, export, message):
    base = tmp_path / "base"
    (base / "speech_tokenizer").mkdir(parents=True)
    (tmp_path / "link_to_base").symlink_to(base)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(SettingsError, match=message):
        check_export_dir(_settings(tmp_path, EXPORT_DIR=tmp_path / export), base)


def test_the_default_an_earlier_export_and_an_empty_folder_are_allowed(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    check_export_dir(_settings(tmp_path), base)  # OUTPUT_DIR/model
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "finetune_info.json").write_text("{}")
    (earlier / "model.safetensors").write_text("")
    check_export_dir(_settings(tmp_path, EXPORT_DIR=earlier), base)
    (tmp_path / "empty").mkdir()
    check_export_dir(_settings(tmp_path, EXPORT_DIR=tmp_path / "empty"), base)
    check_export_dir(_settings(tmp_path, EXPORT_DIR=tmp_path / "out" / "run" / "final"), base)
