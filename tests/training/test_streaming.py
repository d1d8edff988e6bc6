"""Streaming training data: same samples as map-style, deterministic per seed, sharded, exact resume, and memory
that stays flat as the corpus grows (measured in subprocesses)."""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO_ROOT, make_settings, subprocess_env

from finetuning.preparation import schema

MEMORY_PROBE = str(Path(__file__).with_name("stream_memory_probe.py"))
SCALES = (2, 60)  # times the bundled corpus
FRAME_REPEATS = 8
# 1624 more samples x 250 frames x 16 int16 codes = 13.0 MB that map-style must hold at the larger scale.
MIN_MAP_GROWTH_MB = 10.0
# Streaming holds a 64-example shuffle buffer (20 s utterances as Python lists, about 8 MB) plus one open batch
# per bucket; the allocator adds up to about 10 MB of noise between runs (measured), whatever the corpus size.
STREAM_BOUND_MB = 20.0
SMALL_SPEAKER_ROWS = 4


@pytest.fixture(scope="module")
def prepared(tiny_model_dir, tmp_path_factory):
    """(settings, tokenizer, talker_config) for the bundled corpus prepared with the tiny tokenizer."""
    from transformers import AutoTokenizer

    from finetuning.preparation.prepare import prepare_dataset

    settings = make_settings(tmp_path_factory.mktemp("stream"), tiny_model_dir, VALIDATION_FRACTION=0.0)
    prepare_dataset(settings, report=lambda _: None)
    config = json.loads((tiny_model_dir / "config.json").read_text())["talker_config"]
    return settings, AutoTokenizer.from_pretrained(str(tiny_model_dir)), type("TalkerConfig", (), config)


def _stream(settings, tokenizer, talker_config, **overrides):
    import dataclasses

    from finetuning.training.streaming import StreamingBatches

    settings = dataclasses.replace(settings, **overrides)
    replicas = overrides.pop("num_replicas", 1) if "num_replicas" in overrides else 1
    return StreamingBatches(settings, tokenizer, talker_config, num_replicas=replicas)


def _ids(batches) -> list[list[str]]:
    return [batch["id"] for batch in batches]


def test_stream_holds_the_map_style_samples_deterministically(prepared):
    from finetuning.training.data import load_examples

    settings, tokenizer, config = prepared
    mapped, _ = load_examples(settings, tokenizer, "train", streaming=False)
    stream = _stream(settings, tokenizer, config, SPEAKER_MIXING="proportional", STREAM_SHUFFLE_BUFFER=8)
    first = _ids(stream)
    assert Counter(i for batch in first for i in batch) == Counter(e.id for e in mapped)  # each sample once
    assert len(first) == len(stream)
    assert _ids(_stream(settings, tokenizer, config, SPEAKER_MIXING="proportional", STREAM_SHUFFLE_BUFFER=8)) == first
    stream.set_epoch(1)
    assert _ids(stream) != first  # reshuffled per epoch
    batch = next(iter(_stream(settings, tokenizer, config)))
    assert batch["codes"][0].dtype.is_floating_point is False and batch["codes"][0].element_size() == 8  # widened


@pytest.fixture(scope="module")
def unequal(prepared, tmp_path_factory):
    """(settings, tokenizer, talker_config) of the bundled corpus with the second speaker cut to SMALL_SPEAKER_ROWS
    training rows: 14 beside 4, so concatenation, equal interleaving and temperature mixing all differ."""
    import dataclasses
    import shutil

    settings, tokenizer, config = prepared
    target = tmp_path_factory.mktemp("unequal") / "dataset"
    shutil.copytree(settings.DATASET_DIR, target)
    small = target / settings.TRAIN_SPEAKERS[1]
    shards = sorted(small.glob("train-*.parquet"))
    table = pa.concat_tables([pq.read_table(p) for p in shards]).slice(0, SMALL_SPEAKER_ROWS)
    for shard in shards[1:]:
        shard.unlink()
    pq.write_table(table, shards[0])
    return dataclasses.replace(settings, DATASET_DIR=str(target)), tokenizer, config


