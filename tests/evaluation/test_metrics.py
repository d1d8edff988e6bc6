"""Evaluation metrics and scorers on real (synthetic) speech: bundled voices and tests/fixtures (espeak-ng clips)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES_DIR, VOICES_DIR

from finetuning.constants import SAMPLE_RATE
from finetuning.evaluation.metrics import (
    analyse_clip,
    cer,
    normalize_text,
    perplexity,
    pronunciation_score,
    prosody_difference,
    prosody_stats,
    speaker_similarity,
    tone_similarity,
    wer,
)
from finetuning.evaluation.scorers import (
    ASR_CHUNK_S,
    BackendUnavailable,
    load_asr_backend,
    load_naturalness_backend,
    load_speaker_backend,
)
from finetuning.preparation.audio import decode_audio, load_mono_24k

SR = SAMPLE_RATE


def voice_clip(speaker: str, number: int) -> np.ndarray:
    return load_mono_24k(VOICES_DIR / speaker / "clips" / f"{speaker}_{number:03d}.flac")


def voice_texts(speaker: str) -> dict[str, str]:
    lines = (VOICES_DIR / speaker / "metadata.jsonl").read_text().splitlines()
    return {Path(row["audio"]).stem: row["text"] for row in map(json.loads, lines)}


def fixture(name: str) -> tuple[np.ndarray, int]:
    return decode_audio(FIXTURES_DIR / f"{name}.flac")


@pytest.fixture(scope="module")
def analyses() -> dict[str, object]:
    names = ("vi_tones_male", "vi_tones_female", "vi_tones_reversed_male", "en_intonation", "en_intonation_flat")
    return {name: analyse_clip(*fixture(name)) for name in names}


# --------------------------------------------------------------------------------------------- speaker --


@pytest.fixture(scope="module")
def resemblyzer():
    return load_speaker_backend("resemblyzer")


def test_speaker_similarity_separates_same_from_different_voice(resemblyzer):
    refs = {"english_speaker": load_mono_24k(VOICES_DIR / "english_speaker.wav")}
    refs["swahili_speaker"] = load_mono_24k(VOICES_DIR / "swahili_speaker.wav")
    same, different = [], []
    for speaker, other in (("english_speaker", "swahili_speaker"), ("swahili_speaker", "english_speaker")):
        for number in (1, 2):
            clip = voice_clip(speaker, number)
            same.append(speaker_similarity(resemblyzer, clip, [refs[speaker]], SR))
            different.append(speaker_similarity(resemblyzer, clip, [refs[other]], SR))
    assert resemblyzer.name == "resemblyzer-ge2e"
    assert all(-1.0 <= s <= 1.0 for s in same + different)
    assert min(same) > max(different) + 0.15, (same, different)


def test_speaker_similarity_averages_over_references(resemblyzer):
    clip = voice_clip("english_speaker", 3)
    own, other = voice_clip("english_speaker", 4), voice_clip("swahili_speaker", 4)
    both = speaker_similarity(resemblyzer, clip, [own, other], SR)
    singles = [speaker_similarity(resemblyzer, clip, [ref], SR) for ref in (own, other)]
    assert both == pytest.approx(np.mean(singles), abs=1e-5)
    with pytest.raises(ValueError, match="reference"):
        speaker_similarity(resemblyzer, clip, [], SR)


def test_ecapa_reports_unavailable_with_reason_quickly():
    start = time.perf_counter()
    with pytest.raises(BackendUnavailable) as error:
        load_speaker_backend("ecapa")
    assert time.perf_counter() - start < 10.0
    assert error.value.backend == "ecapa"
    assert "speechbrain/spkrec-ecapa-voxceleb" in error.value.reason and "cache" in error.value.reason


def test_auto_speaker_backend_records_why_ecapa_was_skipped(tmp_path):
    backend = load_speaker_backend("auto", ecapa_source=tmp_path / "missing")
    assert backend.name == "resemblyzer-ge2e"
    assert "missing" in backend.skipped["ecapa"]
    with pytest.raises(ValueError, match="one of: auto, ecapa, resemblyzer"):
        load_speaker_backend("xvector")


TINY_ECAPA_YAML = """\
pretrained_path: placeholder
n_mels: 24
compute_features: !new:speechbrain.lobes.features.Fbank
    n_mels: !ref <n_mels>
