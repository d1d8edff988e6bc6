"""The data-preparation command, run as a user runs it."""

import json
import shutil
import subprocess
import sys

from conftest import REPO_ROOT, VOICES_DIR, subprocess_env

TOKEN = "hf_DoNotLeakThisTokenValue42"


def run_cli(tmp_path, *args):
    return subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "finetuning" / "data_preparation.py"),
            "--env-file",
            str(tmp_path / ".env"),
            *args,
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        env=subprocess_env(),
    )


def test_command_prepares_then_skips_and_never_shows_the_token(tmp_path, tiny_model_dir):
    shutil.copytree(VOICES_DIR, tmp_path / "voices")
    (tmp_path / ".env").write_text(
        f"HF_TOKEN={TOKEN}\nTOKENIZER_PATH={tiny_model_dir / 'speech_tokenizer'}\nDEVICE=cpu\n"
        f"INIT_MODEL_PATH={tiny_model_dir}\n"
    )
    first = run_cli(tmp_path, "--speaker", "english_speaker", "--max_samples", "3", "--output_dir", "ds")
    assert first.returncode == 0, first.stderr
    assert "english_speaker: kept 3/3 clips" in first.stdout
    second = run_cli(tmp_path, "--speaker", "english_speaker", "--max_samples", "3", "--output_dir", "ds")
    assert second.returncode == 0 and "unchanged, skipped" in second.stdout
    for output in (first.stdout, first.stderr, second.stdout, second.stderr):
        assert TOKEN not in output
    for path in (tmp_path / "ds").rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
    summary = json.loads((tmp_path / "ds" / "preparation_summary.json").read_text())
    assert summary["english_speaker"]["kept"] == 3


def test_command_errors_are_short_and_actionable(tmp_path):
    (tmp_path / ".env").write_text("BATCH_SIZE=many\n")
    bad_setting = run_cli(tmp_path)
    assert bad_setting.returncode == 2 and "BATCH_SIZE='many' is not an integer" in bad_setting.stderr
    (tmp_path / ".env").write_text("")
    no_repo = run_cli(tmp_path, "--upload")
    assert no_repo.returncode == 2 and "--repo_id" in no_repo.stderr
    (tmp_path / ".env").write_text(f"VOICES_DIR={tmp_path / 'empty'}\n")
    no_reference = run_cli(tmp_path, "--speaker", "ghost")
    assert no_reference.returncode == 1 and "speaker ghost" in no_reference.stderr
    assert "Traceback" not in no_reference.stderr


def test_preparation_under_a_multi_process_launcher_is_refused_before_writing(tmp_path, monkeypatch, capsys):
    """``accelerate launch`` (torch elastic) sets WORLD_SIZE in each process it starts: every process would write
    the same speaker folders, so the command refuses in one line and writes nothing."""
    from finetuning import data_preparation

    env_file = tmp_path / ".env"
    env_file.write_text(f"DATASET_DIR={tmp_path / 'dataset'}\nVOICES_DIR={VOICES_DIR}\n")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert data_preparation.main(["--env-file", str(env_file)]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors == ["error: run data preparation as one command and use --num_workers N for parallel work"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".env"]
