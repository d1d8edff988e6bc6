"""Voice-clone training data (TRAINING_MODE=voice_clone): every sample is conditioned on another clip of its speaker.

Stock ``Qwen3TTSModel.generate_voice_clone`` conditions on a reference clip: its x-vector in the speaker slot, and
in ICL mode (its default) also the clip's transcript and codes in the prompt. Training does the same with a
reference drawn for each sample from the *other* training clips of the same speaker: for sample i of epoch e the
draw is ``numpy.random.default_rng([SEED, e, i])`` (reference clip, then ICL with probability CLONE_ICL_FRACTION,
x-vector mode otherwise), so it is the same in every worker process and after a resume. Validation samples get
one fixed draw among their speaker's training clips.

X-vectors are computed once per clip at the start of training by the Base model's frozen speaker encoder, into a
per-clip table (C, D) the step indexes (``xvector_row``); never per step. A per-run cache, not a dataset column:
x-vectors belong to INIT_MODEL_PATH's speaker encoder, whereas a prepared dataset depends on the speech tokenizer
alone, so one prepared dataset serves any Base model. The reference codes and transcript ids are the dataset's
own (``audio_codes``, ``text``), exactly what ``create_voice_clone_prompt`` computes from the same audio.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import torch

from finetuning.settings import Settings
from finetuning.training.data import DataError, Example, load_split
from finetuning.training.layout import ROLE_TOKENS, SUFFIX_TOKENS
from finetuning.training.speakers import speaker_embedding

logger = logging.getLogger(__name__)

VALIDATION_STREAM = 1  # seeds validation draws apart from the training draws (which are seeded by epoch)


@dataclass
class ReferencePool:
    """The training clips of a run as references; clip c is training example c.

    speakers  list[int]               speaker index of each clip
    xvectors  (C, D) float32          each clip's x-vector from the frozen speaker encoder
    by_speaker dict[int, list[int]]   the clips of each speaker
    """

    examples: list[Example]
    xvectors: torch.Tensor
    by_speaker: dict[int, list[int]]

    def reference_size(self, clip: int) -> int:
        """Talker positions clip ``clip`` adds as an ICL reference: its transcript's content ids and its frames."""
        example = self.examples[clip]
        return example.text_ids.numel() - ROLE_TOKENS - SUFFIX_TOKENS + example.codes.shape[0]

    def with_reference(self, example: Example, candidates: list[int], rng: np.random.Generator, icl_fraction: float):
        """``example`` conditioned on a clip drawn from ``candidates``: its x-vector row always, its transcript
        content ids and codes too when the draw says ICL."""
        clip = candidates[int(rng.integers(len(candidates)))]
        if rng.random() >= icl_fraction:
            return dataclasses.replace(example, xvector_row=clip)
        reference = self.examples[clip]
        content = reference.text_ids[ROLE_TOKENS:-SUFFIX_TOKENS]
        return dataclasses.replace(example, xvector_row=clip, ref_text_ids=content, ref_codes=reference.codes)


def build_reference_pool(model, settings: Settings, examples: list[Example]) -> ReferencePool:
    """X-vectors of every training clip (``examples``, in order), one speaker-encoder pass each.

    Raises DataError for a speaker with fewer than two training clips (a sample's reference must be another clip of
    its speaker) or a training row whose audio cannot be found again.
    """
    by_speaker: dict[int, list[int]] = {}
    for clip, example in enumerate(examples):
        by_speaker.setdefault(example.speaker, []).append(clip)
    vectors: list[torch.Tensor | None] = [None] * len(examples)
    for index, speaker in enumerate(settings.TRAIN_SPEAKERS):
        clips = by_speaker.get(index, [])
        if len(clips) < 2:
            raise DataError(
                f"speaker {speaker} has {len(clips)} training clip(s); TRAINING_MODE=voice_clone conditions each "
                "clip on another clip of the same speaker: give it at least 2, or remove it from TRAIN_SPEAKERS"
            )
        wanted = {examples[c].id: c for c in clips}
        for row in load_split(settings, speaker, "train", ["id", "audio"]):
            if row["id"] in wanted:
                vectors[wanted.pop(row["id"])] = speaker_embedding(model, [row["audio"]["array"]])
        if wanted:
            raise DataError(f"speaker {speaker}: no audio for training rows {sorted(wanted)[:5]}; re-run preparation")
    logger.info("x-vectors of %d training clips computed for voice-clone references", len(examples))
    return ReferencePool(examples=examples, xvectors=torch.stack(vectors), by_speaker=by_speaker)


class CloneExamples(torch.utils.data.Dataset):
    """The training examples, each with its reference of the epoch: item ``(epoch, i)`` (see ``EpochIndices``)."""

    def __init__(self, pool: ReferencePool, seed: int, icl_fraction: float):
        self.pool, self.seed, self.icl_fraction = pool, seed, icl_fraction

    def __len__(self) -> int:
        return len(self.pool.examples)

    def __getitem__(self, key: tuple[int, int]) -> Example:
        epoch, index = key
        example = self.pool.examples[index]
        others = [c for c in self.pool.by_speaker[example.speaker] if c != index]
        rng = np.random.default_rng([self.seed, epoch, index])
        return self.pool.with_reference(example, others, rng, self.icl_fraction)

    def reference_budgets(self) -> list[int]:
        """Per example, the most positions a reference can add (the speaker's longest ICL reference; 0 without
        ICL): the batch sampler budgets for it, so no draw takes a batch over MAX_BATCH_TOKENS."""
        if self.icl_fraction == 0:
            return [0] * len(self)
        longest = {s: max(self.pool.reference_size(c) for c in clips) for s, clips in self.pool.by_speaker.items()}
        return [longest[e.speaker] for e in self.pool.examples]

    def validation(self, examples: list[Example]) -> list[Example]:
        """Validation examples with one fixed reference each, among their speaker's training clips."""
        return [
            self.pool.with_reference(
                e,
                self.pool.by_speaker[e.speaker],
                np.random.default_rng([self.seed, VALIDATION_STREAM, i]),
                self.icl_fraction,
            )
            for i, e in enumerate(examples)
        ]


class EpochIndices:
    """A batch sampler's batches as ``(epoch, index)`` items, the epoch read when each batch is drawn (in the main
    process), so worker processes draw the references of the right epoch. Everything else (``set_epoch``,
    ``state_dict``, ...) stays on the wrapped sampler, which the loop keeps using."""

    def __init__(self, sampler):
        self.sampler = sampler

    def __iter__(self):
        for batch in self.sampler:
            yield [(self.sampler.epoch, index) for index in batch]

    def __len__(self) -> int:
        return len(self.sampler)