@pytest.mark.parametrize(("alpha", "max_repeat"), [(0.0, 0.0), (0.5, 0.0), (0.0, 1.5), (0.5, 8.0)])
def test_balanced_stream_mixes_unequal_speakers_as_map_style_does(unequal, alpha, max_repeat):
    from finetuning.training.data import load_examples
    from finetuning.training.sampler import DurationBatchSampler

    settings, tokenizer, config = unequal
    mixing = {"SPEAKER_MIXING": "balanced", "SPEAKER_MIXING_ALPHA": alpha, "SPEAKER_MAX_REPEAT": max_repeat}
    stream = _stream(settings, tokenizer, config, **mixing)
    batches = list(stream)
    seen = Counter(i for batch in batches for i in batch["id"])
    speakers = Counter(s for batch in batches for s in batch["speaker"].tolist())
    examples, _ = load_examples(settings, tokenizer, "train", streaming=False)
    by_speaker = [[e.id for e in examples if e.speaker == s] for s in (0, 1)]
    assert len(by_speaker[0]) == 14 and len(by_speaker[1]) == SMALL_SPEAKER_ROWS
    expected = {0: 14, 1: {(0.0, 0.0): 14, (0.5, 0.0): 7, (0.0, 1.5): 6, (0.5, 8.0): 7}[(alpha, max_repeat)]}
    map_style = DurationBatchSampler(
        [1] * len(examples),
        [e.speaker for e in examples],
        batch_size=2,
        mixing="balanced",
        mixing_alpha=alpha,
        max_repeat=max_repeat,
    )
    assert speakers == expected == map_style.samples_per_speaker()
    assert all(seen[i] == 1 for i in by_speaker[0])  # the largest speaker: every row once
    small = [seen[i] for i in by_speaker[1]]
    assert max(small) - min(small) <= 1 and min(small) >= 1  # the small one cycles through its rows evenly
    # spread through the epoch, not one speaker after the other: the small speaker shows up in both halves
    halves = [batches[: len(batches) // 2], batches[len(batches) // 2 :]]
    assert all(any(1 in batch["speaker"].tolist() for batch in half) for half in halves)


def test_resumed_stream_continues_exactly(prepared):
    settings, tokenizer, config = prepared
    straight = _ids(_stream(settings, tokenizer, config, STREAM_SHUFFLE_BUFFER=8, MAX_BATCH_TOKENS=300))
    first = _stream(settings, tokenizer, config, STREAM_SHUFFLE_BUFFER=8, MAX_BATCH_TOKENS=300)
    for _ in zip(range(2), first, strict=False):
        first.batch_done()
    resumed = _stream(settings, tokenizer, config, STREAM_SHUFFLE_BUFFER=8, MAX_BATCH_TOKENS=300)
    resumed.load_state_dict(first.state_dict())
    assert len(straight) > 3 and _ids(resumed) == straight[2:]


def _replicate(settings, copies: int, root: Path) -> Path:
    """The prepared dataset with each speaker's train rows repeated ``copies`` times (ids made distinct) and each
    utterance's codes repeated FRAME_REPEATS times along time (about 20 s utterances, so the data, not Python's
    per-object overhead, dominates), written in row groups of 64 like prepared shards. The audio column is kept:
    streaming must never read it."""
    target = root / f"x{copies}"
    for info in Path(settings.DATASET_DIR).glob(f"*/{schema.INFO_FILE}"):
        speaker = info.parent.name
        fingerprint = json.loads(info.read_text())["fingerprint"]
        (target / speaker).mkdir(parents=True)
        (target / speaker / schema.INFO_FILE).write_text(info.read_text())
        table = pa.concat_tables([pq.read_table(p) for p in sorted(info.parent.glob("train-*.parquet"))])
        rows = table.to_pylist()
        longer = [row | {"audio_codes": row["audio_codes"] * FRAME_REPEATS} for row in rows]
        longer = [row | {"num_frames": len(row["audio_codes"])} for row in longer]
        replicated = [row | {"id": f"{copy}-{row['id']}"} for copy in range(copies) for row in longer]
        path = target / speaker / schema.shard_name("train", fingerprint, 0, 1)
        pq.write_table(pa.Table.from_pylist(replicated, schema=table.schema), path, row_group_size=64)
    return target


def _probe(settings, dataset: Path, mode: str) -> dict:
    env_file = dataset / "probe.env"
    env_file.write_text(
        f"DATASET_DIR={dataset}\nINIT_MODEL_PATH={settings.INIT_MODEL_PATH}\nSTREAM_SHUFFLE_BUFFER=64\n"
        f"VALIDATION_FRACTION=0\nDEVICE=cpu\n"
    )
    run = subprocess.run(
        [sys.executable, MEMORY_PROBE, str(env_file), mode],
        capture_output=True,
        text=True,
        env={**subprocess_env(), "ARROW_DEFAULT_MEMORY_POOL": "system"},
        cwd=REPO_ROOT,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak memory reset needs Linux /proc")
def test_streaming_memory_stays_flat_as_the_corpus_grows(prepared, tmp_path):
    settings, _, _ = prepared
    results = {}
    for copies in SCALES:
        dataset = _replicate(settings, copies, tmp_path)
        results[copies] = {mode: _probe(settings, dataset, mode) for mode in ("map", "stream")}
    for copies, result in results.items():
        print(
            f"{copies}x bundled corpus ({len(result['map']['ids'])} samples): peak memory while loading one epoch: "
            f"map-style +{result['map']['peak_mb']:.1f} MB, streaming +{result['stream']['peak_mb']:.1f} MB"
        )
        assert sorted(result["map"]["ids"]) == sorted(result["stream"]["ids"])  # the same samples
    small, large = (results[copies] for copies in SCALES)
    map_growth = large["map"]["peak_mb"] - small["map"]["peak_mb"]
    print(f"map-style growth {SCALES[0]}x -> {SCALES[1]}x: {map_growth:+.1f} MB")
    assert map_growth > MIN_MAP_GROWTH_MB  # holding every example grows with the corpus
    for result in (small, large):  # streaming stays under one bound whatever the corpus size: its buffers
        assert result["stream"]["peak_mb"] < STREAM_BOUND_MB
    assert large["stream"]["peak_mb"] < large["map"]["peak_mb"]


def test_training_runs_from_the_stream(prepared, tmp_path):
    import dataclasses

    from finetuning.training.loop import train

    settings, _, _ = prepared
    settings = dataclasses.replace(
        settings,
        DATA_STREAMING=True,
        OUTPUT_DIR=str(tmp_path / "run"),
        MAX_STEPS=2,
        GRADIENT_ACCUMULATION_STEPS=1,
        MAX_BATCH_TOKENS=300,
        SAVE_STEPS=0,
        REPORT_TO=("none",),
        EVAL_STEPS=0,
    )
    result = train(settings)
    assert result.optimizer_steps == 2 and (result.export_dir / "model.safetensors").exists()
