"""The run's training data: examples in memory or a stream, the batch sampler over them, the validation sets and
the conditioning table the step reads (speaker rows, or every clip's x-vector for voice cloning)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from finetuning.settings import Settings
from finetuning.training.clone import CloneExamples, EpochIndices, build_reference_pool
from finetuning.training.conditioning import Conditioning, TrainingExamples
from finetuning.training.data import (
    Example,
    load_examples,
    load_training_examples,
    make_train_loader,
    speaker_languages,
)
from finetuning.training.init_model import (
    speaker_table,
)
from finetuning.training.modes import training_mode
from finetuning.training.presets import PresetSpeakers
from finetuning.training.replay import ReplayMixed
from finetuning.training.sampler import DurationBatchSampler
from finetuning.training.step import sequence_length
from finetuning.training.streaming import StreamingBatches, stream_languages


def make_sampler(
    examples: list[Example], settings: Settings, talker_config, accelerator, dataset: TrainingExamples
) -> DurationBatchSampler:
    """The batch sampler over ``examples``, budgeting each epoch's samples as ``dataset`` draws them."""
    longest = [
        sequence_length(
            talker_config,
            e.text_ids.numel(),
            e.codes.shape[0],
            e.language,
            settings.TRAINING_LAYOUT,
            instruct=e.instruct_size(),
        )
        + _longest_reference(dataset, i)
        for i, e in enumerate(examples)
    ]
    return DurationBatchSampler(
        longest,
        [e.speaker for e in examples],
        batch_size=settings.BATCH_SIZE,
        max_batch_tokens=settings.MAX_BATCH_TOKENS,
        num_buckets=settings.NUM_BUCKETS,
        mixing=settings.SPEAKER_MIXING,
        mixing_alpha=settings.SPEAKER_MIXING_ALPHA,
        max_repeat=settings.SPEAKER_MAX_REPEAT,
        seed=settings.SEED,
        num_replicas=accelerator.num_processes,
        rank=accelerator.process_index,
        epoch_lengths=dataset.epoch_lengths if settings.MAX_BATCH_TOKENS else None,
    )


def _longest_reference(dataset: TrainingExamples, index: int) -> int:
    """Positions the longest ICL reference example ``index`` can draw adds (0 without voice cloning): what its
    bucket is chosen by."""
    if not isinstance(dataset, CloneExamples) or dataset.icl_fraction == 0:
        return 0
    return dataset.pool.longest_reference(dataset.examples[index].speaker)


def make_train_data(
    settings: Settings,
    tokenizer,
    model,
    accelerator,
    xvector_dtype: torch.dtype,
    presets: PresetSpeakers | None = None,
    make_replay: Callable[[list[Example]], list[Example]] | None = None,
):
    """(train batches, their sampler, each speaker's language, validation sets, conditioning): the conditioning is
    the (S, D) speaker embeddings, or with TRAINING_MODE=voice_clone every training clip's x-vector (C, D)
    (``training.clone``), computed once here by the frozen speaker encoder in ``xvector_dtype``. The validation
    sets are ``Conditioning.validation``'s (row languages, and "auto"). A CustomVoice init's ``presets`` follow the
    new speakers' rows in the table, and ``make_replay(train examples)`` (REPLAY_FRACTION) gives the replay examples
    mixed into the training samples (``training.replay``).

    Map-style: every example in memory (codes int16), batches chosen by ``DurationBatchSampler`` and collated by
    a DataLoader. ``DATA_STREAMING``: a ``StreamingBatches`` stream is both (memory bounded by its buffers)."""
    talker_config = model.config.talker_config
    conditioning = Conditioning.from_settings(settings)
    mode = training_mode(settings)
    if settings.DATA_STREAMING:
        stream = StreamingBatches(
            settings, tokenizer, talker_config, accelerator.num_processes, accelerator.process_index
        )
        validation = conditioning.validation(load_examples(settings, tokenizer, "validation")[0])
        embeds = speaker_table(model, settings, xvector_dtype)
        return stream, stream, stream_languages(settings), validation, embeds
    train_examples, validation = load_training_examples(settings, tokenizer)
    languages = speaker_languages(train_examples, settings.TRAIN_SPEAKERS)
    pin_memory = accelerator.device.type == "cuda"
    if mode.references:
        pool = build_reference_pool(model, settings, train_examples, xvector_dtype)
        dataset = CloneExamples(pool, settings.SEED, settings.CLONE_ICL_FRACTION, conditioning, talker_config)
        validation = dataset.validation(validation)
        conditioning_table = pool.xvectors
    else:
        conditioning_table = speaker_table(model, settings, xvector_dtype)
        if presets is not None and presets.rows:  # replayed presets: speakers S .. S + P - 1 of the table
            conditioning_table = torch.cat([conditioning_table, presets.embeds.to(conditioning_table.dtype)])
        if make_replay is None:
            dataset = TrainingExamples(train_examples, conditioning, talker_config)
        else:
            replay = make_replay(train_examples)
            fraction = settings.REPLAY_FRACTION
            dataset = ReplayMixed(train_examples, conditioning, talker_config, replay, fraction, settings.SEED)
    sampler = make_sampler(train_examples, settings, talker_config, accelerator, dataset)
    loader = make_train_loader(dataset, EpochIndices(sampler), settings.DATALOADER_WORKERS, pin_memory)
    return loader, sampler, languages, conditioning.validation(validation), conditioning_table
