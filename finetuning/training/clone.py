"""Voice-clone training data (TRAINING_MODE=voice_clone): every sample is conditioned on another clip of its speaker.

Stock ``Qwen3TTSModel.generate_voice_clone`` conditions on a reference clip: its x-vector in the speaker slot, and
in ICL mode (its default) also the clip's transcript and codes in the prompt. Training does the same with a
reference drawn for each sample from the *other* recordings of the same speaker (never one with the sample's own
audio, compared by content, so a clip prepared twice is not its own reference): for sample i of epoch e the draw is
``numpy.random.default_rng([SEED, e, i])`` (ICL with probability CLONE_ICL_FRACTION, x-vector mode otherwise, then
the reference clip; an ICL reference is at most CLONE_REF_MAX_S long, like the 3-10 s references users give), so
it is the same in every worker process and after a resume. Validation samples get one fixed draw among their
speaker's training clips. The text layout and language are drawn as for every mode (``training.conditioning``).

X-vectors are computed once per clip at the start of training by the Base model's frozen speaker encoder, into a
per-clip table (C, D) kept once on the host, in the dtype stock computes x-vectors in; ``collate`` gathers each
batch's rows (``xvector``), so the table is never copied to a device. A per-run cache, not a dataset column:
x-vectors belong to INIT_MODEL_PATH's speaker encoder, whereas a prepared dataset depends on the speech tokenizer
alone, so one prepared dataset serves any Base model. The reference codes and transcript ids are the dataset's
own (``audio_codes``, ``text``), exactly what ``create_voice_clone_prompt`` computes from the same audio.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from finetuning.constants import FRAME_RATE_HZ, SAMPLE_RATE
from finetuning.settings import Settings
from finetuning.training.conditioning import Conditioning, TrainingExamples
from finetuning.training.data import DataError, Example, load_split
from finetuning.training.layout import ROLE_TOKENS, SUFFIX_TOKENS
from finetuning.training.speakers import clip_xvectors

logger = logging.getLogger(__name__)

VALIDATION_STREAM = 1  # seeds validation draws apart from the training draws (which are seeded by epoch)


@dataclass
class ReferencePool:
    """The training clips of a run as references; clip c is training example c.

    speakers  list[int]               speaker index of each clip
    xvectors  (C, D)                  each clip's x-vector from the frozen speaker encoder, in the dtype stock
                                      computes it at inference; kept once, on the host (``collate`` gathers rows)
    by_speaker dict[int, list[int]]   the clips of each speaker
    max_icl_frames int                longest clip drawn as an ICL reference (CLONE_REF_MAX_S); 0 = no cap
    """

    examples: list[Example]
    xvectors: torch.Tensor
    by_speaker: dict[int, list[int]]
    max_icl_frames: int = 0

    def __post_init__(self):
        # Preparation keeps a repeated recording under a suffixed id: the same audio is the same codes, so the
        # content, not the row, tells whether a clip could be its own reference.
        self.contents = [content_key(e.codes) for e in self.examples]
        self.same_audio: dict[bytes, frozenset[int]] = {}
        for clip, key in enumerate(self.contents):
            self.same_audio[key] = self.same_audio.get(key, frozenset()) | {clip}
        self.icl_by_speaker = {s: [c for c in clips if self.icl_allowed(c)] for s, clips in self.by_speaker.items()}
        self._sets = {id(clips): set(clips) for clips in [*self.by_speaker.values(), *self.icl_by_speaker.values()]}
        self._longest: dict[int, int] = {}

    def reference_size(self, clip: int) -> int:
        """Talker positions clip ``clip`` adds as an ICL reference: its transcript's content ids and its frames."""
        example = self.examples[clip]
        return example.text_ids.numel() - ROLE_TOKENS - SUFFIX_TOKENS + example.codes.shape[0]

    def icl_allowed(self, clip: int) -> bool:
        return not self.max_icl_frames or self.examples[clip].codes.shape[0] <= self.max_icl_frames

    def with_reference(self, example: Example, rng: np.random.Generator, icl_fraction: float) -> Example:
        """``example`` conditioned on another recording of its speaker (never a clip with its own audio): that
        clip's x-vector always, its transcript content ids and codes too when the draw says ICL. An ICL draw picks
        among the clips no longer than CLONE_REF_MAX_S (a transcript cannot be cropped with its audio); with none,
        the sample is x-vector only. Raises DataError when the speaker has no other recording."""
        own = self.same_audio.get(content_key(example.codes), frozenset())
        icl = rng.random() < icl_fraction
        clips = self.by_speaker[example.speaker]
        if icl and self._others(self.icl_by_speaker[example.speaker], own):
            clips = self.icl_by_speaker[example.speaker]
        else:
            icl = False
        if not self._others(clips, own):
            raise DataError(f"clip {example.id} has no other recording of its speaker to condition on")
        clip = clips[int(rng.integers(len(clips)))]
        while clip in own:  # rejection keeps each draw a pure function of the generator's state
            clip = clips[int(rng.integers(len(clips)))]
        example = dataclasses.replace(example, xvector_row=clip, xvector=self.xvectors[clip])
        if not icl:
            return example
        reference = self.examples[clip]
        content = reference.text_ids[ROLE_TOKENS:-SUFFIX_TOKENS]
        return dataclasses.replace(example, ref_text_ids=content, ref_codes=reference.codes)

    def _others(self, clips: list[int], own: frozenset[int]) -> int:
        """How many of ``clips`` (one of the pool's lists) hold other audio than the clips ``own``."""
        members = self._sets[id(clips)]
        return len(members) - sum(c in members for c in own)

    def longest_reference(self, speaker: int) -> int:
        """Positions the longest ICL reference of ``speaker`` adds (0 with none)."""
        if speaker not in self._longest:
            self._longest[speaker] = max((self.reference_size(c) for c in self.icl_by_speaker[speaker]), default=0)
        return self._longest[speaker]