mean_var_norm: !new:speechbrain.processing.features.InputNormalization
    norm_type: sentence
    std_norm: False
embedding_model: !new:speechbrain.lobes.models.ECAPA_TDNN.ECAPA_TDNN
    input_size: !ref <n_mels>
    channels: [16, 16, 16, 16, 48]
    attention_channels: 8
    lin_neurons: 12
classifier: !new:speechbrain.lobes.models.ECAPA_TDNN.Classifier
    input_size: 12
    out_neurons: 2
modules:
    compute_features: !ref <compute_features>
    mean_var_norm: !ref <mean_var_norm>
    embedding_model: !ref <embedding_model>
    classifier: !ref <classifier>
pretrainer: !new:speechbrain.utils.parameter_transfer.Pretrainer
    loadables:
        embedding_model: !ref <embedding_model>
    paths:
        embedding_model: !ref <pretrained_path>/embedding_model.ckpt
"""


def test_ecapa_loads_a_local_folder_laid_out_like_the_hub_repo(tmp_path, monkeypatch):
    """A tiny random ECAPA-TDNN in the Hub repo's layout: checkpoint weights are used, embeddings are unit vectors."""
    import torch
    from speechbrain.lobes.models.ECAPA_TDNN import ECAPA_TDNN

    model_dir, workdir = tmp_path / "ecapa", tmp_path / "cwd"
    model_dir.mkdir()
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    (model_dir / "hyperparams.yaml").write_text(TINY_ECAPA_YAML)
    torch.manual_seed(0)
    weights = ECAPA_TDNN(24, channels=[16, 16, 16, 16, 48], attention_channels=8, lin_neurons=12).state_dict()
    torch.save(weights, model_dir / "embedding_model.ckpt")

    backend = load_speaker_backend("ecapa", ecapa_source=model_dir)
    loaded = backend._model.mods.embedding_model.state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in weights.items())
    clip = voice_clip("english_speaker", 1)
    embedding = backend.embed(clip, SR)
    assert embedding.shape == (12,)
    assert np.linalg.norm(embedding) == pytest.approx(1.0, abs=1e-5)
    assert speaker_similarity(backend, clip, [clip], SR) == pytest.approx(1.0, abs=1e-5)
    assert str(model_dir) in backend.name
    # Files are read in place: nothing is linked or copied into the model folder or the working directory.
    assert sorted(path.name for path in model_dir.iterdir()) == ["embedding_model.ckpt", "hyperparams.yaml"]
    assert not any(workdir.iterdir())


# ------------------------------------------------------------------------------------- pronunciation --


def test_normalize_text():
    assert normalize_text("  Hello,   WORLD!\n") == "hello world"
    assert normalize_text("Ｆｕｌｌ－ｗｉｄｔｈ ﬁne") == "full width fine"  # NFKC folds width and ligatures
    assert normalize_text("\"Don't\" stop - it's 7 o'clock.") == "don't stop it's 7 o'clock"
    assert normalize_text("Habari za asubuhi.") == "habari za asubuhi"
    assert normalize_text("Xin chào, thế giới!") == "xin chào thế giới"
    assert normalize_text("नमस्ते, दुनिया!") == "नमस्ते दुनिया"  # combining vowel signs are part of the word
    assert normalize_text("It\u2019s «fine» — 100%") == "it's fine 100"


def test_english_is_normalised_as_whisper_evaluations_do():
    """Numbers, contractions and titles: the same sentence written two ways scores WER 0 in English only."""
    assert wer("It's 1998.", "it is nineteen ninety eight", language="english") == 0.0
    assert wer("I won't pay $20!", "I will not pay twenty dollars", language="english") == 0.0
    assert wer("Mr. Smith has 3 cats", "mister smith has three cats", language="english") == 0.0
    assert wer("It's 1998.", "it is nineteen ninety eight") > 0.5  # other languages: plain normalisation
    assert normalize_text("Habari za asubuhi.", language="swahili") == "habari za asubuhi"


