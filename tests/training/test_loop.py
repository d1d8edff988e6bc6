"""What the training loop promises beyond learning: the default data path (collation in DATALOADER_WORKERS worker
processes) trains exactly like loading in the main process, for custom-voice and voice-clone runs; the learning
rate follows warmup and LR_SCHEDULE; the trackers get what the README lists; a non-finite update is skipped and
counted; Ctrl-C stops like SIGTERM; a new run refuses another run's states. Short runs on the small bundled dataset.
"""

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
from conftest import make_settings, prepare_small_dataset, write_env_file

from finetuning.training import loop

LEARNING_RATE = 2e-3
WARMUP_STEPS = 2
STEPS = 5  # 8 examples in batches of 3: 3 batches per epoch, so the runs cross an epoch boundary
WORKERS = 2  # the default DATALOADER_WORKERS


@pytest.fixture(scope="module")
def prepared(tiny_model_dir, tmp_path_factory):
    return prepare_small_dataset(tmp_path_factory, "loop", tiny_model_dir), tiny_model_dir


def _values(**extra) -> dict:
    return {
        "VALIDATION_FRACTION": 0.0,
        "MAX_BATCH_TOKENS": 0,
        "BATCH_SIZE": 3,
        "GRADIENT_ACCUMULATION_STEPS": 1,
        "MAX_STEPS": STEPS,
        "LEARNING_RATE": LEARNING_RATE,
        "WARMUP_STEPS": WARMUP_STEPS,
        "LOGGING_STEPS": 1,
        "EVAL_STEPS": 0,
        "SAVE_STEPS": 0,
        "REPORT_TO": "none",
        "RECORD_SAMPLE_IDS": "true",
        **extra,
    }


def _settings(prepared, name, **extra):
    root, model_dir = prepared
    return make_settings(root, model_dir, OUTPUT_DIR=root / name, **_values(**extra))


def _run(prepared, name, **extra):
    """(settings, result, the batches it trained on as [(epoch, ids)], its exported weights)."""
    from safetensors.torch import load_file

    settings = _settings(prepared, name, **extra)
    result = loop.train(settings)
    audit = [json.loads(line) for line in (Path(settings.OUTPUT_DIR) / "samples_rank0.jsonl").read_text().splitlines()]
    batches = [(record["epoch"], record["ids"]) for record in audit if "ids" in record]
    return settings, result, batches, load_file(str(result.export_dir / "model.safetensors"))


