"""Overfit -> export -> stock generate: the trained codes come back out of ``generate_custom_voice``.

A tiny model is trained through the real loop (``finetuning.training.loop.train``) on the two bundled speakers x two
utterances until it memorises them, exported as a custom-voice checkpoint, loaded with stock
``qwen_tts.Qwen3TTSModel.from_pretrained`` and decoded greedily. One sentence is said by both speakers (their
own recordings, one transcript), so the text alone cannot tell the model which codes to produce: only the
speaker row can. With the official recipe's double label shift the same training does not reproduce the data,
which shows the check can fail.
"""

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import VOICES_DIR, discriminative_copy, make_settings, shift_labels_once_more

from finetuning.training import step
from finetuning.training.export import INFO_FILE, SETTINGS_FILE

pytestmark = pytest.mark.slow  # every test trains a tiny model until it memorises its data

SPEAKERS = ("english_speaker", "swahili_speaker")
UTTERANCES_PER_SPEAKER = 2
# Each utterance is trained under every call the export claims (both text layouts, with and without its language:
# up to four conditionings), and the learning rate decays to 0 by the end. Measured with TRAINING_LAYOUT=mixed
# (AVX-512): 300 steps at a constant rate left a sub-talker margin of -0.9 logits; 450 cosine steps 3.1.
OVERFIT_STEPS = 450
# x-vectors about 1 long from a speaker encoder that tells the two voices apart (``conftest.discriminative_copy``):
# the shared sentence called without a language (the "Auto" prefix for both voices) is told apart by the speaker
# row alone. With the random encoder's rows (cosine 0.993 between the voices) that cell's margin was -1.7 logits.
XVECTOR_SCALE = 35.0
# Four conditionings of each utterance in one tiny model: at the other runs' 6e-3 the smallest sub-talker margin
# was 3.1 logits with AVX-512 and default kernels but 0.02 with AVX2 ones; at 1e-2 it was 5.3 / 3.0 / 3.6.
MIXED_LEARNING_RATE = 1e-2
MIN_TOKEN_MATCH = 0.95
# Greedy decoding reproduces the data only while every target beats its rivals. Float rounding differs between
# CPU kernel sets by ~1e-4 logits; the trained margins are ~4-8 logits, so the floor below makes a thinning margin
# fail here, on every CPU, long before greedy decoding would flip a token on some CPU only.
MIN_TEACHER_FORCED_MARGIN = 1.0
REPETITION_PENALTY = 1.05  # stock generate's default, applied to codebook-0 tokens generated so far
SECRET = "hf_secret_token_value_for_tests"
SHARED_TEXT = "Karibu, welcome home."


