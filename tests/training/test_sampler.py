"""Batch sampler and training data: budgets, buckets, mixing, sharding, exact resume, streaming = map-style."""

from collections import Counter

import pytest
import torch
from conftest import make_settings

from finetuning.training.sampler import DurationBatchSampler, padding_fraction


@pytest.fixture(scope="module")
def bundled(tiny_model_dir, tmp_path_factory):
    """(settings, tokenizer, examples, lengths) for the whole bundled corpus prepared with the tiny tokenizer."""
    from transformers import AutoTokenizer

    from finetuning.preparation.prepare import prepare_dataset
    from finetuning.training.data import load_examples
    from finetuning.training.step import sequence_length

    settings = make_settings(tmp_path_factory.mktemp("bundled"), tiny_model_dir)
    prepare_dataset(settings, report=lambda _: None)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    examples, skipped = load_examples(settings, tokenizer, "train", streaming=False)
    assert not any(skipped.values())
    import json

    talker_config = type("TalkerConfig", (), json.loads((tiny_model_dir / "config.json").read_text())["talker_config"])
    lengths = [
        sequence_length(talker_config, e.text_ids.numel(), e.codes.shape[0], e.language, "non_streaming")
        for e in examples
    ]
    return settings, tokenizer, examples, lengths


def _sampler(lengths, speakers, **kwargs):
    defaults = {"batch_size": 4, "max_batch_tokens": 400, "num_buckets": 5, "seed": 3}
    return DurationBatchSampler(lengths, speakers, **{**defaults, **kwargs})


def test_sequence_length_matches_the_built_sequence(bundled, tiny_model_dir):
    import qwen_tts

    from finetuning.training.step import build_sequence, language_id_for, sequence_length

    _, _, examples, _ = bundled
    model = qwen_tts.Qwen3TTSModel.from_pretrained(str(tiny_model_dir), dtype=torch.float32).model
    tcfg = model.config.talker_config
    for example in (examples[0], examples[-1]):  # one english (language id), one swahili ("auto")
        for layout in ("non_streaming", "streaming"):
            with torch.no_grad():
                embeds, _ = build_sequence(
                    model,
                    example.text_ids,
                    example.codes.long(),  # examples keep int16 codes; collate widens them
                    torch.zeros(tcfg.hidden_size),
                    language_id_for(tcfg, example.language),
                    layout,
                )
            expected = sequence_length(tcfg, example.text_ids.numel(), example.codes.shape[0], example.language, layout)
            assert embeds.shape[0] == expected


def test_every_batch_respects_the_budget_and_buckets_cut_padding(bundled):
    _, _, examples, lengths = bundled
    speakers = [e.speaker for e in examples]
    budget = 400
    bucketed = _sampler(lengths, speakers, max_batch_tokens=budget)
    batches = bucketed.plan(0)
    assert sorted(i for b in batches for i in b) == sorted(range(len(lengths)))  # proportional: each once
    for batch in batches:
        assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= budget
    fixed = _sampler(lengths, speakers, max_batch_tokens=0, batch_size=4)
    with_buckets = padding_fraction(batches, lengths)
    without = padding_fraction(fixed.plan(0), lengths)
    print(f"padding fraction on the bundled corpus: buckets {with_buckets:.3f}, fixed batches of 4 {without:.3f}")
    assert with_buckets <= 0.10
    assert with_buckets < without


def test_an_example_over_budget_gets_a_batch_of_its_own():
    sampler = _sampler([10, 10, 500, 10], [0, 0, 1, 1], max_batch_tokens=100, num_buckets=1)
    batches = sampler.plan(0)
    assert [2] in batches
    assert sorted(i for b in batches for i in b) == [0, 1, 2, 3]


def test_speaker_mixing_follows_the_setting():
    lengths = [20] * 12
    speakers = [0] * 9 + [1] * 3
    proportional = Counter(speakers[i] for b in _sampler(lengths, speakers, mixing="proportional").plan(0) for i in b)
    balanced_sampler = _sampler(lengths, speakers, mixing="balanced")
    balanced = Counter(speakers[i] for b in balanced_sampler.plan(0) for i in b)
    assert proportional == {0: 9, 1: 3}
    assert balanced == {0: 9, 1: 9}
    seen_small = {i for b in balanced_sampler.plan(0) for i in b if speakers[i] == 1}
    assert seen_small == {9, 10, 11}
    with pytest.raises(ValueError, match="mixing"):
        _sampler(lengths, speakers, mixing="random")


