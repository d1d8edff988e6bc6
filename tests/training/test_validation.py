"""Validation batches packed by length, and the EVAL_MAX_BATCHES cap on periodic validation."""

import pytest
import torch
from conftest import make_settings

from finetuning.training.data import Example
from finetuning.training.validation import set_losses as validation_losses
from finetuning.training.validation import validation_batches


def test_batches_respect_the_budget_and_hold_every_example_once():
    lengths = [5, 40, 12, 33, 7, 90, 21, 18, 60, 8]
    batches = validation_batches(lengths, max_batch_tokens=64, batch_size=2, seed=0)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(len(b) * max(lengths[i] for i in b) <= 64 or len(b) == 1 for b in batches)
    assert len(batches) < len(lengths)  # short examples share batches
    assert all(len(b) <= 2 for b in validation_batches(lengths, max_batch_tokens=0, batch_size=2, seed=0))
    assert validation_batches(lengths, 64, 2, seed=0) == batches  # the same order every time


def test_periodic_validation_scores_only_the_first_batches(tiny_model_dir, tmp_path):
    import qwen_tts
    from accelerate import Accelerator

    from finetuning.training.step import TalkerStep, sequence_length

    settings = make_settings(tmp_path, tiny_model_dir, MAX_BATCH_TOKENS=200)
    model = qwen_tts.Qwen3TTSModel.from_pretrained(str(tiny_model_dir), dtype=torch.float32).model
    step = TalkerStep(model, torch.randn(1, model.config.talker_config.hidden_size))
    generator = torch.Generator().manual_seed(0)
    examples = [
        Example(f"u{i}", 0, "english", torch.randint(0, 100, (4 + i,), generator=generator),
                torch.randint(0, 2048, (6 + 3 * i, 16), generator=generator))
        for i in range(8)
    ]  # fmt: skip
    accelerator = Accelerator(cpu=True)
    capped = validation_losses(step, examples, settings, accelerator, max_batches=1)
    everything = validation_losses(step, examples, settings, accelerator)
    assert capped != everything
    tcfg = model.config.talker_config
    lengths = [
        sequence_length(tcfg, e.text_ids.numel(), e.codes.shape[0], e.language, "non_streaming") for e in examples
    ]
    first_batch = validation_batches(lengths, 200, settings.BATCH_SIZE, settings.SEED)[0]
    alone = validation_losses(step, [examples[i] for i in first_batch], settings, accelerator)
    assert capped == pytest.approx(alone)
