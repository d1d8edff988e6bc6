"""Replay against forgetting (REPLAY_FRACTION, REPLAY_SAMPLES): the init model's own speech mixed into training.

Fine-tuning a CustomVoice checkpoint on new speakers moves weights its preset speakers share, so their voices drift.
Before training, the init model says REPLAY_SAMPLES texts (the first distinct texts of the training split) as each
preset speaker, the way stock ``generate_custom_voice`` says them by default: language "Auto", greedy codebook 0
and sub-talker, stock's repetition penalty, in every text layout the run trains (``Conditioning.trained_calls``).
Each (speaker, text, layout) that ends with EOS within the frame cap becomes a replay row. During training, each
sample is replaced with probability REPLAY_FRACTION by a replay row, both drawn from
``numpy.random.default_rng([SEED, REPLAY_STREAM, epoch, i])`` (the same in every worker, on every process and after
a resume), and trained in the conditioning it was generated with. So the presets keep answering as they did.

The rows are cached in ``OUTPUT_DIR/replay/<key>.pt`` (written atomically), keyed by the init weights' hash, the
speakers, texts, layouts, cap and seed: a rerun or a resume generates nothing. A row carries an ``instruct``
(empty = none), the instruction it was generated with, for runs that train instructions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from finetuning import atomic
from finetuning.settings import Settings
from finetuning.training.conditioning import Conditioning, TrainingExamples
from finetuning.training.data import Example
from finetuning.training.layout import ROLE_TOKENS, SUFFIX_TOKENS
from finetuning.training.presets import PresetSpeakers
from finetuning.training.step import AUTO_LANGUAGE, assistant_text

logger = logging.getLogger(__name__)

REPLAY_STREAM = 11  # keeps the replay draws apart from the conditioning and reference draws of the same epoch
CAP_FACTOR = 2  # frame cap of one replay utterance: this many times the longest training utterance, plus
CAP_EXTRA_FRAMES = 25  # two seconds, so a short text's slower preset still ends
HASH_CHUNK_BYTES = 1 << 24


class ReplayError(RuntimeError):
    """Replay rows cannot be made; the message says why and what to change."""


@dataclass(frozen=True)
class ReplayRow:
    """One greedy utterance of the init model: preset ``speaker`` (name), ``text``, ``layout`` it was generated in,
    ``instruct`` ("" = none) and its frame ``codes`` (T, 16) int16, without EOS."""

    speaker: str
    text: str
    layout: str
    codes: torch.Tensor
    instruct: str = ""


def weights_hash(model_dir: str | Path) -> str:
    """sha256 over the model folder's weight files (names and bytes), what a replay cache is keyed by."""
    digest = hashlib.sha256()
    for path in sorted(Path(model_dir).glob("*.safetensors")) + sorted(Path(model_dir).glob("*.bin")):
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            while chunk := handle.read(HASH_CHUNK_BYTES):
                digest.update(chunk)
    return digest.hexdigest()


def replay_texts(examples: list[Example], tokenizer, count: int) -> list[str]:
    """The first ``count`` distinct training texts, decoded from the examples' prompt ids."""
    texts: list[str] = []
    for example in examples:
        text = tokenizer.decode(example.text_ids[ROLE_TOKENS:-SUFFIX_TOKENS])  # assistant_text's content
        if text not in texts:
            texts.append(text)
        if len(texts) == count:
            break
    return texts


def frame_cap(examples: list[Example]) -> int:
    return CAP_FACTOR * max(e.codes.shape[0] for e in examples) + CAP_EXTRA_FRAMES


def generate_rows(stock, speakers: list[str], texts: list[str], layouts: list[str], cap: int) -> list[ReplayRow]:
    """Greedy stock generation of every (speaker, text, layout) by ``stock`` (a ``qwen_tts.Qwen3TTSModel`` around
    the init model): ``generate_custom_voice``'s own input building and ``model.generate`` call, without decoding
    audio. Utterances that reach ``cap`` frames without EOS are left out (logged)."""
    rows, unfinished = [], []
    kwargs = stock._merge_generate_kwargs(do_sample=False, subtalker_dosample=False, max_new_tokens=cap)
    with torch.no_grad():
        for speaker in speakers:
            for text in texts:
                input_ids = stock._tokenize_texts([assistant_text(text)])
                for layout in layouts:
                    codes, _ = stock.model.generate(
                        input_ids=input_ids,
                        instruct_ids=[None],
                        languages=["Auto"],
                        speakers=[speaker],
                        non_streaming_mode=layout == "non_streaming",
                        **kwargs,
                    )
                    frames = codes[0].to("cpu", torch.int16)  # (T, 16)
                    if frames.shape[0] >= cap or frames.shape[0] == 0:
                        unfinished.append((speaker, text, layout))
                        continue
                    rows.append(ReplayRow(speaker, text, layout, frames))
    if unfinished:
        logger.warning(
            "replay: %d utterances did not end within %d frames, left out: %s", len(unfinished), cap, unfinished
        )
    return rows