@pytest.mark.parametrize(
    ("alpha", "max_repeat", "small_share"),
    [(0.0, 0, 50), (0.5, 0, 10), (1.0, 0, 2), (0.0, 3, 6), (0.5, 4, 8)],
)
def test_balanced_mixing_shares_follow_the_temperature_and_the_cap(alpha, max_repeat, small_share):
    lengths = [20] * 52
    speakers = [0] * 50 + [1] * 2  # a 50-clip speaker beside a 2-clip one
    sampler = _sampler(lengths, speakers, mixing="balanced", mixing_alpha=alpha, max_repeat=max_repeat)
    counts = Counter(speakers[i] for b in sampler.plan(0) for i in b)
    assert counts == {0: 50, 1: small_share} == sampler.samples_per_speaker()
    small = Counter(i for b in sampler.plan(0) for i in b if speakers[i] == 1)
    assert set(small) == {50, 51} and max(small.values()) - min(small.values()) <= 1  # cycles evenly
    assert Counter(i for b in sampler.plan(0) for i in b if speakers[i] == 0) == dict.fromkeys(range(50), 1)


def test_bad_mixing_parameters_are_refused():
    with pytest.raises(ValueError, match="mixing_alpha"):
        _sampler([20] * 4, [0, 0, 1, 1], mixing="balanced", mixing_alpha=1.5)
    with pytest.raises(ValueError, match="max_repeat"):
        _sampler([20] * 4, [0, 0, 1, 1], mixing="balanced", max_repeat=0.5)


def test_epochs_differ_seeds_repeat_and_shards_are_disjoint(bundled):
    _, _, examples, lengths = bundled
    speakers = [e.speaker for e in examples]
    a = _sampler(lengths, speakers)
    assert a.plan(0) == _sampler(lengths, speakers).plan(0)
    assert a.plan(0) != a.plan(1)
    assert a.plan(0) != _sampler(lengths, speakers, seed=4).plan(0)
    ranks = [_sampler(lengths, speakers, num_replicas=2, rank=r) for r in range(2)]
    for epoch in (0, 1):
        for sampler in ranks:
            sampler.set_epoch(epoch)
        shards = [list(s) for s in ranks]
        assert len(shards[0]) == len(shards[1])
        ids = [{i for b in shard for i in b} for shard in shards]
        assert not ids[0] & ids[1]
    with pytest.raises(ValueError, match="rank"):
        _sampler(lengths, speakers, num_replicas=2, rank=2)


def test_state_resumes_mid_epoch_exactly(bundled):
    _, _, examples, lengths = bundled
    speakers = [e.speaker for e in examples]
    full = _sampler(lengths, speakers)
    full.set_epoch(2)
    uninterrupted = list(full)
    first = _sampler(lengths, speakers)
    first.set_epoch(2)
    done = []
    for batch in first:  # the loop marks each batch it trained on; the sampler's state is its position
        done.append(batch)
        first.batch_done()
        if len(done) == 3:
            state = first.state_dict()
            break
    resumed = _sampler(lengths, speakers)
    resumed.load_state_dict(state)
    assert (resumed.epoch, resumed.batches_done) == (2, 3)
    assert done + list(resumed) == uninterrupted
    with pytest.raises(ValueError, match="SEED"):
        _sampler(lengths, speakers, seed=9).load_state_dict(state)


def test_streaming_and_map_style_give_the_same_examples_and_batches(bundled):
    from finetuning.training.data import load_examples

    settings, tokenizer, examples, lengths = bundled
    streamed, _ = load_examples(settings, tokenizer, "train", streaming=True)
    assert [e.id for e in streamed] == [e.id for e in examples]
    for a, b in zip(streamed, examples, strict=True):
        assert torch.equal(a.codes, b.codes) and torch.equal(a.text_ids, b.text_ids)
    speakers = [e.speaker for e in streamed]
    assert _sampler(lengths, speakers).plan(0) == _sampler(lengths, [e.speaker for e in examples]).plan(0)


def test_bad_rows_are_counted_and_a_speaker_without_rows_is_an_error(bundled, tmp_path):
    import datasets

    from finetuning.training.data import DataError, build_examples, load_examples

    _, tokenizer, _, _ = bundled
    rows = datasets.Dataset.from_list(
        [
            {"id": "ok", "text": "Hello.", "language": "english", "audio_codes": [[1] * 16] * 3},
            {"id": "no_codes", "text": "Hello.", "language": "english", "audio_codes": []},
            {"id": "no_text", "text": "", "language": "english", "audio_codes": [[1] * 16] * 3},
        ]
    )
    examples, skipped = build_examples(rows, 0, tokenizer, "someone", "train")
    assert [e.id for e in examples] == ["ok"] and skipped == 2

    settings = make_settings(tmp_path, tmp_path, TRAIN_SPEAKERS="ghost_speaker")
    with pytest.raises(DataError, match="ghost_speaker.*data_preparation.py"):
        load_examples(settings, tokenizer, "train")
