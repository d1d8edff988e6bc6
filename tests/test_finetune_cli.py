"""The user-facing entry points, run as a user runs them (subprocesses)."""

import json
import subprocess
import sys

import pytest
import soundfile as sf
from conftest import REPO_ROOT, VOICES_DIR, subprocess_env


def _run(args, cwd, timeout=600):
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=subprocess_env()
    )


@pytest.mark.slow
def test_demo_runs_the_whole_pipeline_from_recordings(tmp_path):
    """``demo.py --recordings``: long sessions with subtitles and an interviewer are cut into clips (the
    interviewer's sentence rejected by the speaker filter), then trained, exported and spoken as the clip demo."""
    out = tmp_path / "demo"
    demo = [str(REPO_ROOT / "finetuning" / "demo.py"), "--output_dir", str(out), "--max_steps", "20", "--recordings"]
    proc = _run(demo, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cutting the sessions" in proc.stdout
    summary = json.loads((out / "dataset" / "preparation_summary.json").read_text())
    for speaker in ("english_speaker", "swahili_speaker"):
        assert summary[speaker]["rejected"] == {"other_speaker": 1}, summary[speaker]
    checkpoint = out / "run" / "model"
    info = json.loads((checkpoint / "finetune_info.json").read_text())
    assert sorted(info["speakers"]) == ["english_speaker", "swahili_speaker"]
    for speaker in info["speakers"]:
        wav, sample_rate = sf.read(out / "samples" / f"{speaker}.wav")
        assert sample_rate == 24000 and wav.size > 0
    assert str(checkpoint.resolve()) in proc.stdout
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 20 and "eval/codec0_loss" in records[-1]
    # With the product's defaults the export answers every generate_custom_voice call, and validation reports the
    # languageless prefix (how stock calls it without language=) beside the rows' own languages.
    assert info["trained_calls"] == {
        "method": "generate_custom_voice",
        "non_streaming_mode": [True, False],
        "language": ["given", "auto"],
        "instruct": [False],  # trained without instructions: the export does not claim instruct=
    }
    assert records[-1]["eval/auto/codec0_loss"] != records[-1]["eval/codec0_loss"]

    generate = str(REPO_ROOT / "finetuning" / "generate.py")
    wav_path = tmp_path / "hello.wav"
    args = ["--checkpoint", str(checkpoint), "--text", "Hello there.", "--greedy", "--max_new_tokens", "10"]
    # The demo above spoke with each speaker's language; generate.py speaks without one (stock's "Auto").
    command = [generate, *args, "--language", "auto", "--speaker", "swahili_speaker", "--output", str(wav_path)]
    proc = _run(command, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    wav, sample_rate = sf.read(wav_path)
    assert sample_rate == 24000 and 0 < wav.size <= 10 * 1920
    proc = _run([generate, *args, "--speaker", "nobody"], tmp_path)
    assert proc.returncode == 2 and "english_speaker" in proc.stderr and "Traceback" not in proc.stderr


def test_finetune_rejects_a_bad_setting_before_loading_anything(tmp_path):
    env_file = tmp_path / "bad.env"
    env_file.write_text("LEARNING_RATE=fast\n")
    proc = _run([str(REPO_ROOT / "finetuning" / "finetune.py"), "--env-file", str(env_file)], tmp_path)
    assert proc.returncode == 2
    assert "LEARNING_RATE='fast'" in proc.stderr and "Traceback" not in proc.stderr


def test_finetune_without_prepared_data_says_what_to_run(tmp_path, tiny_model_dir):
    env_file = tmp_path / "run.env"
    env_file.write_text(
        "\n".join(
            [
                f"INIT_MODEL_PATH={tiny_model_dir}",
                f"VOICES_DIR={VOICES_DIR}",
                f"DATASET_DIR={tmp_path / 'nothing_here'}",
                f"OUTPUT_DIR={tmp_path / 'run'}",
                "DEVICE=cpu",
                "MIXED_PRECISION=no",
            ]
        )
    )
    proc = _run([str(REPO_ROOT / "finetuning" / "finetune.py"), "--env-file", str(env_file)], tmp_path)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "data_preparation.py" in proc.stderr and "english_speaker" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_shipped_accelerate_configs_parse():
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {}
    for path in sorted((REPO_ROOT / "finetuning" / "accelerate_configs").glob("*.yaml")):
        kinds[path.stem] = str(load_config_from_file(str(path)).distributed_type)
    assert kinds == {
        "deepspeed_zero2": "DistributedType.DEEPSPEED",
        "deepspeed_zero2_offload": "DistributedType.DEEPSPEED",
        "deepspeed_zero3": "DistributedType.DEEPSPEED",
        "fsdp": "DistributedType.FSDP",
        "multi_gpu_ddp": "DistributedType.MULTI_GPU",
        "single_gpu": "DistributedType.NO",
    }


def test_a_tracker_that_cannot_load_stops_the_run_with_the_fix(tmp_path):
    import importlib.util

    import pytest

    from finetuning.settings import load_settings
    from finetuning.training.loop import TrainingError, make_accelerator

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    settings = load_settings(None, environ={}, overrides={"REPORT_TO": "tensorboard,wandb", "OUTPUT_DIR": tmp_path})
    with pytest.raises(TrainingError, match="wandb.*REPORT_TO=none"):
        make_accelerator(settings)