def load_or_generate(
    settings: Settings, model_dir: Path, stock, presets: PresetSpeakers, examples, tokenizer, write: bool = True
) -> list[ReplayRow]:
    """The run's replay rows: from the cache when it holds this key, else generated, and cached when ``write`` (the
    main process; every process generates the same greedy rows). Raises ReplayError when no utterance ends."""
    texts = replay_texts(examples, tokenizer, settings.REPLAY_SAMPLES)
    modes = Conditioning.from_settings(settings).trained_calls()["non_streaming_mode"]
    layouts = ["non_streaming" if mode else "streaming" for mode in modes]
    cap = frame_cap(examples)
    key_fields = {
        "weights": weights_hash(model_dir),
        "speakers": presets.names,
        "texts": texts,
        "layouts": layouts,
        "cap": cap,
        "seed": settings.SEED,
    }
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(settings.OUTPUT_DIR) / "replay" / f"{key}.pt"
    if path.exists():
        stored = torch.load(path, weights_only=True)
        return [ReplayRow(**row) for row in stored["rows"]]
    torch.manual_seed(settings.SEED)
    rows = generate_rows(stock, presets.names, texts, layouts, cap)
    if not rows:
        raise ReplayError(
            f"REPLAY_FRACTION={settings.REPLAY_FRACTION}: the init model ended none of its {len(texts) * len(layouts)}"
            f" utterances per preset within {cap} frames; set REPLAY_FRACTION=0"
        )
    if not write:
        return rows
    buffer = io.BytesIO()
    torch.save({"key": key_fields, "rows": [dataclasses.asdict(row) for row in rows]}, buffer)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(path, buffer.getvalue())
    logger.info("replay: %d rows of %d preset speakers cached in %s", len(rows), len(presets.names), path)
    return rows


def replay_examples(rows: list[ReplayRow], presets: PresetSpeakers, num_speakers: int, tokenizer) -> list[Example]:
    """Replay rows as examples: preset p is speaker ``num_speakers + p`` of the conditioning table, language
    "auto", layout as generated (never redrawn)."""
    index = {name: num_speakers + p for p, name in enumerate(presets.names)}
    return [
        Example(
            id=f"replay/{row.speaker}/{i}",
            speaker=index[row.speaker],
            language=AUTO_LANGUAGE,
            text_ids=tokenizer(assistant_text(row.text), return_tensors="pt")["input_ids"][0],
            codes=row.codes,
            layout=row.layout,
        )
        for i, row in enumerate(rows)
    ]


def replay_source(settings: Settings, model_dir: Path, stock, presets: PresetSpeakers, tokenizer, write: bool):
    """None without replay (REPLAY_FRACTION 0); else ``make(train examples) -> replay examples`` for
    ``make_train_data``: the cached or generated rows (``load_or_generate``) as examples (``replay_examples``)."""
    if settings.REPLAY_FRACTION == 0:
        return None

    def make(examples: list[Example]) -> list[Example]:
        rows = load_or_generate(settings, model_dir, stock, presets, examples, tokenizer, write)
        return replay_examples(rows, presets, len(settings.TRAIN_SPEAKERS), tokenizer)

    return make


class ReplayMixed(TrainingExamples):
    """``TrainingExamples`` whose item ``(epoch, i)`` is, with probability ``fraction``, a replay example instead
    (drawn as the module docstring says). Lengths, sampling and resume work as for the plain examples."""

    def __init__(self, examples, conditioning, talker_config, replay: list[Example], fraction: float, seed: int):
        super().__init__(examples, conditioning, talker_config)
        self.replay, self.fraction, self.seed = replay, fraction, seed

    def __getitem__(self, key: tuple[int, int]) -> Example:
        epoch, index = key
        rng = np.random.default_rng([self.seed, REPLAY_STREAM, epoch + 1, index])
        if self.replay and rng.random() < self.fraction:
            return self.replay[int(rng.integers(len(self.replay)))]
        return super().__getitem__(key)
