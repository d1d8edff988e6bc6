"""Voice-clone overfit -> base export -> stock ``generate_voice_clone`` gives the trained codes back.

A tiny model is trained through the real loop with TRAINING_MODE=voice_clone on the two bundled speakers x two
utterances (one sentence said by both), half the samples in ICL mode and half in x-vector mode. Each utterance's
reference is the other clip of its speaker (the only one there is), so the references are fixed. The export is
a ``base`` model; stock ``Qwen3TTSModel.from_pretrained`` + ``generate_voice_clone(ref_audio=<the reference
clip's file>, ref_text=..., text=...)``, greedy, in the layout trained (streaming: generate_voice_clone's default),
must reproduce every trained utterance under every call the export claims (``finetune_info.json``
"trained_calls": ICL and x-vector mode x ``non_streaming_mode`` True and False x ``language`` given and left out),
and the shared sentence cloned from the *other* speaker's reference must come out as that speaker's recording, not
the first speaker's.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import VOICES_DIR, discriminative_copy, make_settings
from test_train import (
    MIN_TEACHER_FORCED_MARGIN,
    MIN_TOKEN_MATCH,
    OVERFIT_STEPS,
    SHARED_TEXT,
    SPEAKERS,
    XVECTOR_SCALE,
    _compare,
    _overfit_settings,
    _overfit_voices,
    call_id,
    greedy_margins,
    recorded_frame_codes,
    stock_calls,
)

from finetuning.training.export import INFO_FILE

pytestmark = pytest.mark.slow  # every test reads one voice-clone overfit run

LAYOUT = "mixed"  # both non_streaming_mode values (generate_voice_clone's default is False)
MODES = ("icl", "x_vector")
# x-vectors about 1 long (``test_train.XVECTOR_SCALE``): as short as the random ones (0.3), x-vector mode told
# the two voices' shared sentence apart by 0.4 logits with AVX2 kernels after 450 steps (-0.6 after 300).
# The learning rate decays to 0 by the end (``test_train._overfit_settings``): at a constant rate the loss crept
# back up in the last 100 steps (0.014 -> 0.025) and the smallest sub-talker margin landed anywhere between -0.5
# and 6.4 logits across CPU kernel sets.
CLONE_STEPS = OVERFIT_STEPS


@pytest.fixture(scope="module")
def clone_run(tiny_model_dirs, tmp_path_factory):
    from finetuning.preparation.prepare import prepare_dataset
    from finetuning.training.loop import train

    tmp_path = tmp_path_factory.mktemp("overfit_clone")
    voices = _overfit_voices(tmp_path / "voices")
    for speaker in SPEAKERS:  # the shared sentence in one language: only the reference tells its two versions apart
        metadata = voices / speaker / "metadata.jsonl"
        rows = [json.loads(line) for line in metadata.read_text().splitlines()]
        rows = [{**row, "language": "auto"} if row["text"] == SHARED_TEXT else row for row in rows]
        metadata.write_text("".join(json.dumps(row) + "\n" for row in rows))
    model_dir = discriminative_copy(
        tiny_model_dirs["equal"], sorted(voices.glob("*/*.wav")), tmp_path / "model", scale=XVECTOR_SCALE
    )
    # ENCODE_BATCH_SIZE=1: each clip's codes as stock create_voice_clone_prompt encodes a reference, alone (in a
    # padded batch the tokenizer's last frame of a shorter clip can differ). The sub-talker loss weighs 1
    # (``_overfit_settings``): at the default 0.3 the smallest sub-talker margin after 300 steps was 3.8 logits with
    # AVX-512 kernels but -0.3 with AVX2 ones.
    settings = _overfit_settings(
        tmp_path,
        model_dir,
        LAYOUT,
        voices,
        steps=CLONE_STEPS,
        TRAINING_MODE="voice_clone",
        CLONE_ICL_FRACTION=0.5,
        ENCODE_BATCH_SIZE=1,
    )
    prepare_dataset(settings, report=lambda _: None)
    result = train(settings)
    return settings, result, _clips(settings, tmp_path / "clips")


def _clips(settings, folder):
    """Every trained clip as {speaker, text, language, codes (T, 16), wav: path of its prepared audio}."""
    from finetuning.training.data import load_split

    folder.mkdir()
    clips = []
    for speaker in settings.TRAIN_SPEAKERS:
        for row in load_split(settings, speaker, "train", ["id", "text", "language", "audio", "audio_codes"]):
            path = folder / f"{speaker}-{row['id']}.wav"
            sf.write(path, np.asarray(row["audio"]["array"], dtype=np.float32), 24000, subtype="FLOAT")
            codes = torch.tensor(np.asarray(row["audio_codes"]), dtype=torch.long)
            clips.append(
                {"speaker": speaker, "text": row["text"], "language": row["language"], "codes": codes, "wav": path}
            )
    return clips


def _reference_of(clips, clip):
    [other] = [c for c in clips if c["speaker"] == clip["speaker"] and c is not clip]
    return other


def _clone_codes(model, text, language, reference, mode, max_frames, non_streaming=False):
    """Greedy stock ``generate_voice_clone`` from the reference clip's file, called as a user calls it
    (``language`` None: left out); the frame codes it generated."""
    language_kwargs = {} if language is None else {"language": language}
    with recorded_frame_codes(model) as seen:
        wavs, sample_rate = model.generate_voice_clone(
            text=text,
            ref_audio=str(reference["wav"]),
            ref_text=reference["text"],
            x_vector_only_mode=mode == "x_vector",
            non_streaming_mode=non_streaming,
            do_sample=False,
            subtalker_dosample=False,
            max_new_tokens=max_frames,
            **language_kwargs,
        )
    assert sample_rate == 24000 and np.isfinite(wavs[0]).all()
    return seen[0].cpu()


def _margins(model, clip, reference, mode, language, layout):
    """Teacher-forced logit margins of the trained codes over their best rival, conditioned as stock generation
    conditions them (the stock prompt's codes and x-vector, ``language``, ``layout``), scored as greedy decoding
    scores them: codebook 0 (T + 1,) with control ids suppressed and the repetition penalty applied, codebooks
    2-16 (T, 15)."""
    from finetuning.training.layout import ROLE_TOKENS, SUFFIX_TOKENS
    from finetuning.training.step import assistant_text, build_talker_inputs, language_id_for, talker_forward

    inner, tokenizer = model.model, model.processor.tokenizer
    tcfg = inner.config.talker_config
    [item] = model.create_voice_clone_prompt(str(reference["wav"]), reference["text"], mode == "x_vector")
    text_ids = tokenizer(assistant_text(clip["text"]), return_tensors="pt")["input_ids"][0]
    ref_ids = tokenizer(assistant_text(reference["text"]), return_tensors="pt")["input_ids"][0]
    icl = mode == "icl"
    with torch.no_grad():
        inputs = build_talker_inputs(
            inner,
            [text_ids],
            [clip["codes"]],
            item.ref_spk_embedding[None].float(),
            [language_id_for(tcfg, language)],
            layout,
            ref_text_ids=[ref_ids[ROLE_TOKENS:-SUFFIX_TOKENS]] if icl else None,
            ref_codes=[item.ref_code] if icl else None,
        )
        out = talker_forward(inner, inputs)
    codec0, sub_talker = greedy_margins(tcfg, out, clip["codes"])
    return float(codec0.min()), float(sub_talker.min())


@pytest.mark.parametrize("mode", MODES)
def test_voice_clone_overfit_then_generate_voice_clone_reproduces_every_clip(clone_run, mode, margin_log):
    import qwen_tts

    from finetuning.evaluation.speech import generation_language

    settings, result, clips = clone_run
    assert result.optimizer_steps == settings.MAX_STEPS and result.skipped_steps == 0
    assert result.history[-1]["train/loss"] < result.history[0]["train/loss"]
    model = qwen_tts.Qwen3TTSModel.from_pretrained(str(result.export_dir), dtype=torch.float32)
    assert model.model.tts_model_type == "base" and model.model.speaker_encoder is not None
    assert len(clips) == 2 * len(SPEAKERS)
    calls = json.loads((result.export_dir / INFO_FILE).read_text())["trained_calls"]
    assert calls["method"] == "generate_voice_clone" and sorted(calls["x_vector_only_mode"]) == [False, True]
    margins, failures = [], []
    for given_language, non_streaming in stock_calls(result.export_dir):
        for clip in clips:
            reference = _reference_of(clips, clip)
            if mode == "icl":  # stock encodes the reference file itself: the codes training used as the prompt
                [item] = model.create_voice_clone_prompt(str(reference["wav"]), reference["text"])
                assert torch.equal(item.ref_code.cpu(), reference["codes"])
            language = generation_language(model.model, clip["language"]) if given_language else None
            frames = len(clip["codes"]) + 10
            generated = _clone_codes(model, clip["text"], language, reference, mode, frames, non_streaming)
            first_equal, share = _compare(generated, clip["codes"])
            layout = "non_streaming" if non_streaming else "streaming"
            margins.append(_margins(model, clip, reference, mode, language, layout))
            report = {
                "call": call_id(given_language, non_streaming),
                "speaker": clip["speaker"],
                "text": clip["text"],
                "codebook0_equal": first_equal,
                "share": share,
                "margins": margins[-1],
            }
            if not (first_equal and share >= MIN_TOKEN_MATCH and min(margins[-1]) >= MIN_TEACHER_FORCED_MARGIN):
                failures.append(report)
    margin_log[f"voice_clone-{mode}"] = {"codec0": min(m[0] for m in margins), "sub_talker": min(m[1] for m in margins)}
    assert len(margins) == len(clips) * 4 and not failures, failures

    # The shared sentence (same text, same language) cloned from the other speaker's reference comes out as the
    # other speaker's recording, not the first's: the reference decides the voice. Both ways round.
    shared = {c["speaker"]: c for c in clips if c["text"] == SHARED_TEXT}
    for speaker, other in (SPEAKERS, SPEAKERS[::-1]):
        other_reference = _reference_of(clips, shared[other])
        language, frames = shared[speaker]["language"], len(shared[speaker]["codes"]) + 10
        generated = _clone_codes(
            model, SHARED_TEXT, generation_language(model.model, language), other_reference, mode, frames
        )
        first_equal, share = _compare(generated, shared[speaker]["codes"])
        assert not first_equal and share < 0.5, (speaker, share)
        assert _compare(generated, shared[other]["codes"]) == (True, 1.0), speaker


def test_voice_clone_export_is_a_base_model_with_its_speaker_encoder(clone_run):
    from safetensors.torch import load_file

    settings, result, _ = clone_run
    export = result.export_dir
    config = json.loads((export / "config.json").read_text())
    assert config["tts_model_type"] == "base" and config["talker_config"]["spk_id"] == {}
    trained = load_file(str(export / "model.safetensors"))
    base = load_file(str(Path(settings.INIT_MODEL_PATH) / "model.safetensors"))
    encoder_keys = [k for k in base if k.startswith("speaker_encoder.")]
    assert encoder_keys and all(torch.equal(trained[k], base[k]) for k in encoder_keys)  # frozen, kept
    assert sorted(trained) == sorted(base)
    info = json.loads((export / INFO_FILE).read_text())
    assert info["training_mode"] == "voice_clone" and "speakers" not in info
    assert sorted(info["trained_speakers"]) == sorted(SPEAKERS)


def test_generate_command_clones_a_reference_with_the_export(clone_run, tmp_path, capsys):
    """``generate.py --ref_audio F --ref_text T`` writes what stock greedy ``generate_voice_clone`` makes of that
    reference (ICL mode, the trained layout); bad combinations are one ``error:`` line."""
    import qwen_tts

    from finetuning.generate import main

    settings, result, clips = clone_run
    clip = clips[0]
    reference = _reference_of(clips, clip)
    out = tmp_path / "clone.wav"
    command = ["--checkpoint", str(result.export_dir), "--text", clip["text"], "--greedy", "--max_new_tokens", "40"]
    assert (
        main([*command, "--ref_audio", str(reference["wav"]), "--ref_text", reference["text"], "--output", str(out)])
        == 0
    )
    written, sample_rate = sf.read(out, dtype="float32")
    model = qwen_tts.Qwen3TTSModel.from_pretrained(str(result.export_dir), dtype=torch.float32)
    wavs, _ = model.generate_voice_clone(
        text=clip["text"],
        language="auto",
        ref_audio=str(reference["wav"]),
        ref_text=reference["text"],
        non_streaming_mode=False,
        do_sample=False,
        subtalker_dosample=False,
        max_new_tokens=40,
    )
    assert sample_rate == 24000 and written.shape == wavs[0].shape
    np.testing.assert_allclose(written, wavs[0], atol=1e-4)  # the command writes 16-bit PCM
    capsys.readouterr()
    missing = [*command, "--ref_audio", str(tmp_path / "nope.wav"), "--output", str(out)]
    assert main(missing) == 2
    assert capsys.readouterr().err.strip().startswith("error: --ref_audio")
    assert main([*command, "--speaker", clip["speaker"], "--output", str(out)]) == 2
    assert "--ref_audio" in capsys.readouterr().err


def test_evaluate_clones_unseen_clips_with_the_export_and_the_base_model(clone_run, tmp_path):
    """``evaluate.py --compare BASE`` on a voice-clone export: both models are Base cloners, clone each speaker
    from its reference clip and are scored on clips the export never trained on, with the same seeds."""
    from finetuning.evaluation.runner import compare_checkpoints
    from finetuning.preparation.prepare import prepare_dataset
    from finetuning.training.data import load_split

    settings, result, _ = clone_run
    voices = tmp_path / "voices"
    for speaker in SPEAKERS:  # the third and fourth bundled clips: training used the first two
        rows = (VOICES_DIR / speaker / "metadata.jsonl").read_text().splitlines()[2:4]
        rows = [{**json.loads(row), "audio": str(VOICES_DIR / speaker / json.loads(row)["audio"])} for row in rows]
        (voices / speaker).mkdir(parents=True)
        (voices / speaker / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        (voices / f"{speaker}.wav").write_bytes((VOICES_DIR / f"{speaker}.wav").read_bytes())
    base = Path(settings.INIT_MODEL_PATH)
    unseen = make_settings(
        tmp_path, base, VOICES_DIR=voices, VALIDATION_FRACTION=0.5, EVAL_MAX_UTTERANCES=1, EVAL_MAX_SECONDS=1.6
    )
    prepare_dataset(unseen, report=lambda _: None)
    report = compare_checkpoints(result.export_dir, base, unseen, output_dir=tmp_path / "evaluation")

    trained_texts = {row["text"] for s in SPEAKERS for row in load_split(settings, s, "train", ["text"])}
    for run in (report["candidate"], report["baseline"]):
        assert (
            run["checkpoint"]["model_type"] == "base" and run["checkpoint"]["layout"] == "streaming"
        )  # stock default of a mixed export
        assert list(run["speakers"]) == list(SPEAKERS)
        for speaker, section in run["speakers"].items():
            assert "generate_voice_clone" in section["conditioning"], speaker
            assert section["split"] == "validation" and len(section["utterances"]) == 1
            [utterance] = section["utterances"]
            assert utterance["text"] not in trained_texts
            assert utterance["values"]["perplexity_codec0"] >= 1.0
            assert (Path(run["output_dir"]) / utterance["audio"]).is_file()
    assert report["candidate"]["checkpoint"]["path"] != report["baseline"]["checkpoint"]["path"]