def test_wer_and_cer():
    assert wer("Good morning, how are you?", "good morning how are you") == 0.0
    assert cer("Good morning, how are you?", "GOOD MORNING... HOW ARE YOU") == 0.0
    assert wer("the cat sat", "the dog sat") == pytest.approx(1 / 3)
    assert cer("the cat sat", "the dog sat") == pytest.approx(3 / 11)
    assert wer("the cat sat", "a completely different sentence here") > 1.0
    assert wer("the cat sat", "") == cer("the cat sat", "") == 1.0  # a recogniser that heard nothing
    with pytest.raises(ValueError, match="empty"):
        wer("?!", "anything")


@pytest.fixture(scope="module")
def pocketsphinx():
    return load_asr_backend("pocketsphinx")


def test_end_of_speech_failures_at_the_stated_thresholds():
    from finetuning.evaluation.end_of_speech import (
        EOS_LONG_RATIO,
        EOS_SHORT_RATIO,
        end_of_speech_failure,
        failure_counts,
        speaking_rate,
    )

    assert (EOS_SHORT_RATIO, EOS_LONG_RATIO) == (0.5, 2.0)
    # 10, 20 and 5 non-space characters said in 1.0, 1.6 and 0.6 s: 0.1, 0.08, 0.12 s per character -> median 0.1
    rate = speaking_rate(["abcde fghij", "a" * 20, "hello"], [1.0, 1.6, 0.6])
    assert rate == pytest.approx(0.1)
    text = "twenty chars of text"  # 17 non-space characters: 1.7 s expected
    assert end_of_speech_failure(text, 1.7, rate, reached_length_cap=False) is None
    assert (
        end_of_speech_failure(text, 0.86, rate, False) is None
        and end_of_speech_failure(text, 3.39, rate, False) is None
    )
    assert end_of_speech_failure(text, 0.84, rate, False) == "truncated"  # stopped before half of it
    assert end_of_speech_failure(text, 3.41, rate, False) == "run_on"  # went on past twice its length
    assert end_of_speech_failure(text, 1.7, rate, reached_length_cap=True) == "runaway"  # no EOS before the cap
    assert end_of_speech_failure(text, 0.1, float("nan"), False) is None  # no rate: only runaways are known
    kinds = [None, "truncated", "runaway", None]
    assert failure_counts(kinds) == {"rate": 0.5, "n": 4, "runaway": 1, "truncated": 1, "run_on": 0}


def test_pocketsphinx_wer_lower_for_matching_text(pocketsphinx):
    texts = voice_texts("english_speaker")
    # Clips pocketsphinx gets partly right (its WER over all 14 bundled clips is ~0.8): the check is that the
    # matching text scores better than another clip's text, not that the recogniser is good.
    numbers = (1, 4, 10, 11)
    matched, mismatched = [], []
    for index, number in enumerate(numbers):
        score = pronunciation_score(
            pocketsphinx, voice_clip("english_speaker", number), SR, texts[f"english_speaker_{number:03d}"]
        )
        other = texts[f"english_speaker_{numbers[(index + 1) % len(numbers)]:03d}"]
        matched.append(score.wer)
        mismatched.append(wer(other, score.transcript))
    assert pocketsphinx.name == "pocketsphinx-en-us"
    assert np.mean(matched) < np.mean(mismatched) - 0.25, (matched, mismatched)
    with pytest.raises(ValueError, match="swahili"):
        pocketsphinx.transcribe(voice_clip("swahili_speaker", 1), SR, language="swahili")


