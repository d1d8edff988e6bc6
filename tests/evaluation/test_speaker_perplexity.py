"""Held-out perplexity means something: scored with a speaker's own row it is lower than with the other's.

A tiny model is fine-tuned on both bundled voices, whose clips carry the same transcripts, so that only the
speaker row tells their codes apart. Its random speaker encoder is first made to tell voices apart
(``conftest.discriminative_copy``): random, it puts the two voices at cosine 0.99, and no row could matter.
Each voice's last clips are held out as a ``test`` split. The exported checkpoint is loaded through stock
``from_pretrained``; every held-out clip is then scored teacher-forced (``evaluation.targets.held_out_perplexity``)
once with its own speaker's row and once with the other speaker's.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import VOICES_DIR, discriminative_copy, make_settings

pytestmark = pytest.mark.slow  # trains a tiny model on both voices

SPEAKERS = ("english_speaker", "swahili_speaker")
TRAIN_CLIPS, TEST_CLIPS = 10, 4
TRAIN_STEPS = 120
# x-vectors about 1 long, 9x a codec embedding row (0.11 in the tiny model). As short as the random ones (0.2-0.3)
# the tiny talker leans on the codes so far instead, and the speaker row moves held-out perplexity by under 1 %.
SPEAKER_ENCODER_SCALE = 35.0
# Measured: the other row scores 12.4 % (English) and 9.7 % (Swahili) higher. A model that ignored its speaker row
# would give equal numbers; the floor leaves room for rounding differences between CPU kernel sets.
MIN_PERPLEXITY_RATIO = 1.03


def _shared_text_voices(root):
    """Both voices' first TRAIN_CLIPS + TEST_CLIPS clips, the i-th clip of each transcribed with the same text,
    without the espeak clips' leading digital silence (one identical frame in every utterance)."""
    first_voice = (VOICES_DIR / SPEAKERS[0] / "metadata.jsonl").read_text().splitlines()
    texts = [json.loads(line)["text"] for line in first_voice]
    for speaker in SPEAKERS:
        rows = [json.loads(line) for line in (VOICES_DIR / speaker / "metadata.jsonl").read_text().splitlines()]
        out = root / speaker
        out.mkdir(parents=True)
        lines = []
        for i, row in enumerate(rows[: TRAIN_CLIPS + TEST_CLIPS]):
            audio, sample_rate = sf.read(VOICES_DIR / speaker / row["audio"], dtype="float32")
            path = out / f"{i:03d}.wav"
            sf.write(path, audio[np.flatnonzero(audio)[0] :], sample_rate)
            split = "train" if i < TRAIN_CLIPS else "test"
            lines.append({"audio": str(path), "text": texts[i], "language": "english", "split": split})
        (out / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
        shutil.copy(VOICES_DIR / f"{speaker}.wav", root / f"{speaker}.wav")
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    from finetuning.preparation.prepare import prepare_dataset
    from finetuning.training.loop import train

    root = tmp_path_factory.mktemp("speaker_perplexity")
    voices = _shared_text_voices(root / "voices")
    clips = sorted(voices.glob("*/*.wav"))
    model_dir = discriminative_copy(tiny_model_dir, clips, root / "model", scale=SPEAKER_ENCODER_SCALE)
    settings = make_settings(
        root,
        model_dir,
        VOICES_DIR=voices,
        TRAIN_SPEAKERS=",".join(SPEAKERS),
        VALIDATION_FRACTION=0.0,
        BATCH_SIZE=len(SPEAKERS) * TRAIN_CLIPS,
        MAX_BATCH_TOKENS=0,
        GRADIENT_ACCUMULATION_STEPS=1,
        LEARNING_RATE=3e-3,
        LR_SCHEDULE="constant",
        WARMUP_STEPS=0,
        WEIGHT_DECAY=0.0,
        MAX_STEPS=TRAIN_STEPS,
        LOGGING_STEPS=60,
    )
    prepare_dataset(settings, report=lambda _: None)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(settings)
    finally:
        torch.set_num_threads(previous)
    return settings


def _held_out_perplexities(settings, model, tokenizer) -> dict[tuple[str, str], float]:
    """{(voice, row): codebook-0 perplexity over all of the voice's held-out tokens, scored with that row}."""
    from finetuning.evaluation.targets import held_out_perplexity
    from finetuning.training.data import load_split
    from finetuning.training.step import assistant_text

    tcfg = model.config.talker_config
    rows = {speaker: model.talker.get_input_embeddings().weight[tcfg.spk_id[speaker]].detach() for speaker in SPEAKERS}
    nats, tokens = {}, {}
    for voice in SPEAKERS:
        held_out = load_split(settings, voice, "test", ["text", "audio_codes"])
        assert len(held_out) == TEST_CLIPS
        for example in held_out:
            text_ids = tokenizer(assistant_text(example["text"]), return_tensors="pt")["input_ids"][0]
            codes = torch.tensor(np.asarray(example["audio_codes"]), dtype=torch.long)
            for row in SPEAKERS:
                values, counts = held_out_perplexity(model, text_ids, codes, rows[row], "english", "non_streaming")
                count = counts["perplexity_codec0"]
                nats[voice, row] = nats.get((voice, row), 0.0) + math.log(values["perplexity_codec0"]) * count
                tokens[voice, row] = tokens.get((voice, row), 0) + count
    return {key: math.exp(nats[key] / tokens[key]) for key in nats}


def test_held_out_perplexity_is_lower_with_the_speakers_own_row(trained):
    from qwen_tts import Qwen3TTSModel

    stock = Qwen3TTSModel.from_pretrained(str(trained.export_dir))
    perplexity = _held_out_perplexities(trained, stock.model, stock.processor)
    for voice, other in (SPEAKERS, SPEAKERS[::-1]):
        own_row, other_row = perplexity[voice, voice], perplexity[voice, other]
        assert other_row > own_row * MIN_PERPLEXITY_RATIO, (voice, own_row, other_row)
