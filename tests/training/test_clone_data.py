"""Voice-clone references: drawn per sample and epoch from the other clips of the speaker, seeded, in the mix asked."""

import pytest
import torch
from conftest import make_settings

from finetuning.training.clone import CloneExamples, EpochIndices, ReferencePool, build_reference_pool
from finetuning.training.data import DataError, Example, collate
from finetuning.training.layout import ROLE_TOKENS, SUFFIX_TOKENS


def _example(i: int, speaker: int, frames: int) -> Example:
    text_ids = torch.arange(ROLE_TOKENS + SUFFIX_TOKENS + 2 + i)  # content of 2 + i tokens
    codes = torch.full((frames, 16), i, dtype=torch.int16)
    return Example(id=f"clip{i}", speaker=speaker, language="auto", text_ids=text_ids, codes=codes)


def _draw(example: Example) -> tuple:
    """What a draw decided: the reference clip and whether it is an ICL one."""
    return example.id, example.xvector_row, example.ref_codes is not None


def _pool() -> ReferencePool:
    examples = [_example(i, speaker, 3 + i) for i, speaker in enumerate([0, 0, 0, 1, 1])]
    by_speaker = {0: [0, 1, 2], 1: [3, 4]}
    return ReferencePool(examples=examples, xvectors=torch.randn(5, 8), by_speaker=by_speaker)


def test_references_are_other_clips_of_the_speaker_drawn_per_epoch_and_seeded():
    pool = _pool()
    dataset = CloneExamples(pool, seed=7, icl_fraction=0.5)
    modes, references = set(), {i: set() for i in range(5)}
    for epoch in range(40):
        for i in range(5):
            drawn = dataset[(epoch, i)]
            assert drawn.xvector_row != i and pool.examples[drawn.xvector_row].speaker == pool.examples[i].speaker
            assert torch.equal(drawn.codes, pool.examples[i].codes)  # the target itself is untouched
            assert _draw(drawn) == _draw(
                dataset[(epoch, i)]
            )  # a pure function of (seed, epoch, index): workers and resume agree
            references[i].add(drawn.xvector_row)
            modes.add(drawn.ref_codes is not None)
            if drawn.ref_codes is not None:  # ICL: the reference's own transcript content and codes
                reference = pool.examples[drawn.xvector_row]
                assert torch.equal(drawn.ref_codes, reference.codes)
                assert torch.equal(drawn.ref_text_ids, reference.text_ids[ROLE_TOKENS:-SUFFIX_TOKENS])
            assert torch.equal(drawn.xvector, pool.xvectors[drawn.xvector_row])
    assert modes == {True, False}
    assert references[0] == {1, 2} and references[3] == {4}  # every other clip of the speaker comes up
    other_seed = CloneExamples(pool, seed=8, icl_fraction=0.5)
    assert [_draw(dataset[(0, i)]) for i in range(5)] != [_draw(other_seed[(0, i)]) for i in range(5)]


@pytest.mark.parametrize(("fraction", "low", "high"), [(0.0, 0, 0), (1.0, 1, 1), (0.25, 0.15, 0.35)])
def test_icl_fraction_sets_the_mix(fraction, low, high):
    dataset = CloneExamples(_pool(), seed=0, icl_fraction=fraction)
    draws = [dataset[(epoch, i)].ref_codes is not None for epoch in range(100) for i in range(5)]
    assert low <= sum(draws) / len(draws) <= high


def test_collated_batch_carries_each_reference_and_validation_references_are_fixed():
    pool = _pool()
    dataset = CloneExamples(pool, seed=1, icl_fraction=0.5)
    drawn = [dataset[(3, i)] for i in range(5)]
    batch = collate(drawn)
    assert batch["xvector_row"].tolist() == [e.xvector_row for e in drawn]
    torch.testing.assert_close(batch["xvector"], pool.xvectors[batch["xvector_row"]], rtol=0, atol=0)
    for example, text_ids, codes in zip(drawn, batch["ref_text_ids"], batch["ref_codes"], strict=True):
        assert (codes is None) == (example.ref_codes is None) == (text_ids is None)
        assert codes is None or codes.dtype == torch.long
    assert "xvector_row" not in collate([pool.examples[0]])  # custom-voice batches are unchanged
    held_out = [_example(9, 1, 4)]
    assert _draw(dataset.validation(held_out)[0]) == _draw(dataset.validation(held_out)[0])
    assert dataset.validation(held_out)[0].xvector_row in pool.by_speaker[1]


def test_epoch_indices_tag_each_batch_with_the_samplers_epoch_when_drawn():
    class Sampler:
        epoch = 0

        def __iter__(self):
            yield [0, 1]
            self.epoch = 5  # as set_epoch would between batches
            yield [2]

        def __len__(self):
            return 2

    tagged = EpochIndices(Sampler())
    assert list(tagged) == [[(0, 0), (0, 1)], [(5, 2)]] and len(tagged) == 2


def test_a_speaker_with_one_clip_is_refused(tmp_path, tiny_model_dir):
    settings = make_settings(tmp_path, tiny_model_dir, TRAIN_SPEAKERS="solo,duo", TRAINING_MODE="voice_clone")
    examples = [_example(0, 0, 3), _example(1, 1, 3), _example(2, 1, 3)]
    with pytest.raises(DataError, match="speaker solo has 1 training clip"):
        build_reference_pool(None, settings, examples)


def test_voice_clone_refuses_streaming(tmp_path, tiny_model_dir):
    from finetuning.settings import SettingsError

    with pytest.raises(SettingsError, match="DATA_STREAMING.*TRAINING_MODE=voice_clone"):
        make_settings(tmp_path, tiny_model_dir, TRAINING_MODE="voice_clone", DATA_STREAMING=True)


