import dataclasses
import json
import logging

import pytest

from finetuning.settings import (
    BUNDLED_SPEAKERS,
    FIELDS,
    Settings,
    SettingsError,
    load_settings,
    render_env_example,
)


def write_env(tmp_path, text: str):
    path = tmp_path / ".env"
    path.write_text(text)
    return path


def test_good_file_parses_every_type(tmp_path):
    env = write_env(
        tmp_path,
        "TRAIN_SPEAKERS=hausa_speaker, english_speaker\n"
        "BATCH_SIZE=8\nLEARNING_RATE=1e-4\nHF_DATASET_PRIVATE=false\nMIXED_PRECISION=fp16\n"
        "HF_DATASET_REPO=someone/voices\n",
    )
    s = load_settings(env, environ={})
    assert s.TRAIN_SPEAKERS == ("hausa_speaker", "english_speaker")
    assert s.BATCH_SIZE == 8 and isinstance(s.BATCH_SIZE, int)
    assert s.LEARNING_RATE == pytest.approx(1e-4)
    assert s.HF_DATASET_PRIVATE is False
    assert s.MIXED_PRECISION == "fp16"
    assert s.HF_DATASET_REPO == "someone/voices"


def test_defaults_without_file():
    s = load_settings(None, environ={})
    assert s.TRAIN_SPEAKERS == BUNDLED_SPEAKERS
    assert s == Settings()


def test_precedence_override_over_environ_over_file(tmp_path):
    env = write_env(tmp_path, "BATCH_SIZE=3\nNUM_EPOCHS=5\nSEED=1\n")
    s = load_settings(env, overrides={"BATCH_SIZE": "7"}, environ={"BATCH_SIZE": "4", "NUM_EPOCHS": "6"})
    assert (s.BATCH_SIZE, s.NUM_EPOCHS, s.SEED) == (7, 6, 1)


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ("BATCH_SIZE=two", "BATCH_SIZE"),
        ("BATCH_SIZE=0", "BATCH_SIZE"),
        ("LEARNING_RATE=fast", "LEARNING_RATE"),
        ("LEARNING_RATE=-1", "LEARNING_RATE"),
        ("MIXED_PRECISION=fp8", "MIXED_PRECISION"),
        ("HF_DATASET_PRIVATE=maybe", "HF_DATASET_PRIVATE"),
        ("TRAIN_SPEAKERS=", "TRAIN_SPEAKERS"),
        ("TRAIN_SPEAKERS=Bad Name", "TRAIN_SPEAKERS"),
        ("TRAIN_SPEAKERS=a,a", "TRAIN_SPEAKERS"),
        ("VALIDATION_FRACTION=1.5", "VALIDATION_FRACTION"),
        ("MAX_DURATION_S=0.1", "MAX_DURATION_S"),
        ("DEVICE=tpu", "DEVICE"),
        ("HF_DATASET_REPO=no-owner", "HF_DATASET_REPO"),
    ],
)
def test_bad_value_names_key_and_value(tmp_path, line, key):
    env = write_env(tmp_path, line + "\n")
    with pytest.raises(SettingsError) as err:
        load_settings(env, environ={})
    message = str(err.value)
    assert key in message
    assert line.split("=", 1)[1].split(",")[0].strip() in message


def test_misspelt_key_is_an_error_with_suggestion(tmp_path):
    env = write_env(tmp_path, "LEARNING_RAET=1e-4\n")
    with pytest.raises(SettingsError, match="did you mean LEARNING_RATE"):
        load_settings(env, environ={})


def test_renamed_key_names_its_successor(tmp_path):
    path = tmp_path / ".env"
    path.write_text("TARGET_LOUDNESS_DBFS=-20\n")
    with pytest.raises(SettingsError, match="TARGET_LOUDNESS_DBFS .* was renamed: set TARGET_LOUDNESS_LUFS"):
        load_settings(path, environ={})
    with pytest.raises(SettingsError, match="the environment was renamed"):
        load_settings(None, environ={"TARGET_LOUDNESS_DBFS": "-20"})


def test_unrelated_key_is_a_warning(tmp_path, caplog):
    env = write_env(tmp_path, "WANDB_API_KEY=abc\nBATCH_SIZE=3\n")
    with caplog.at_level(logging.WARNING):
        s = load_settings(env, environ={})
    assert s.BATCH_SIZE == 3
    assert "WANDB_API_KEY" in caplog.text


def test_unknown_override_is_an_error():
    with pytest.raises(SettingsError, match="unknown setting"):
        load_settings(None, overrides={"BATCHSIZE": "3"}, environ={})


def test_missing_named_env_file_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_settings(tmp_path / "custom.env", environ={})


def test_token_is_never_printed_or_saved(tmp_path):
    token = "hf_SECRETvalue123"
    s = load_settings(write_env(tmp_path, f"HF_TOKEN={token}\n"), environ={})
    assert s.HF_TOKEN == token
    assert token not in repr(s) and token not in str(s)
    out = tmp_path / "settings.json"
    s.save(out)
    assert token not in out.read_text()
    assert "HF_TOKEN" not in json.loads(out.read_text())


def test_settings_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Settings().BATCH_SIZE = 3  # type: ignore[misc]


def test_env_example_documents_every_key_and_matches_file():
    from conftest import REPO_ROOT

    text = render_env_example()
    for name in FIELDS:
        assert f"\n{name}=" in text
    assert (REPO_ROOT / ".env.training.example").read_text() == text
    parsed = load_settings(REPO_ROOT / ".env.training.example", environ={})
    assert parsed == Settings()


def test_settings_reference_and_example_document_every_key():
    """finetuning/SETTINGS.md (the settings table the README links to) is the table rendered now, with one row per
    key, each under exactly one stage; regenerate it with ``python -m finetuning.settings_reference``."""
    from conftest import REPO_ROOT

    from finetuning.settings import FIELDS
    from finetuning.settings_reference import REFERENCE_FILE, render_settings_reference

    reference = (REPO_ROOT / REFERENCE_FILE).read_text()
    example = (REPO_ROOT / ".env.training.example").read_text()
    assert reference == render_settings_reference(), f"{REFERENCE_FILE} is stale: regenerate it"
    rows = [line.split(" | ")[0].strip("| `") for line in reference.splitlines() if line.startswith("| `")]
    assert rows == list(FIELDS), "every key once, in the table's order"
    assert "[settings reference](finetuning/SETTINGS.md)" in (REPO_ROOT / "README.md").read_text()
    assert all(f"\n{key}=" in example for key in FIELDS)


def test_settings_reference_refuses_sections_out_of_order(monkeypatch):
    from finetuning import settings_reference

    sections = settings_reference.SECTIONS
    monkeypatch.setattr(settings_reference, "SECTIONS", (sections[1], sections[0], *sections[2:]))
    with pytest.raises(ValueError, match="SECTIONS must name fields in the table's order"):
        settings_reference.render_settings_reference()
    monkeypatch.setattr(settings_reference, "SECTIONS", (*sections, ("Gone", "NO_SUCH_KEY", "x.md")))
    with pytest.raises(ValueError, match="SECTIONS must name fields"):
        settings_reference.render_settings_reference()