def test_pocketsphinx_scores_each_clip_from_a_fresh_state():
    # A decoder that carries state from clip to clip hears english_speaker_009 as "while longer require" first,
    # then as "while logged everywhere" right after itself.
    recogniser = load_asr_backend("pocketsphinx")
    clip = voice_clip("english_speaker", 9)
    noise = (0.05 * np.random.default_rng(0).standard_normal(SR)).astype(np.float32)
    transcripts = [recogniser.transcribe(clip, SR), recogniser.transcribe(clip, SR)]
    recogniser.transcribe(noise, SR)
    transcripts.append(recogniser.transcribe(clip, SR))
    assert transcripts == [transcripts[0]] * 3, transcripts


def test_asr_auto_records_why_transformers_was_skipped():
    backend = load_asr_backend("auto", model_id="openai/whisper-small")
    assert backend.name == "pocketsphinx-en-us"
    assert "openai/whisper-small" in backend.skipped["transformers"]
    assert "not configured" not in backend.skipped["transformers"]
    assert "no model id" in load_asr_backend("auto").skipped["transformers"]
    with pytest.raises(BackendUnavailable, match="openai/whisper-small"):
        load_asr_backend("transformers", model_id="openai/whisper-small")
    with pytest.raises(ValueError, match="ASR_MODEL"):
        load_asr_backend("transformers")