def test_a_clip_prepared_twice_is_never_its_own_reference():
    """Preparation keeps a repeated recording under a suffixed id: same codes, another row."""
    import dataclasses

    examples = [_example(0, 0, 3), _example(1, 0, 4), _example(2, 0, 5)]
    examples.append(dataclasses.replace(examples[0], id="clip0-2"))  # clip 3 = clip 0's audio again
    pool = ReferencePool(examples=examples, xvectors=torch.randn(4, 8), by_speaker={0: [0, 1, 2, 3]})
    dataset = CloneExamples(pool, seed=3, icl_fraction=0.5)
    drawn = {(i, dataset[(epoch, i)].xvector_row) for epoch in range(60) for i in range(4)}
    assert not drawn & {(0, 0), (0, 3), (3, 3), (3, 0)}  # neither copy conditions on either copy
    assert {(0, 1), (0, 2), (3, 1), (3, 2), (1, 0), (1, 3)} <= drawn
    held_out = dataclasses.replace(examples[1], id="held-out copy")
    assert {dataset.validation([held_out])[0].xvector_row for _ in range(3)} != {1}
    assert all(dataset.validation([held_out])[0].xvector_row != 1 for _ in range(3))


def test_references_longer_than_the_cap_are_never_icl_references():
    examples = [_example(0, 0, 3), _example(1, 0, 30), _example(2, 0, 4)]  # clip 1: 30 frames
    pool = ReferencePool(examples=examples, xvectors=torch.randn(3, 8), by_speaker={0: [0, 1, 2]}, max_icl_frames=10)
    dataset = CloneExamples(pool, seed=0, icl_fraction=1.0)
    draws = [dataset[(epoch, i)] for epoch in range(40) for i in range(3)]
    assert all(d.ref_codes is not None for d in draws)  # every clip has a short enough other clip
    assert {d.xvector_row for d in draws} == {0, 2}  # clip 1 (30 frames > 10) is never a reference
    # A speaker whose only other clip is too long trains that sample in x-vector mode from it.
    pair = ReferencePool(examples=examples[:2], xvectors=torch.randn(2, 8), by_speaker={0: [0, 1]}, max_icl_frames=10)
    alone = CloneExamples(pair, seed=0, icl_fraction=1.0)
    assert all(alone[(epoch, 0)].ref_codes is None and alone[(epoch, 0)].xvector_row == 1 for epoch in range(10))
    assert all(alone[(epoch, 1)].ref_codes is not None for epoch in range(10))


def test_epoch_lengths_count_an_icl_reference_only_when_drawn(tiny_model_dir):
    import qwen_tts

    from finetuning.training.conditioning import Conditioning
    from finetuning.training.step import sequence_length

    tcfg = qwen_tts.Qwen3TTSModel.from_pretrained(str(tiny_model_dir)).model.config.talker_config
    conditioning = Conditioning(seed=0, auto_fraction=0.5, layout="mixed")
    dataset = CloneExamples(_pool(), seed=0, icl_fraction=0.5, conditioning=conditioning, talker_config=tcfg)
    for epoch in range(4):
        lengths = dataset.epoch_lengths(epoch)
        for i, length in enumerate(lengths):
            e = dataset[(epoch, i)]
            own = sequence_length(tcfg, e.text_ids.numel(), e.codes.shape[0], e.language, e.layout)
            assert length == own + (0 if e.ref_codes is None else e.ref_text_ids.numel() + e.ref_codes.shape[0])
    drawn = [dataset[(e, i)] for e in range(20) for i in range(5)]
    assert {d.layout for d in drawn} == {"streaming", "non_streaming"} and {d.language for d in drawn} >= {"auto"}


def test_the_xvector_table_stays_one_host_copy_and_batches_bring_their_rows(tiny_model_dir, tmp_path_factory):
    """Voice cloning keeps a per-clip x-vector table (200 k clips x 2048 wide is 1.6 GB in float32): held once on
    the host, in the checkpoint's dtype, never in the step module (so never copied to a device per process);
    each batch carries its references' rows, gathered by ``collate``."""
    import qwen_tts
    from accelerate import Accelerator
    from conftest import prepare_small_dataset

    from finetuning.training.loop import build_step_module
    from finetuning.training.run_data import make_train_data

    root = prepare_small_dataset(tmp_path_factory, "clone_table", tiny_model_dir)
    settings = make_settings(root, tiny_model_dir, TRAINING_MODE="voice_clone", VALIDATION_FRACTION=0.0)
    wrapper = qwen_tts.Qwen3TTSModel.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    model, tokenizer = wrapper.model, wrapper.processor.tokenizer
    accelerator = Accelerator(cpu=True)
    loader, _, _, _, table = make_train_data(settings, tokenizer, model, accelerator, torch.bfloat16)
    clips, width = table.shape
    assert clips == 8 and width == model.config.talker_config.hidden_size and table.dtype == torch.bfloat16
    step = accelerator.prepare(build_step_module(model, settings, table, None))
    model_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    step_bytes = sum(t.numel() * t.element_size() for t in [*step.parameters(), *step.buffers()])
    assert step_bytes == model_bytes  # nothing beside the model: no copy of the (C, D) table
    batch = next(iter(loader))
    rows = table[batch["xvector_row"]]
    assert batch["xvector"].dtype == torch.bfloat16 and torch.equal(batch["xvector"], rows)
    with torch.no_grad():
        loss, _ = step(batch)
    assert torch.isfinite(loss)