def _metrics(settings) -> list[dict]:
    return [json.loads(line) for line in (Path(settings.OUTPUT_DIR) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def custom_voice_runs(prepared):
    """The same custom-voice run loading in the main process (with TensorBoard) and in WORKERS workers."""
    main = _run(prepared, "main_process", DATALOADER_WORKERS=0, REPORT_TO="tensorboard", SAVE_STEPS=STEPS)
    workers = _run(prepared, "workers", DATALOADER_WORKERS=WORKERS, SAVE_STEPS=STEPS)
    return main, workers


def _assert_same_run(main, workers):
    _, main_result, main_batches, main_weights = main
    _, workers_result, workers_batches, workers_weights = workers
    assert main_result.optimizer_steps == workers_result.optimizer_steps == STEPS
    assert {epoch for epoch, _ in main_batches} == {0, 1}  # past an epoch end, where set_epoch must reach the plan
    assert workers_batches == main_batches  # the same samples, in the same batches, in the same order
    assert main_weights.keys() == workers_weights.keys()
    for name, weight in main_weights.items():
        assert torch.equal(workers_weights[name], weight), name


def test_default_workers_train_exactly_like_the_main_process(custom_voice_runs):
    from finetuning.settings import load_settings

    assert load_settings(None, environ={}).DATALOADER_WORKERS == WORKERS
    _assert_same_run(*custom_voice_runs)


def test_voice_clone_references_are_the_same_in_worker_processes(prepared):
    """Voice-clone references are drawn in the workers (``CloneExamples``): the same draws, hence the same
    weights, as in the main process, across an epoch end."""
    clone = {"TRAINING_MODE": "voice_clone", "CLONE_ICL_FRACTION": 0.5, "LR_SCHEDULE": "constant"}
    main = _run(prepared, "clone_main_process", DATALOADER_WORKERS=0, **clone)
    workers = _run(prepared, "clone_workers", DATALOADER_WORKERS=WORKERS, **clone)
    _assert_same_run(main, workers)
    lrs = [record["train/lr"] for record in _metrics(main[0]) if "train/lr" in record]
    expected = [LEARNING_RATE * min(1.0, step / WARMUP_STEPS) for step in range(1, STEPS + 1)]  # then constant
    assert lrs == pytest.approx(expected, rel=1e-6)


def test_learning_rate_warms_up_linearly_then_follows_the_cosine(custom_voice_runs):
    (settings, *_), _ = custom_voice_runs
    lrs = [record["train/lr"] for record in _metrics(settings) if "train/lr" in record]
    expected = [LEARNING_RATE * step / WARMUP_STEPS for step in range(1, WARMUP_STEPS)]
    for step in range(WARMUP_STEPS, STEPS + 1):
        progress = (step - WARMUP_STEPS) / (STEPS - WARMUP_STEPS)
        expected.append(LEARNING_RATE * 0.5 * (1 + math.cos(math.pi * progress)))
    assert lrs == pytest.approx(expected, rel=1e-6, abs=1e-12)


def test_tensorboard_gets_learning_rate_gradient_norm_throughput_and_padding(custom_voice_runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (settings, *_), _ = custom_voice_runs
    logged = {}
    for events in Path(settings.OUTPUT_DIR).rglob("events.out.tfevents.*"):  # the run's, and its hparams'
        scalars = EventAccumulator(str(events)).Reload()
        logged.update({tag: [(e.step, e.value) for e in scalars.Scalars(tag)] for tag in scalars.Tags()["scalars"]})
    metrics = _metrics(settings)
    for tag in (
        "train/loss",
        "train/codec0_loss",
        "train/sub_talker_loss",
        "train/lr",
        "train/grad_norm",
        "train/samples_per_s",
        "train/audio_s_per_s",
        "train/optimizer_steps_per_s",
        "train/tokens_per_s",
        "train/padding_fraction",
    ):
        expected = [(record["step"], record[tag]) for record in metrics if tag in record]
        assert [step for step, _ in logged.get(tag, [])] == list(range(1, STEPS + 1)), tag
        assert [value for _, value in logged[tag]] == pytest.approx([v for _, v in expected], rel=1e-5), tag
    for tag in ("train/grad_norm", "train/samples_per_s", "train/tokens_per_s"):
        assert all(value > 0 for _, value in logged[tag]), tag
    # batches of 3 utterances of different lengths are padded; the last batch of an epoch (2) too
    assert all(0 < value < 1 for _, value in logged["train/padding_fraction"])


def test_non_finite_update_is_skipped_and_counted_and_ctrl_c_stops_like_sigterm(prepared, monkeypatch, capsys):
    """The loss of the second micro-batch is made NaN (what an fp16 overflow gives): that update is skipped, the
    schedule holds, the count reaches the metrics; Ctrl-C (SIGINT) on the third step then saves a state and the
    command exits with 130, as with SIGTERM."""
    from finetuning import finetune

    calls = []

    class FaultyStep(loop.TalkerStep):
        def forward(self, batch):
            loss, out = super().forward(batch)
            calls.append(len(batch["id"]))
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGINT)
            return (loss * float("nan") if len(calls) == 2 else loss), out

    monkeypatch.setattr(loop, "TalkerStep", FaultyStep)
    root, model_dir = prepared
    values = _values(LR_SCHEDULE="linear", MAX_STEPS=1000, MIXED_PRECISION="no", DATALOADER_WORKERS=0)
    env_file = write_env_file(root, model_dir, "faulty", values)
    settings = _settings(prepared, "faulty", **values)
    code = finetune.main(["--env-file", str(env_file)])
    assert code == 130 and "RESUME_FROM=latest" in capsys.readouterr().out
    assert len(calls) == 3
    metrics = _metrics(settings)
    assert [record["train/skipped_steps"] for record in metrics] == [0, 1, 1]
    assert math.isnan(metrics[1]["train/grad_norm"]) and math.isfinite(metrics[2]["train/grad_norm"])
    warmup = [LEARNING_RATE * step / WARMUP_STEPS for step in (1, 1, 2)]  # the skipped step left it at step 1's
    assert [record["train/lr"] for record in metrics] == pytest.approx(warmup, rel=1e-6)
    states = sorted(p.name for p in (Path(settings.OUTPUT_DIR) / "states").glob("step-*"))
    assert states == ["step-00000003"] and not (Path(settings.OUTPUT_DIR) / "model").exists()


def test_a_new_run_refuses_an_output_dir_holding_another_runs_states(custom_voice_runs, prepared):
    (settings, *_), _ = custom_voice_runs
    output_dir = Path(settings.OUTPUT_DIR)
    assert (output_dir / "states" / f"step-{STEPS:08d}" / "progress.done").exists()
    before = {p: p.stat().st_mtime_ns for p in output_dir.rglob("*")}
    with pytest.raises(loop.TrainingError, match="holds saved training states of an earlier run.*RESUME_FROM=latest"):
        loop.train(_settings(prepared, "main_process"))
    assert {p: p.stat().st_mtime_ns for p in output_dir.rglob("*")} == before  # nothing written or removed


def test_speaker_embedding_clips_adds_the_first_training_clips_to_the_references(prepared):
    """SPEAKER_EMBEDDING_CLIPS=N: each speaker's embedding is the norm-matched mean x-vector (the mean's direction at
    the clips' mean norm) over its reference clip(s) and its first N training clips (computed here from the prepared
    folder and the stock speaker encoder), streamed or not."""
    import datasets
    import numpy as np
    import qwen_tts

    from finetuning.preparation.schema import REFERENCE_SPLIT
    from finetuning.training.speakers import compute_speaker_embeddings

    root, model_dir = prepared
    model = qwen_tts.Qwen3TTSModel.from_pretrained(str(model_dir), dtype=torch.float32).model
    clips = 2
    settings = _settings(prepared, "embeddings", SPEAKER_EMBEDDING_CLIPS=clips)
    embeds = compute_speaker_embeddings(model, settings)
    for index, speaker in enumerate(settings.TRAIN_SPEAKERS):
        splits = datasets.load_dataset(str(root / "dataset"), name=speaker)
        audio = [row["audio"]["array"] for row in splits[REFERENCE_SPLIT]]
        audio += [splits["train"][i]["audio"]["array"] for i in range(clips)]
        vectors = torch.stack([model.extract_speaker_embedding(np.asarray(a, dtype=np.float32), 24000) for a in audio])
        mean = vectors.float().mean(dim=0)
        expected = mean / mean.norm() * vectors.float().norm(dim=-1).mean()
        torch.testing.assert_close(embeds[index], expected, rtol=1e-5, atol=1e-6)
    streamed = compute_speaker_embeddings(
        model, _settings(prepared, "embeddings", SPEAKER_EMBEDDING_CLIPS=clips, DATA_STREAMING=True)
    )
    torch.testing.assert_close(streamed, embeds, rtol=1e-5, atol=1e-6)
    references_only = compute_speaker_embeddings(model, _settings(prepared, "embeddings", SPEAKER_EMBEDDING_CLIPS=0))
    assert not torch.allclose(references_only, embeds)