def _overfit_voices(root):
    """A voices folder: each bundled speaker with its first clip (own text) and second clip (SHARED_TEXT).

    The espeak clips open with 80 ms of digital silence: one frame of identical codes in every utterance, after
    which the shared sentence's next frame would have to be told apart by the speaker embedding alone, and the
    tiny random speaker encoder puts the two voices at cosine 0.993 (real x-vectors of two voices are far apart).
    The tiny code predictor then memorises that frame only to within ~0.05 logits, a coin toss that CPU kernels
    decide differently. Without the digital silence the test still needs the speaker row to pick each speaker's
    codes for the shared sentence, from the very first frame."""
    import shutil

    import soundfile as sf

    for speaker in SPEAKERS:
        rows = [json.loads(line) for line in (VOICES_DIR / speaker / "metadata.jsonl").read_text().splitlines()]
        own, shared = rows[0], rows[1]
        out = root / speaker
        out.mkdir(parents=True)
        clips = []
        for row in (own, shared):
            audio, sample_rate = sf.read(VOICES_DIR / speaker / row["audio"], dtype="float32")
            path = out / Path(row["audio"]).with_suffix(".wav").name
            sf.write(path, audio[np.flatnonzero(audio)[0] :], sample_rate)
            clips.append(str(path))
        lines = [{**own, "audio": clips[0]}, {**shared, "audio": clips[1], "text": SHARED_TEXT}]
        (out / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
        shutil.copy(VOICES_DIR / f"{speaker}.wav", root / f"{speaker}.wav")
    return root


def _overfit_settings(tmp_path, model_dir, layout, voices, steps=OVERFIT_STEPS, **extra):
    values = dict(
        VOICES_DIR=voices,
        TRAIN_SPEAKERS=",".join(SPEAKERS),
        VALIDATION_FRACTION=0.0,
        BATCH_SIZE=len(SPEAKERS) * UTTERANCES_PER_SPEAKER,
        MAX_BATCH_TOKENS=0,  # one batch of everything
        GRADIENT_ACCUMULATION_STEPS=1,
        LEARNING_RATE=6e-3,
        LR_SCHEDULE="cosine",
        WARMUP_STEPS=0,
        WEIGHT_DECAY=0.0,
        # Every code counts here, so the sub-talker's codebooks weigh as much as codebook 0: at the default 0.3 the
        # smallest sub-talker margin of one case swung between 4.7, 1.0 and -3.4 logits across CPU kernel sets.
        SUB_TALKER_LOSS_WEIGHT=1.0,
        MAX_STEPS=steps,
        LOGGING_STEPS=50,
        TRAINING_LAYOUT=layout,
        HF_TOKEN=SECRET,
    )
    return make_settings(tmp_path, model_dir, **{**values, **extra})


def _train(tmp_path_factory, model_dir, layout, **extra):
    """Prepare the overfit voices and train through the real loop from a discriminative copy of ``model_dir``."""
    from finetuning.preparation.prepare import prepare_dataset
    from finetuning.training.loop import train

    tmp_path = tmp_path_factory.mktemp(f"overfit_{layout}")
    voices = _overfit_voices(tmp_path / "voices")
    model_dir = discriminative_copy(model_dir, sorted(voices.glob("*/*.wav")), tmp_path / "model", XVECTOR_SCALE)
    settings = _overfit_settings(tmp_path, model_dir, layout, voices=voices, **extra)
    prepare_dataset(settings, report=lambda _: None)
    result = train(settings)
    return settings, result


def _trained_rows(settings):
    from finetuning.training.data import load_split

    rows = []
    for speaker in settings.TRAIN_SPEAKERS:
        for row in load_split(settings, speaker, "train", ["speaker", "text", "language", "audio_codes"]):
            rows.append({**row, "audio_codes": torch.tensor(np.asarray(row["audio_codes"]), dtype=torch.long)})
    return rows


@contextlib.contextmanager
def recorded_frame_codes(model):
    """Inside the block, the frame codes (T, 16) of every stock ``generate`` call of ``model`` (a
    ``Qwen3TTSModel``) are appended to the list it yields."""
    seen = []
    stock_generate = model.model.generate

    def recording_generate(*args, **kwargs):
        codes, hidden = stock_generate(*args, **kwargs)
        seen.extend(codes)
        return codes, hidden

    model.model.generate = recording_generate
    try:
        yield seen
    finally:
        del model.model.generate


def _generate_codes(model, speaker, text, max_frames):
    """Greedy stock ``generate_custom_voice`` (through ``evaluation.speech.synthesize``, which picks the trained
    language and layout from the checkpoint), returning the frame codes it produced."""
    from finetuning.evaluation.speech import synthesize

    with recorded_frame_codes(model) as seen:
        wav, sample_rate = synthesize(model, speaker, text, greedy=True, max_new_tokens=max_frames)
    assert sample_rate == 24000 and wav.ndim == 1 and np.isfinite(wav).all()
    return seen[0].cpu()


def _stock_codes(model, speaker, text, max_frames, language, non_streaming):
    """Greedy stock ``generate_custom_voice`` called as a user calls it (``language`` None: left out), returning
    the frame codes it produced."""
    language_kwargs = {} if language is None else {"language": language}
    with recorded_frame_codes(model) as seen:
        wavs, sample_rate = model.generate_custom_voice(
            text=text,
            speaker=speaker,
            non_streaming_mode=non_streaming,
            do_sample=False,
            subtalker_dosample=False,
            max_new_tokens=max_frames,
            **language_kwargs,
        )
    assert sample_rate == 24000 and np.isfinite(wavs[0]).all()
    return seen[0].cpu()


def stock_calls(export_dir) -> list[tuple[bool, bool]]:
    """Every (name the language?, non_streaming_mode) call the export claims in ``finetune_info.json``."""
    calls = json.loads((Path(export_dir) / INFO_FILE).read_text())["trained_calls"]
    return [(lang == "given", mode) for lang in calls["language"] for mode in calls["non_streaming_mode"]]


def call_id(given_language: bool, non_streaming: bool) -> str:
    return f"language={'row' if given_language else 'None'},non_streaming_mode={non_streaming}"


def _compare(generated, trained):
    """(codebook-0 identical incl. length/EOS, share of all 16-codebook tokens equal)."""
    same_length = generated.shape[0] == trained.shape[0]
    first_equal = same_length and torch.equal(generated[:, 0], trained[:, 0])
    n = min(generated.shape[0], trained.shape[0])
    matches = (generated[:n] == trained[:n]).sum().item()
    return first_equal, matches / trained.numel()


def teacher_forced_margins(
    model, tokenizer, row, layout: str, language: str | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logit margins of the trained codes over their best rival, teacher-forced through the exported model as
    greedy ``generate_custom_voice`` scores them (control ids suppressed, EOS kept, codebook-0 tokens already
    emitted divided by the repetition penalty), in ``layout`` with ``language`` (None: stock's "Auto"): codebook 0
    (T + 1,) incl. EOS, and codebooks 2-16 (T, 15)."""
    from finetuning.training.step import assistant_text, build_talker_inputs, language_id_for, talker_forward

    tcfg = model.config.talker_config
    codes = row["audio_codes"]
    text_ids = tokenizer(assistant_text(row["text"]), return_tensors="pt")["input_ids"][0]
    speaker = model.talker.get_input_embeddings().weight[tcfg.spk_id[row["speaker"]]]
    with torch.no_grad():
        inputs = build_talker_inputs(
            model, [text_ids], [codes], speaker[None], [language_id_for(tcfg, language)], layout=layout
        )
        out = talker_forward(model, inputs)
    return greedy_margins(tcfg, out, codes)


def greedy_margins(talker_config, out, codes) -> tuple[torch.Tensor, torch.Tensor]:
    """Margins of one utterance's targets over their best rival in a ``talker_forward`` output ``out``, scored as
    greedy stock generation scores them (control ids suppressed, EOS kept, codebook-0 tokens already emitted
    divided by the repetition penalty): codebook 0 (T + 1,) incl. EOS, and codebooks 2-16 (T, 15) of ``codes``."""
    targets = out.label_targets  # (T + 1,) codes then EOS
    logits = out.label_logits.clone()  # (T + 1, V)
    control = torch.arange(talker_config.vocab_size - 1024, talker_config.vocab_size)
    logits[:, control[control != talker_config.codec_eos_token_id]] = float("-inf")
    for j in range(1, len(targets)):
        seen = targets[:j].unique()
        value = logits[j, seen]
        logits[j, seen] = torch.where(value > 0, value / REPETITION_PENALTY, value * REPETITION_PENALTY)

    def margin(scores, wanted):  # scores (..., V), wanted (...) -> target minus best rival (...)
        target = scores.gather(-1, wanted[..., None])[..., 0]
        return target - scores.scatter(-1, wanted[..., None], float("-inf")).max(-1).values

    return margin(logits, targets), margin(out.sub_talker_logits, codes[:, 1:])


def _check(settings, result):
    """Every trained row under every stock call the export claims (``stock_calls``): a report item per (row, call)."""
    import qwen_tts

    from finetuning.evaluation.speech import generation_language

    model = qwen_tts.Qwen3TTSModel.from_pretrained(str(result.export_dir))
    report = []
    for given_language, non_streaming in stock_calls(result.export_dir):
        for row in _trained_rows(settings):
            trained = row["audio_codes"]
            language = generation_language(model.model, row["language"]) if given_language else None
            generated = _stock_codes(model, row["speaker"], row["text"], trained.shape[0] + 10, language, non_streaming)
            first_equal, share = _compare(generated, trained)
            layout = "non_streaming" if non_streaming else "streaming"
            codec0_margins, sub_talker_margins = teacher_forced_margins(
                model.model, model.processor.tokenizer, row, layout, language
            )
            report.append(
                {
                    "call": call_id(given_language, non_streaming),
                    "speaker": row["speaker"],
                    "text": row["text"],
                    "codebook0_equal": first_equal,
                    "share": share,
                    "codec0_margin": float(codec0_margins.min()),
                    "sub_talker_margin": float(sub_talker_margins.min()),
                }
            )
    return model, report


def assert_reproduces_every_speaker(settings, result, margin_log: dict, case_id: str):
    """The decisive check on a finished overfit run: under every stock call the export claims, stock greedy
    generation gives back every trained utterance, with teacher-forced margins >= MIN_TEACHER_FORCED_MARGIN (the
    smallest logged under ``case_id``), and the shared sentence follows the speaker name. Returns the model."""
    model, report = _check(settings, result)
    calls = stock_calls(result.export_dir)
    assert len(report) == len(SPEAKERS) * UTTERANCES_PER_SPEAKER * len(calls)
    margin_log[case_id] = {
        "codec0": min(item["codec0_margin"] for item in report),
        "sub_talker": min(item["sub_talker_margin"] for item in report),
        "calls": len(calls),
    }
    for item in report:
        assert item["codebook0_equal"], item
        assert item["share"] >= MIN_TOKEN_MATCH, item
        assert min(item["codec0_margin"], item["sub_talker_margin"]) >= MIN_TEACHER_FORCED_MARGIN, item

    # The shared sentence comes out as each speaker's own recording: swapping the name changes the output.
    shared = {row["speaker"]: row["audio_codes"] for row in _trained_rows(settings) if row["text"] == SHARED_TEXT}
    assert set(shared) == set(SPEAKERS)
    first, second = SPEAKERS
    as_second = _generate_codes(model, second, SHARED_TEXT, shared[first].shape[0] + 10)
    first_equal, share = _compare(as_second, shared[first])
    assert not first_equal and share < 0.5
    return model


class LazyRuns(dict):
    """Runs made on first use (``make(key)``), so a selected test trains only what it reads."""

    def __init__(self, make):
        super().__init__()
        self.make = make

    def __missing__(self, key):
        self[key] = run = self.make(key)
        return run


OVERFIT_CASES = [("equal", "mixed"), ("wide_text", "streaming"), ("equal", "non_streaming", "aux")]


@pytest.fixture(scope="module")
def overfit_runs(tiny_model_dirs, tmp_path_factory):
    """Runs with the product's conditioning defaults (LANGUAGE_AUTO_FRACTION): the 1.7B-like layout trained in both
    text layouts (TRAINING_LAYOUT=mixed, the default), whose export claims every generate_custom_voice call; the
    0.6B-like layout (text width != talker width) in streaming mode only; then the 1.7B-like layout in
    non-streaming mode with the auxiliary losses (mel, voice, prosody through the decoder) at their default weights
    and cadence: every one compares with the decoded target codes, so they agree with the codec losses and
    memorisation is as exact, with margins as wide, in as many steps."""

    def make(case):
        extra = {"USE_AUXILIARY_LOSSES": True} if "aux" in case else {}
        if case[1] == "mixed":
            extra["LEARNING_RATE"] = MIXED_LEARNING_RATE
        return _train(tmp_path_factory, tiny_model_dirs[case[0]], case[1], **extra)

    return LazyRuns(make)


@pytest.mark.parametrize("case", OVERFIT_CASES, ids="-".join)
def test_overfit_then_generate_reproduces_every_speaker(overfit_runs, case, margin_log):
    settings, result = overfit_runs[case]
    assert result.optimizer_steps == OVERFIT_STEPS
    assert result.skipped_steps == 0
    assert result.history[-1]["train/loss"] < result.history[0]["train/loss"]
    logged = {key for record in result.history for key in record}
    aux_keys = {"train/mel_reconstruction", "train/voice_consistency", "train/prosody"}
    assert aux_keys <= logged if "aux" in case else not aux_keys & logged
    assert_reproduces_every_speaker(settings, result, margin_log, "-".join(case))


def test_double_shift_of_the_official_recipe_fails_the_check(tiny_model_dirs, tmp_path_factory, monkeypatch):
    build_talker_inputs = step.build_talker_inputs

    def official_recipe_inputs(*args, **kwargs):  # the step's labels shifted once more: the double shift
        return shift_labels_once_more(build_talker_inputs(*args, **kwargs))

    monkeypatch.setattr(step, "build_talker_inputs", official_recipe_inputs)
    settings, result = _train(tmp_path_factory, tiny_model_dirs["equal"], "non_streaming")
    assert result.history[-1]["train/loss"] < 0.1  # it fits its (misaligned) targets just as well ...
    _, report = _check(settings, result)
    # ... but generation does not give the data back.
    assert not all(item["codebook0_equal"] for item in report)
    assert np.mean([item["share"] for item in report]) < MIN_TOKEN_MATCH


def test_export_lists_every_speaker_and_keeps_no_secret(overfit_runs):
    import qwen_tts

    settings, result = overfit_runs[("equal", "mixed")]
    export = result.export_dir
    model = qwen_tts.Qwen3TTSModel.from_pretrained(str(export))
    assert sorted(model.get_supported_speakers()) == sorted(SPEAKERS)
    assert model.model.tts_model_type == "custom_voice" and model.model.speaker_encoder is None
    config = json.loads((export / "config.json").read_text())
    rows = config["talker_config"]["spk_id"]
    assert len(set(rows.values())) == len(SPEAKERS)
    info = json.loads((export / INFO_FILE).read_text())
    assert info["speakers"]["english_speaker"]["language"] == "english"
    from safetensors import safe_open

    with safe_open(str(export / "model.safetensors"), "pt") as f:
        assert not any(k.startswith("speaker_encoder.") for k in f.keys())
        table = f.get_tensor("talker.model.codec_embedding.weight")
    assert not torch.allclose(table[rows["english_speaker"]], table[rows["swahili_speaker"]])
    saved = json.loads((export / SETTINGS_FILE).read_text())
    assert saved["TRAIN_SPEAKERS"] == list(SPEAKERS) and "HF_TOKEN" not in saved
    for path in list(export.rglob("*")) + list(export.parent.rglob("*.json*")):
        if path.is_file() and path.suffix in (".json", ".jsonl", ".txt", ".md"):
            assert SECRET not in path.read_text(), path
    assert not list(export.parent.glob(".model-*")), "staging folders must not be left behind"


def without_eos(export_dir: Path, out_dir: Path) -> Path:
    """A copy of an export whose EOS logit stock generation suppresses: stock ``generate`` suppresses every
    control id but ``codec_eos_token_id``, which the copy's config moves past the vocabulary, so the real EOS row
    is at -inf and nothing stops generation but ``max_new_tokens``."""
    import shutil

    shutil.copytree(export_dir, out_dir)
    config = json.loads((out_dir / "config.json").read_text())
    config["talker_config"]["codec_eos_token_id"] = config["talker_config"]["vocab_size"]
    (out_dir / "config.json").write_text(json.dumps(config))
    return out_dir


def test_end_of_speech_failures_of_the_overfit_export_and_of_its_copy_without_eos(overfit_runs, tmp_path):
    """The overfit export ends every trained utterance where its recording ends (failure rate 0.0); the same
    weights with EOS suppressed run every utterance up to ``max_new_tokens`` (rate 1.0, all runaways)."""
    import qwen_tts

    from finetuning.constants import FRAME_RATE_HZ
    from finetuning.evaluation.end_of_speech import end_of_speech_failure, failure_counts, speaking_rate
    from finetuning.evaluation.speech import generation_language

    settings, result = overfit_runs[("equal", "mixed")]
    rows = _trained_rows(settings)
    seconds_per_char = speaking_rate(
        [r["text"] for r in rows], [r["audio_codes"].shape[0] / FRAME_RATE_HZ for r in rows]
    )
    counts = {}
    for name, export in (("trained", result.export_dir), ("no_eos", without_eos(result.export_dir, tmp_path / "x"))):
        model = qwen_tts.Qwen3TTSModel.from_pretrained(str(export))
        kinds = []
        for row in rows:
            cap = row["audio_codes"].shape[0] + 10
            language = generation_language(model.model, row["language"])
            codes = _stock_codes(model, row["speaker"], row["text"], cap, language, non_streaming=True)
            generated_s = codes.shape[0] / FRAME_RATE_HZ
            kinds.append(end_of_speech_failure(row["text"], generated_s, seconds_per_char, codes.shape[0] >= cap - 1))
        counts[name] = failure_counts(kinds)
    print(f"\nend-of-speech failures: {counts}")
    assert counts["trained"] == {"rate": 0.0, "n": len(rows), "runaway": 0, "truncated": 0, "run_on": 0}
    assert counts["no_eos"] == {"rate": 1.0, "n": len(rows), "runaway": len(rows), "truncated": 0, "run_on": 0}
