"""Instructions and voice design: overfit -> export -> stock greedy generation gives each instruction's recording.

Custom voice with instructions: one speaker says one sentence three times (three different recordings), under
instruction A, under instruction B and without one. The text and the speaker are the same in all three, so only
the instruction segment (stock's ``instruct_ids``, before the role tokens) can tell the model which recording to
produce: ``generate_custom_voice(instruct=A)``, ``(instruct=B)`` and no instruction must each give back their own.

Voice design: one sentence under two voice descriptions (two voices' recordings);
``generate_voice_design(instruct=desc)`` of the ``voice_design`` export (no speaker slot, no speaker encoder) must
give back each description's recording.

Both are checked as stock is called by default (language left out, ``non_streaming_mode=True``): codebook 0 exact
incl. EOS, >= 95 % of all tokens, teacher-forced margins >= 1 logit.
"""

import json

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import VOICES_DIR, make_settings
from test_train import MIN_TEACHER_FORCED_MARGIN, MIN_TOKEN_MATCH, _compare, greedy_margins, recorded_frame_codes

from finetuning.training.export import INFO_FILE

pytestmark = pytest.mark.slow  # each fixture trains a tiny model until it memorises its data

SPEAKER = "english_speaker"
TEXT = "Good morning, how are you?"
ANGRY, WHISPER = "Speak in an angry tone.", "Whisper softly."
DESCRIPTIONS = ("A deep, slow male voice.", "A bright, fast female voice.")
STEPS = 500


