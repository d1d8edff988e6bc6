"""How each training sample is conditioned: which text layout and whether its language is named.

Users call the stock API in more than one way: ``generate_custom_voice`` defaults to ``language=None`` ("Auto":
the codec prefix without a language id) and ``non_streaming_mode=True``, ``generate_voice_clone`` to
``language=None`` and ``non_streaming_mode=False``. An export is trained for every call it claims: each sample,
in each epoch, draws

- its language: "auto" with probability LANGUAGE_AUTO_FRACTION, its row's language otherwise;
- its text layout: with TRAINING_LAYOUT=mixed, non-streaming or streaming with equal probability; else the one
  named.

The draw for sample ``key`` of epoch ``e`` is ``numpy.random.default_rng([SEED, CONDITIONING_STREAM, e, key])``,
so it is the same in every DataLoader worker, on every process and after a resume. Validation samples get one
fixed draw of their layout (``VALIDATION_EPOCH``) and are scored with their row's language and with "auto".
"""

from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from finetuning.training.data import Example
from finetuning.training.step import AUTO_LANGUAGE, LAYOUTS, MIXED, sequence_length

CONDITIONING_STREAM = 7  # keeps these draws apart from the voice-clone reference draws of the same (seed, epoch)
VALIDATION_EPOCH = -1  # the "epoch" of validation's fixed draws


@dataclass(frozen=True)
class Conditioning:
    """The run's conditioning draws (SEED, LANGUAGE_AUTO_FRACTION, TRAINING_LAYOUT)."""

    seed: int
    auto_fraction: float
    layout: str  # one of LAYOUTS, or MIXED

    @classmethod
    def from_settings(cls, settings) -> Conditioning:
        return cls(settings.SEED, settings.LANGUAGE_AUTO_FRACTION, settings.TRAINING_LAYOUT)

    def draw(self, epoch: int, key: int) -> tuple[bool, str]:
        """(language "auto"?, text layout) of sample ``key`` in ``epoch``."""
        rng = np.random.default_rng([self.seed, CONDITIONING_STREAM, epoch + 1, key])  # epoch -1: validation
        auto = bool(rng.random() < self.auto_fraction)
        layout = LAYOUTS[int(rng.integers(len(LAYOUTS)))] if self.layout == MIXED else self.layout
        return auto, layout

    def apply(self, example: Example, epoch: int, key: int) -> Example:
        """``example`` with its drawn language and layout."""
        auto, layout = self.draw(epoch, key)
        return dataclasses.replace(example, language=AUTO_LANGUAGE if auto else example.language, layout=layout)

    def validation(self, examples: list[Example]) -> dict[str, list[Example]]:
        """Validation sets, each with its fixed layout draws: {"": the rows' languages, "auto/": language "auto"}
        (the second only when some training samples are trained without their language); the keys prefix the
        reported losses' names after ``eval/``."""
        drawn = [dataclasses.replace(e, layout=self.draw(VALIDATION_EPOCH, i)[1]) for i, e in enumerate(examples)]
        sets = {"": drawn}
        if self.auto_fraction > 0:
            sets["auto/"] = [dataclasses.replace(e, language=AUTO_LANGUAGE) for e in drawn]
        return sets

    def trained_calls(self) -> dict[str, list]:
        """What an export trained with these draws answers to, as recorded in ``finetune_info.json``:
        ``non_streaming_mode`` values and ``language`` ("given": the speaker's language named; "auto": left out)."""
        modes = [True, False] if self.layout == MIXED else [self.layout == "non_streaming"]
        languages = ["given"] if self.auto_fraction == 0 else ["given", "auto"] if self.auto_fraction < 1 else ["auto"]
        return {"non_streaming_mode": modes, "language": languages}


def stream_key(speaker_index: int, row_id: str) -> int:
    """The draw key of a streamed row (a stream has no stable index): a checksum of its speaker and id."""
    return zlib.crc32(f"{speaker_index}/{row_id}".encode())


class TrainingExamples(torch.utils.data.Dataset):
    """The training examples with their conditioning draws of the epoch: item ``(epoch, i)`` (a batch sampler's
    indices tagged by ``clone.EpochIndices``). ``conditioning`` None leaves the examples as they are."""

    def __init__(self, examples: list[Example], conditioning: Conditioning | None, talker_config=None):
        self.examples, self.conditioning, self.talker_config = examples, conditioning, talker_config

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, key: tuple[int, int]) -> Example:
        epoch, index = key
        example = self.examples[index]
        return example if self.conditioning is None else self.conditioning.apply(example, epoch, index)

    def epoch_lengths(self, epoch: int) -> list[int]:
        """Talker positions of every item of ``epoch`` as drawn (layout, language, ICL reference or none): what
        the batch sampler budgets for, so a batch reserves room for a reference only when one was drawn."""
        lengths = []
        for index in range(len(self)):
            e = self[(epoch, index)]
            layout = e.layout or (self.conditioning.layout if self.conditioning else "non_streaming")
            size = sequence_length(
                self.talker_config, e.text_ids.numel(), e.codes.shape[0], e.language, layout, instruct=e.instruct_size()
            )
            lengths.append(size + e.reference_size())
        return lengths
