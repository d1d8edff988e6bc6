"""Fine-tuning from a CustomVoice checkpoint: its preset speakers are kept, and replay keeps them speaking as before.

The CustomVoice init is a real ``custom_voice`` checkpoint (no speaker encoder, ``spk_id`` map): a tiny Base model
fine-tuned through the real loop until its one preset speaker (``english_speaker``) says three sentences, exported.
A new speaker (``swahili_speaker``, its own recordings under the same three transcripts, so the text alone cannot
tell the voices apart) is then fine-tuned from it, its x-vector from the Base model's speaker encoder
(SPEAKER_ENCODER_PATH), once with REPLAY_FRACTION and once without. Stock ``generate_custom_voice`` greedy output of
the preset for the three sentences (the probe texts) is compared before and after: identical with replay, changed
without it. The new speaker's recordings come back out of the replay run's export (codebook 0 exact incl. EOS,
>= 95 % of the tokens, teacher-forced margins >= 1 logit).
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import VOICES_DIR, discriminative_copy, make_settings
from test_train import MIN_TEACHER_FORCED_MARGIN, MIN_TOKEN_MATCH, XVECTOR_SCALE, _compare, _stock_codes
from test_train import teacher_forced_margins as margins_of

from finetuning.training.export import INFO_FILE

pytestmark = pytest.mark.slow  # three tiny runs trained until they memorise their data

PRESET, NEW = "english_speaker", "swahili_speaker"
PROBE_TEXTS = 3  # the preset's first three sentences: its training texts, the new speaker's transcripts, the probes
INIT_STEPS = 300
FINETUNE_STEPS = 300
REPLAY_FRACTION = 0.5


def _voices(root: Path) -> Path:
    """Each speaker's first PROBE_TEXTS clips without their leading digital silence (``test_train._overfit_voices``
    says why), all under the preset's transcripts."""
    texts = [json.loads(line) for line in (VOICES_DIR / PRESET / "metadata.jsonl").read_text().splitlines()]
    for speaker in (PRESET, NEW):
        rows = [json.loads(line) for line in (VOICES_DIR / speaker / "metadata.jsonl").read_text().splitlines()]
        lines = []
        for row, text in zip(rows[:PROBE_TEXTS], texts, strict=False):
            audio, sample_rate = sf.read(VOICES_DIR / speaker / row["audio"], dtype="float32")
            path = root / speaker / Path(row["audio"]).with_suffix(".wav").name
            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(path, audio[np.flatnonzero(audio)[0] :], sample_rate)
            lines.append({**row, "audio": str(path), "text": text["text"]})
        (root / speaker / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
        shutil.copy(VOICES_DIR / f"{speaker}.wav", root / f"{speaker}.wav")
    return root


def _settings(root: Path, model_dir: Path, name: str, speaker: str, steps: int, **extra):
    values = dict(
        VOICES_DIR=root / "voices",
        DATASET_DIR=root / "dataset",
        OUTPUT_DIR=root / name,
        TRAIN_SPEAKERS=speaker,
        VALIDATION_FRACTION=0.0,
        BATCH_SIZE=PROBE_TEXTS,
        MAX_BATCH_TOKENS=0,
        GRADIENT_ACCUMULATION_STEPS=1,
        LEARNING_RATE=6e-3,
        LR_SCHEDULE="cosine",
        WARMUP_STEPS=0,
        WEIGHT_DECAY=0.0,
        SUB_TALKER_LOSS_WEIGHT=1.0,
        MAX_STEPS=steps,
        LOGGING_STEPS=50,
        TRAINING_LAYOUT="non_streaming",  # generate_custom_voice's default call: non-streaming text ...
        LANGUAGE_AUTO_FRACTION=1.0,  # ... and no language ("Auto")
    )
    return make_settings(root, model_dir, **{**values, **extra})


def _preset_codes(export_dir: Path, texts: list[str], max_frames: int) -> list[torch.Tensor]:
    import qwen_tts

    model = qwen_tts.Qwen3TTSModel.from_pretrained(str(export_dir), dtype=torch.float32)
    return [_stock_codes(model, PRESET, text, max_frames, None, True) for text in texts]


@pytest.fixture(scope="module")
def runs(tiny_model_dirs, tmp_path_factory):
    """{"base", "init", "replay", "no_replay"}: (settings, result) of the init run and the two fine-tunes from it,
    plus the preset's probe texts."""
    from finetuning.preparation.prepare import prepare_dataset
    from finetuning.training.loop import train

    root = tmp_path_factory.mktemp("custom_voice_init")
    voices = _voices(root / "voices")
    base = discriminative_copy(tiny_model_dirs["equal"], sorted(voices.glob("*/*.wav")), root / "base", XVECTOR_SCALE)
    prepare_dataset(_settings(root, base, "prepare", f"{PRESET},{NEW}", 1), report=lambda _: None)
    init = _settings(root, base, "init", PRESET, INIT_STEPS)
    init_result = train(init)
    cv = init_result.export_dir
    common = dict(SPEAKER_ENCODER_PATH=base, REPLAY_SAMPLES=PROBE_TEXTS)
    replay = _settings(root, cv, "replay", NEW, FINETUNE_STEPS, REPLAY_FRACTION=REPLAY_FRACTION, **common)
    no_replay = _settings(root, cv, "no_replay", NEW, FINETUNE_STEPS, **common)
    texts = [json.loads(line)["text"] for line in (voices / PRESET / "metadata.jsonl").read_text().splitlines()]
    return {
        "base": base,
        "init": (init, init_result),
        "replay": (replay, train(replay)),
        "no_replay": (no_replay, train(no_replay)),
        "texts": texts,
    }


def test_export_keeps_the_presets_beside_the_new_speaker(runs):
    import qwen_tts
    from safetensors import safe_open

    init_export, export = runs["init"][1].export_dir, runs["replay"][1].export_dir
    model = qwen_tts.Qwen3TTSModel.from_pretrained(str(export), dtype=torch.float32)
    assert sorted(model.get_supported_speakers()) == sorted([PRESET, NEW])
    assert model.model.tts_model_type == "custom_voice" and model.model.speaker_encoder is None
    rows = json.loads((export / "config.json").read_text())["talker_config"]["spk_id"]
    init_rows = json.loads((init_export / "config.json").read_text())["talker_config"]["spk_id"]
    assert rows == {**init_rows, NEW: max(init_rows.values()) + 1}  # the preset keeps its row, the new one is free
    info = json.loads((export / INFO_FILE).read_text())
    assert info["preset_speakers"] == {PRESET: {"row": init_rows[PRESET]}} and set(info["speakers"]) == {NEW}
    key = "talker.model.codec_embedding.weight"
    with (
        safe_open(str(export / "model.safetensors"), "pt") as f,
        safe_open(str(init_export / "model.safetensors"), "pt") as g,
    ):
        table, init_table = f.get_tensor(key), g.get_tensor(key)
    assert torch.equal(table[rows[PRESET]], init_table[rows[PRESET]])  # the preset's embedding, unchanged
    assert not torch.allclose(table[rows[NEW]], table[rows[PRESET]])
    assert len(list((Path(runs["replay"][0].OUTPUT_DIR) / "replay").glob("*.pt"))) == 1  # the cached replay rows


def test_replay_keeps_the_preset_speaking_as_before(runs, margin_log):
    import qwen_tts

    texts = runs["texts"]
    cap = 60
    before = _preset_codes(runs["init"][1].export_dir, texts, cap)
    assert all(codes.shape[0] < cap for codes in before)  # each ends with EOS: a whole utterance to keep
    export = runs["replay"][1].export_dir
    with_replay = _preset_codes(export, texts, cap)
    model = qwen_tts.Qwen3TTSModel.from_pretrained(str(export), dtype=torch.float32)
    smallest = {"codec0": float("inf"), "sub_talker": float("inf")}
    for text, old in zip(texts, before, strict=True):
        row = {"speaker": PRESET, "text": text, "audio_codes": old}
        codec0, sub_talker = margins_of(model.model, model.processor.tokenizer, row, "non_streaming", None)
        smallest = {
            "codec0": min(smallest["codec0"], float(codec0.min())),
            "sub_talker": min(smallest["sub_talker"], float(sub_talker.min())),
        }
    margin_log["custom_voice_init-replay-preset"] = smallest
    assert min(smallest.values()) >= MIN_TEACHER_FORCED_MARGIN, smallest  # exact on every CPU, not by a hair
    for text, old, new in zip(texts, before, with_replay, strict=True):
        assert torch.equal(old, new), (text, smallest)
    # Without replay the same fine-tune changes what the preset says: the check can fail.
    without = _preset_codes(runs["no_replay"][1].export_dir, texts, cap)
    assert not all(old.shape == new.shape and torch.equal(old, new) for old, new in zip(before, without, strict=True))


def test_new_speaker_is_reproduced_beside_the_presets(runs, margin_log):
    import qwen_tts

    from finetuning.training.data import load_split

    settings, result = runs["replay"]
    model = qwen_tts.Qwen3TTSModel.from_pretrained(str(result.export_dir), dtype=torch.float32)
    smallest = {"codec0": float("inf"), "sub_talker": float("inf")}
    for row in load_split(settings, NEW, "train", ["speaker", "text", "language", "audio_codes"]):
        trained = torch.tensor(np.asarray(row["audio_codes"]), dtype=torch.long)
        generated = _stock_codes(model, NEW, row["text"], trained.shape[0] + 10, None, True)
        first_equal, share = _compare(generated, trained)
        assert first_equal and share >= MIN_TOKEN_MATCH, (row["text"], share)
        codec0, sub_talker = margins_of(
            model.model, model.processor.tokenizer, {**row, "audio_codes": trained}, "non_streaming", None
        )
        smallest = {
            "codec0": min(smallest["codec0"], float(codec0.min())),
            "sub_talker": min(smallest["sub_talker"], float(sub_talker.min())),
        }
    margin_log["custom_voice_init-replay"] = smallest
    assert min(smallest.values()) >= MIN_TEACHER_FORCED_MARGIN, smallest


def test_replay_rows_are_the_init_models_greedy_speech_read_back_from_the_cache(runs):
    import qwen_tts

    from finetuning.training.data import load_training_examples
    from finetuning.training.presets import PresetSpeakers
    from finetuning.training.replay import load_or_generate

    settings = runs["replay"][0]
    init = qwen_tts.Qwen3TTSModel.from_pretrained(settings.INIT_MODEL_PATH, dtype=torch.float32)
    tokenizer = init.processor.tokenizer
    examples, _ = load_training_examples(settings, tokenizer)
    presets = PresetSpeakers.from_model(init.model)
    # No model to generate with: the rows can only come from the run's cache, keyed by the same weights and texts.
    rows = load_or_generate(settings, Path(settings.INIT_MODEL_PATH), None, presets, examples, tokenizer)
    assert [(row.speaker, row.text, row.layout, row.instruct) for row in rows] == [
        (PRESET, text, "non_streaming", "") for text in runs["texts"]
    ]
    before = _preset_codes(runs["init"][1].export_dir, runs["texts"], 60)
    for row, codes in zip(rows, before, strict=True):  # what stock generate_custom_voice said, frame for frame
        assert torch.equal(row.codes.long(), codes.long()), row.text