def _voices(root, instructs, voices):
    """A voices folder with one config, SPEAKER: TEXT recorded len(instructs) times (clip i of bundled voice
    ``voices[i]``, leading digital silence cut, see ``test_train._overfit_voices``), each row with its instruction
    ("" = none)."""
    import shutil

    out = root / SPEAKER
    out.mkdir(parents=True)
    lines = []
    for index, (instruct, voice) in enumerate(zip(instructs, voices, strict=True)):
        row = json.loads((VOICES_DIR / voice / "metadata.jsonl").read_text().splitlines()[index])
        audio, sample_rate = sf.read(VOICES_DIR / voice / row["audio"], dtype="float32")
        path = out / f"{len(lines)}.wav"
        sf.write(path, audio[np.flatnonzero(audio)[0] :], sample_rate)
        lines.append({"audio": str(path), "text": TEXT, "language": "english", "instruct": instruct})
    (out / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    shutil.copy(VOICES_DIR / f"{SPEAKER}.wav", root / f"{SPEAKER}.wav")
    return root


def _train(tmp_path_factory, model_dir, name, instructs, voices, **extra):
    from finetuning.preparation.prepare import prepare_dataset
    from finetuning.training.loop import train

    tmp_path = tmp_path_factory.mktemp(name)
    settings = make_settings(
        tmp_path,
        model_dir,
        VOICES_DIR=_voices(tmp_path / "voices", instructs, voices),
        TRAIN_SPEAKERS=SPEAKER,
        VALIDATION_FRACTION=0.0,
        BATCH_SIZE=len(instructs),
        MAX_BATCH_TOKENS=0,
        LEARNING_RATE=6e-3,
        LR_SCHEDULE="cosine",
        WARMUP_STEPS=0,
        WEIGHT_DECAY=0.0,
        SUB_TALKER_LOSS_WEIGHT=1.0,
        MAX_STEPS=STEPS,
        LOGGING_STEPS=50,
        TRAINING_LAYOUT="non_streaming",  # both stock calls' default
        LANGUAGE_AUTO_FRACTION=1.0,  # language left out, as both are called by default
        **extra,
    )
    prepare_dataset(settings, report=lambda _: None)
    return settings, train(settings)


def _rows(settings):
    from finetuning.training.data import load_split

    columns = ["text", "audio_codes", "instruct"]
    return [
        {**row, "audio_codes": torch.tensor(np.asarray(row["audio_codes"]), dtype=torch.long)}
        for row in load_split(settings, SPEAKER, "train", columns)
    ]


def _margins(model, tokenizer, row, speaker_embed):
    """Teacher-forced greedy margins (``test_train.greedy_margins``) with the row's instruction."""
    from finetuning.training.layout import instruct_text
    from finetuning.training.step import assistant_text, build_talker_inputs, talker_forward

    codes = row["audio_codes"]
    text_ids = tokenizer(assistant_text(row["text"]), return_tensors="pt")["input_ids"][0]
    instruct = (
        tokenizer(instruct_text(row["instruct"]), return_tensors="pt")["input_ids"][0] if row["instruct"] else None
    )
    with torch.no_grad():
        inputs = build_talker_inputs(model, [text_ids], [codes], speaker_embed, [None], instruct_ids=[instruct])
        out = talker_forward(model, inputs)
    codec0, sub_talker = greedy_margins(model.config.talker_config, out, codes)
    return min(float(codec0.min()), float(sub_talker.min()))


def _check(wrapper, rows, generate, speaker_embed, margin_log, case):
    """Each row's recording back from ``generate(instruct, max_new_tokens)``; all outputs differ."""
    outputs, margins = [], []
    for row in rows:
        trained = row["audio_codes"]
        with recorded_frame_codes(wrapper) as seen:
            generate(row["instruct"] or None, trained.shape[0] + 10)
        generated = seen[0].cpu()
        first_equal, share = _compare(generated, trained)
        margins.append(_margins(wrapper.model, wrapper.processor.tokenizer, row, speaker_embed))
        assert first_equal and share >= MIN_TOKEN_MATCH, (row["instruct"], share)
        outputs.append(generated)
    margin_log[case] = {"min_margin": min(margins)}
    assert min(margins) >= MIN_TEACHER_FORCED_MARGIN, margins
    for i in range(len(outputs)):  # each instruction gave its own recording
        for j in range(i):
            assert not _compare(outputs[i], outputs[j])[0]


@pytest.fixture(scope="module")
def instruct_run(tiny_model_dirs, tmp_path_factory):
    return _train(tmp_path_factory, tiny_model_dirs["equal"], "instruct", (ANGRY, WHISPER, ""), [SPEAKER] * 3)


def test_custom_voice_follows_each_instruction(instruct_run, margin_log):
    import qwen_tts

    settings, result = instruct_run
    info = json.loads((result.export_dir / INFO_FILE).read_text())
    assert info["trained_calls"]["instruct"] == [False, True]  # some clips with, one without
    wrapper = qwen_tts.Qwen3TTSModel.from_pretrained(str(result.export_dir))
    assert wrapper.model.tts_model_type == "custom_voice"
    rows = _rows(settings)
    assert sorted(r["instruct"] for r in rows) == sorted([ANGRY, WHISPER, ""])

    def generate(instruct, max_new_tokens):
        wrapper.generate_custom_voice(
            text=TEXT, speaker=SPEAKER, instruct=instruct, do_sample=False, subtalker_dosample=False,
            max_new_tokens=max_new_tokens,
        )  # fmt: skip

    tcfg = wrapper.model.config.talker_config
    speaker_embed = wrapper.model.talker.get_input_embeddings().weight[tcfg.spk_id[SPEAKER]][None]
    _check(wrapper, rows, generate, speaker_embed, margin_log, "instruct-custom_voice")


def test_instructions_for_a_model_whose_stock_call_drops_them_are_refused(instruct_run, tiny_model_dirs, tmp_path):
    """The 0.6B-like tiny model (tts_model_size "0b6"): generate_custom_voice would drop instruct=, so training on
    instruction data stops before the model loads, with one line naming the size."""
    import dataclasses

    from finetuning.training.loop import TrainingError, train

    settings, _ = instruct_run
    small = dataclasses.replace(settings, INIT_MODEL_PATH=str(tiny_model_dirs["wide_text"]), OUTPUT_DIR=str(tmp_path))
    with pytest.raises(TrainingError, match="drops instruct= .*'0b6'") as error:
        train(small)
    assert "\n" not in str(error.value)


@pytest.fixture(scope="module")
def design_run(tiny_model_dirs, tmp_path_factory):
    # Two voices (the bundled English and Swahili speakers' first clips) under their descriptions. Two clips of one
    # voice open with the same three frames of codebook 0 and differ first in the later codebooks, where the
    # description alone had to move the talker's hidden state (0.008 apart after 500 steps: margins +-1e-4).
    voices = [SPEAKER, "swahili_speaker"]
    return _train(
        tmp_path_factory, tiny_model_dirs["equal"], "design", DESCRIPTIONS, voices, TRAINING_MODE="voice_design"
    )


def test_voice_design_follows_each_description(design_run, margin_log, tmp_path):
    import qwen_tts

    settings, result = design_run
    info = json.loads((result.export_dir / INFO_FILE).read_text())
    assert info["trained_calls"]["method"] == "generate_voice_design"
    assert info["trained_calls"]["instruct"] == [True]
    config = json.loads((result.export_dir / "config.json").read_text())
    assert config["tts_model_type"] == "voice_design"
    assert config["talker_config"]["spk_id"] == {} and config["talker_config"]["spk_is_dialect"] == {}
    from safetensors import safe_open

    with safe_open(str(result.export_dir / "model.safetensors"), "pt") as weights:
        assert not any(k.startswith("speaker_encoder.") for k in weights.keys())
    wrapper = qwen_tts.Qwen3TTSModel.from_pretrained(str(result.export_dir))
    assert wrapper.model.speaker_encoder is None

    def generate(instruct, max_new_tokens):
        wrapper.generate_voice_design(
            text=TEXT, instruct=instruct, do_sample=False, subtalker_dosample=False, max_new_tokens=max_new_tokens
        )

    _check(wrapper, _rows(settings), generate, None, margin_log, "instruct-voice_design")
    frames = {row["instruct"]: row["audio_codes"].shape[0] for row in _rows(settings)}
    description = DESCRIPTIONS[1]
    assert _generated_frames(result.export_dir, tmp_path, "--instruct", description) == frames[description]


def _generated_frames(checkpoint, tmp_path, *args):
    """Frames of the wav ``generate.py`` writes (in-process, greedy): the decoder gives 1920 samples per frame."""
    from finetuning.generate import main

    out = tmp_path / "out.wav"
    assert main(["--checkpoint", str(checkpoint), "--text", TEXT, "--greedy", "--output", str(out), *args]) == 0
    samples = sf.info(out).frames
    assert samples % 1920 == 0
    return samples // 1920


def test_generate_speaks_each_instruction_and_refuses_one_the_export_never_saw(instruct_run, tmp_path, capsys):
    from finetuning.evaluation.speech import check_instruct

    settings, result = instruct_run
    frames = {row["instruct"]: row["audio_codes"].shape[0] for row in _rows(settings)}
    assert len(set(frames.values())) == 3  # the three recordings differ in length: the wav tells them apart
    assert _generated_frames(result.export_dir, tmp_path, "--speaker", SPEAKER, "--instruct", ANGRY) == frames[ANGRY]
    assert _generated_frames(result.export_dir, tmp_path, "--speaker", SPEAKER) == frames[""]
    with pytest.raises(ValueError, match="trained without instructions"):
        check_instruct({"trained_calls": {"instruct": [False]}}, ANGRY)
    check_instruct({}, ANGRY)  # a checkpoint not made here: stock decides
    from finetuning.generate import main

    assert main(["--checkpoint", str(result.export_dir), "--text", TEXT, "--instruct", ANGRY]) == 2
    assert "voice-design" in capsys.readouterr().err  # no --speaker: only a voice-design checkpoint takes that
