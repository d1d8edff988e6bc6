"""Replay mixing (``training.replay.ReplayMixed``): each sample is a replay row with probability REPLAY_FRACTION,
drawn from (seed, epoch, index) alone, so every process, worker and resume sees the same mix."""

import torch

from finetuning.training.conditioning import Conditioning
from finetuning.training.data import Example
from finetuning.training.replay import ReplayMixed


def _example(name: str, speaker: int) -> Example:
    return Example(name, speaker, "english", torch.arange(12), torch.zeros(4, 16, dtype=torch.int16))


def test_replay_rows_take_their_fraction_of_the_samples_and_keep_their_conditioning():
    examples = [_example(f"own/{i}", 0) for i in range(500)]
    replay = [
        Example(f"replay/{i}", 1, "auto", torch.arange(10), torch.zeros(3, 16, dtype=torch.int16), "non_streaming")
        for i in range(3)
    ]
    conditioning = Conditioning(seed=1, auto_fraction=0.0, layout="streaming")
    mixed = ReplayMixed(examples, conditioning, None, replay, fraction=0.25, seed=1)
    epoch0 = [mixed[(0, i)] for i in range(len(examples))]
    share = sum(e.id.startswith("replay/") for e in epoch0) / len(epoch0)
    assert abs(share - 0.25) < 0.05, share
    assert [e.id for e in epoch0] == [mixed[(0, i)].id for i in range(len(examples))]  # the same on every call
    assert [e.id for e in epoch0] != [mixed[(1, i)].id for i in range(len(examples))]  # redrawn each epoch
    assert {e.id for e in epoch0 if e.id.startswith("replay/")} == {e.id for e in replay}
    for e in epoch0:  # replay rows keep how they were generated; own rows get the run's draws
        assert (e.layout, e.language) == (
            ("non_streaming", "auto") if e.id.startswith("replay/") else ("streaming", "english")
        )
    none = ReplayMixed(examples, conditioning, None, replay, fraction=0.0, seed=1)
    assert not any(none[(0, i)].id.startswith("replay/") for i in range(len(examples)))