def content_key(codes: torch.Tensor) -> bytes:
    """A digest of a clip's codes (T, 16): equal for the same audio prepared twice."""
    return hashlib.blake2b(codes.numpy().tobytes(), digest_size=16).digest()


def build_reference_pool(model, settings: Settings, examples: list[Example], dtype: torch.dtype | None = None):
    """X-vectors of every training clip (``examples``, in order), one speaker-encoder pass each, in ``dtype`` (the
    dtype stock computes them in at inference), from at most the first CLONE_REF_MAX_S seconds of each clip (as a
    user trims a reference).

    Raises DataError for a speaker with fewer than two training clips of different audio (a sample's reference
    must be another recording of its speaker) or a training row whose audio cannot be found again.
    """
    by_speaker: dict[int, list[int]] = {}
    for clip, example in enumerate(examples):
        by_speaker.setdefault(example.speaker, []).append(clip)
    max_samples = round(settings.CLONE_REF_MAX_S * SAMPLE_RATE)
    vectors: list[torch.Tensor | None] = [None] * len(examples)
    for index, speaker in enumerate(settings.TRAIN_SPEAKERS):
        clips = by_speaker.get(index, [])
        if len({content_key(examples[c].codes) for c in clips}) < 2:
            raise DataError(
                f"speaker {speaker} has {len(clips)} training clip(s) but fewer than 2 different recordings; "
                "TRAINING_MODE=voice_clone conditions each clip on another recording of the same speaker: give it "
                "at least 2, or remove it from TRAIN_SPEAKERS"
            )
        wanted = {examples[c].id: c for c in clips}
        for row in load_split(settings, speaker, "train", ["id", "audio"]):
            if row["id"] in wanted:
                audio = np.asarray(row["audio"]["array"], dtype=np.float32)[:max_samples]
                vectors[wanted.pop(row["id"])] = clip_xvectors(model, [audio], dtype)[0]
        if wanted:
            raise DataError(f"speaker {speaker}: no audio for training rows {sorted(wanted)[:5]}; re-run preparation")
    logger.info("x-vectors of %d training clips computed for voice-clone references", len(examples))
    max_icl_frames = math.floor(settings.CLONE_REF_MAX_S * FRAME_RATE_HZ)
    return ReferencePool(examples, torch.stack(vectors), by_speaker, max_icl_frames)


class CloneExamples(TrainingExamples):
    """The training examples, each with its conditioning draws and its reference of the epoch: item
    ``(epoch, i)`` (see ``EpochIndices``). A reference never holds the sample's own audio."""

    def __init__(
        self,
        pool: ReferencePool,
        seed: int,
        icl_fraction: float,
        conditioning: Conditioning | None = None,
        talker_config=None,
    ):
        super().__init__(pool.examples, conditioning, talker_config)
        self.pool, self.seed, self.icl_fraction = pool, seed, icl_fraction

    def __getitem__(self, key: tuple[int, int]) -> Example:
        epoch, index = key
        example = super().__getitem__(key)
        return self.pool.with_reference(example, np.random.default_rng([self.seed, epoch, index]), self.icl_fraction)

    def validation(self, examples: list[Example]) -> list[Example]:
        """Validation examples with one fixed reference each, among their speaker's training clips (none of them
        the validation clip's own audio)."""
        return [
            self.pool.with_reference(e, np.random.default_rng([self.seed, VALIDATION_STREAM, i]), self.icl_fraction)
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