def test_transformers_asr_loads_a_local_folder(tmp_path):
    """A tiny random wav2vec2 CTC model saved to a folder runs through the real pipeline."""
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC

    vocab = {
        "<pad>": 0,
        "|": 1,
        "<unk>": 2,
        **{letter: 3 + i for i, letter in enumerate("abcdefghijklmnopqrstuvwxyz'")},
    }
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    tokenizer = Wav2Vec2CTCTokenizer(str(tmp_path / "vocab.json"), pad_token="<pad>", word_delimiter_token="|")
    extractor = Wav2Vec2FeatureExtractor(sampling_rate=16_000, return_attention_mask=False)
    config = Wav2Vec2Config(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        conv_dim=(16, 16),
        conv_kernel=(10, 3),
        conv_stride=(5, 2),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model_dir = tmp_path / "tiny_ctc"
    Wav2Vec2ForCTC(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    extractor.save_pretrained(model_dir)

    backend = load_asr_backend("transformers", model_id=str(model_dir))
    transcript = backend.transcribe(voice_clip("english_speaker", 1), SR)
    assert backend.name == f"transformers:{model_dir}"
    # Random weights spell random letters (and <unk>), but only from this vocabulary.
    assert isinstance(transcript, str) and set(transcript.replace("<unk>", "")) <= set(vocab) | {" "}
    long_clip = np.tile(voice_clip("english_speaker", 1), 22)  # ~36 s: transcribed in 30 s chunks
    assert long_clip.size > ASR_CHUNK_S * SR
    long_transcript = backend.transcribe(long_clip, SR)
    assert set(long_transcript.replace("<unk>", "")) <= set(vocab) | {" "}


# ---------------------------------------------------------------------------------------- naturalness --


def test_dnsmos_rates_a_clean_clip_above_the_same_clip_with_noise():
    scorer = load_naturalness_backend("auto")
    assert scorer.name == "speechmos-dnsmos-p835-ovrl" and scorer.skipped == {}
    clean = voice_clip("english_speaker", 1)
    noisy = clean + 0.05 * np.random.default_rng(0).standard_normal(clean.size).astype(np.float32)
    clean_mos, noisy_mos = scorer.score(clean, SR), scorer.score(noisy, SR)
    assert 1.0 <= noisy_mos < clean_mos - 0.5 <= 5.0, (clean_mos, noisy_mos)
    assert scorer.score(clean, SR) == pytest.approx(clean_mos)  # deterministic
    with pytest.raises(ValueError, match="silent"):
        scorer.score(np.zeros(SR, dtype=np.float32), SR)
    assert load_naturalness_backend("none") is None


# ------------------------------------------------------------------------------------- tone and prosody --


def test_tone_similarity_same_tones_in_two_voices_vs_reversed_tones(analyses):
    same = tone_similarity(analyses["vi_tones_female"], analyses["vi_tones_male"])
    reversed_ = tone_similarity(analyses["vi_tones_reversed_male"], analyses["vi_tones_female"])
    assert same["tone_f0_corr"] > 0.85, same
    assert reversed_["tone_f0_corr"] < 0.6, reversed_
    assert same["tone_f0_rmse_st"] < 0.5 * reversed_["tone_f0_rmse_st"]
    assert same["tone_voicing_agreement"] > 0.8
    itself = tone_similarity(analyses["vi_tones_male"], analyses["vi_tones_male"])
    assert itself == {"tone_f0_corr": pytest.approx(1.0), "tone_f0_rmse_st": 0.0, "tone_voicing_agreement": 1.0}


def test_prosody_detects_flattened_pitch(analyses):
    flat = prosody_difference(analyses["en_intonation_flat"], analyses["en_intonation"])
    assert flat["f0_range_diff_st"] < -2.0, flat
    assert prosody_stats(analyses["en_intonation_flat"])["f0_range_st"] < 2.0
    # The same words at the same pace: energy contour, rate and duration agree.
    assert flat["energy_corr"] > 0.9
    assert abs(flat["syllable_rate_ratio"] - 1.0) < 0.1
    assert abs(flat["duration_ratio"] - 1.0) < 0.05


def test_prosody_detects_slower_speech(analyses):
    import librosa

    audio, sample_rate = fixture("en_intonation")
    slower = analyse_clip(librosa.effects.time_stretch(audio, rate=0.7), sample_rate)
    diff = prosody_difference(slower, analyses["en_intonation"])
    assert diff["syllable_rate_ratio"] < 0.85, diff
    assert diff["duration_ratio"] > 1.3, diff
    assert abs(diff["f0_median_diff_st"]) < 0.5
    assert abs(diff["f0_range_diff_st"]) < 1.5


def test_prosody_detects_higher_voice_and_inserted_pause(analyses):
    import librosa

    audio, sample_rate = fixture("en_intonation")
    higher = analyse_clip(librosa.effects.pitch_shift(audio, sr=sample_rate, n_steps=3.0), sample_rate)
    assert prosody_difference(higher, analyses["en_intonation"])["f0_median_diff_st"] == pytest.approx(3.0, abs=0.5)

    middle = len(audio) // 2
    paused = np.concatenate([audio[:middle], np.zeros(int(0.5 * sample_rate), np.float32), audio[middle:]])
    diff = prosody_difference(analyse_clip(paused, sample_rate), analyses["en_intonation"])
    assert diff["pause_fraction_diff"] > 0.08, diff
    assert prosody_stats(analyses["en_intonation"])["pause_fraction"] < 0.05


def test_analyse_clip_is_sample_rate_independent(analyses):
    import librosa

    audio, sample_rate = fixture("vi_tones_female")
    at_24k = analyse_clip(librosa.resample(audio, orig_sr=sample_rate, target_sr=SR), SR)
    assert tone_similarity(at_24k, analyses["vi_tones_female"])["tone_f0_corr"] > 0.98
    with pytest.raises(ValueError, match="silent"):
        analyse_clip(np.zeros(SR, np.float32), SR)


# ------------------------------------------------------------------------------------------ perplexity --


def test_perplexity_is_exp_of_mean_cross_entropy_over_kept_targets():
    import torch

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=generator)
    labels = torch.randint(0, 7, (2, 5), generator=generator)
    labels[0, :2] = -100
    labels[1, 4] = -100
    log_probs = torch.log_softmax(logits, dim=-1)
    kept = [(b, t) for b in range(2) for t in range(5) if labels[b, t] != -100]
    by_hand = math.exp(-sum(float(log_probs[b, t, labels[b, t]]) for b, t in kept) / len(kept))
    assert perplexity(logits, labels) == pytest.approx(by_hand, rel=1e-6)
    assert perplexity(torch.zeros(3, 11), torch.tensor([1, 2, 3])) == pytest.approx(11.0)
    with pytest.raises(ValueError, match="target"):
        perplexity(logits, torch.full((2, 5), -100))
    with pytest.raises(ValueError, match="match"):
        perplexity(logits, labels[:, :4])
