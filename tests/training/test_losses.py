"""Auxiliary losses: soft decoding is exact on one-hot codes, each loss sees what it should and trains the talker."""

import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from conftest import VOICES_DIR, make_settings, speechlike

from finetuning.constants import SAMPLE_RATE
from finetuning.training.losses import (
    AUX_LOSS_NAMES,
    MEL_RECONSTRUCTION,
    PROSODY,
    VOICE_CONSISTENCY,
    AuxiliaryLosses,
    MelReconstructionLoss,
    ProsodyLoss,
    SoftCodecDecoder,
    VoiceConsistencyLoss,
    build_auxiliary_losses,
    load_codec_decoder,
)
from finetuning.training.step import TalkerStep, assistant_text, build_talker_inputs, talker_forward


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    """model, text tokenizer and a private copy of the tiny 12 Hz decoder (audible: see tiny_model.py)."""
    import qwen_tts

    wrapper = qwen_tts.Qwen3TTSModel.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    decoder = load_codec_decoder(wrapper.model, tiny_model_dir)
    return SimpleNamespace(model=wrapper.model, tokenizer=wrapper.processor.tokenizer, decoder=decoder)


def _aux(loaded, only=None, **kwargs) -> AuxiliaryLosses:
    weights = {f"{name}_weight": float(only is None or name == only) for name in AUX_LOSS_NAMES}
    weights.update(kwargs)
    return AuxiliaryLosses(loaded.decoder, loaded.model.speaker_encoder, **weights)


def _inputs(loaded, lengths=(12, 12), seed=1):
    gen = torch.Generator().manual_seed(seed)
    texts = ["The coffee is too hot.", "Habari ya asubuhi.", "Good morning.", "Thank you."][: len(lengths)]
    text_ids = [loaded.tokenizer(assistant_text(t), return_tensors="pt")["input_ids"][0] for t in texts]
    codes = [torch.randint(0, 2048, (n, 16), generator=gen) for n in lengths]
    return text_ids, codes


def _forward(model, text_ids, codes):
    spk = torch.zeros(len(codes), model.config.talker_config.hidden_size)
    return talker_forward(model, build_talker_inputs(model, text_ids, codes, spk, [None] * len(codes)))


def _peaked(codes: torch.Tensor, scale: float = 60.0) -> SimpleNamespace:
    """A step output whose logits put all mass on ``codes`` (N, 16), for two utterances of equal length."""
    return SimpleNamespace(
        frame_codes=codes,
        frame_batch=torch.arange(2).repeat_interleave(codes.shape[0] // 2),
        frame_codec0_logits=scale * F.one_hot(codes[:, 0], 3072).float(),
        sub_talker_logits=scale * F.one_hot(codes[:, 1:], 2048).float(),
    )


def test_soft_decoding_of_one_hot_codes_is_the_decoder_output(loaded):
    codec = SoftCodecDecoder(loaded.decoder)
    codes = torch.randint(0, 2048, (2, 6, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hard = codec.decode_codes(codes)
        soft = codec(F.one_hot(codes, 2048).float())
        blurred = codec(torch.full((2, 6, 16, 2048), 1 / 2048))
    assert hard.shape == (2, 6 * 1920)
    assert hard.std() > 0.01
    torch.testing.assert_close(soft, hard, rtol=0, atol=1e-5)
    assert (blurred - hard).abs().mean() > 0.1 * hard.abs().mean()
    assert all(not p.requires_grad for p in codec.parameters())


def test_voice_front_end_is_extract_speaker_embedding_made_differentiable(loaded):
    from qwen_tts.core.models.modeling_qwen3_tts import mel_spectrogram

    voice = VoiceConsistencyLoss(loaded.model.speaker_encoder)
    audio = torch.from_numpy(speechlike(1.2, seed=3))[None].requires_grad_(True)
    reference = mel_spectrogram(audio.detach(), 1024, 128, SAMPLE_RATE, 256, 1024, 0, 12000).transpose(1, 2)
    torch.testing.assert_close(voice.mel(audio), reference)
    embed = voice.embed(audio)
    expected = loaded.model.extract_speaker_embedding(audio.detach()[0].numpy(), SAMPLE_RATE)
    torch.testing.assert_close(embed[0], expected.float(), rtol=1e-4, atol=1e-5)
    embed.sum().backward()
    assert audio.grad.abs().sum() > 0


def test_pitch_proxy_tracks_f0_and_separates_the_bundled_voices():
    prosody = ProsodyLoss()
    t = np.arange(int(1.5 * SAMPLE_RATE)) / SAMPLE_RATE
    for f0 in (100.0, 190.0, 300.0):
        tone = 0.2 * sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 6))
        _, log_f0, voicing = prosody.features(torch.tensor(tone, dtype=torch.float32)[None])
        assert abs(float(log_f0.exp().median()) / f0 - 1) < 0.03
        assert float(voicing.min()) > 0.9
    medians = {}
    for speaker in ("english_speaker", "swahili_speaker"):  # espeak voices at ~100 Hz and ~190 Hz
        audio, _ = sf.read(VOICES_DIR / f"{speaker}.wav", dtype="float32")
        _, log_f0, voicing = prosody.features(torch.from_numpy(audio)[None])
        medians[speaker] = float(log_f0[voicing > 0.7].exp().median())
    assert 85 < medians["english_speaker"] < 120
    assert 165 < medians["swahili_speaker"] < 225


def _flatten_energy(audio: torch.Tensor) -> torch.Tensor:
    """Divide out the 4 Hz syllable envelope of ``speechlike``: same pitch, flat loudness."""
    t = torch.arange(audio.shape[-1]) / SAMPLE_RATE
    return audio / (0.55 + 0.45 * torch.sin(2 * torch.pi * 4 * t)) * 0.5


def _shift_pitch(audio: torch.Tensor) -> torch.Tensor:
    """Resample by 4/3: F0 140 -> ~187 Hz, and the envelope speeds up by the same factor."""
    stretched = F.interpolate(audio[:, None], scale_factor=3 / 4, mode="linear")[:, 0]
    return torch.cat([stretched, stretched], dim=-1)[..., : audio.shape[-1]]


def test_feature_losses_are_zero_on_identical_audio_and_see_their_perturbation():
    audio = torch.from_numpy(speechlike(1.5, seed=0))[None]
    noisy = audio + 0.05 * torch.randn(audio.shape, generator=torch.Generator().manual_seed(0))
    mel = MelReconstructionLoss()
    assert float(mel(audio, audio)) == pytest.approx(0.0, abs=1e-6)
    assert float(mel(audio, noisy)) > 0.3

    prosody = ProsodyLoss()
    assert float(prosody(audio, audio)) == pytest.approx(0.0, abs=1e-6)
    flat = _flatten_energy(audio)
    log_rms, _, _ = prosody.features(audio)
    flat_rms, _, _ = prosody.features(flat)
    assert float(flat_rms.std()) < 0.3 * float(log_rms.std())
    assert float(prosody(audio, flat)) > 0.2
    assert float(prosody(audio, 0.5 * audio)) == pytest.approx(math.log(2), rel=0.02)  # energy term only
    shifted = _shift_pitch(audio)
    _, f0, _ = prosody.features(audio)
    _, shifted_f0, _ = prosody.features(shifted)
    assert float((shifted_f0 - f0).median()) == pytest.approx(math.log(4 / 3), abs=0.03)
    assert float(prosody(audio, shifted)) > 0.25


@pytest.mark.parametrize("name", AUX_LOSS_NAMES)
def test_each_loss_alone_trains_talker_and_code_predictor_never_decoder_or_speaker_encoder(loaded, name):
    model = loaded.model
    model.zero_grad(set_to_none=True)
    aux = _aux(loaded, only=name).train()
    text_ids, codes = _inputs(loaded, lengths=(14, 11))
    out = _forward(model, text_ids, codes)
    components = aux(out)
    assert set(components) == {name}
    assert components[name].ndim == 0 and float(components[name].detach()) > 0
    components[name].backward()
    talker = model.talker
    assert talker.codec_head.weight.grad[:2048].abs().sum() > 0
    assert talker.codec_head.weight.grad[2048:].abs().sum() == 0  # control ids and speaker rows are not audio
    assert talker.model.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0
    assert all(head.weight.grad.abs().sum() > 0 for head in talker.code_predictor.lm_head)
    assert all(p.grad is None for p in loaded.decoder.parameters())
    assert all(p.grad is None for p in model.speaker_encoder.parameters())
    model.zero_grad(set_to_none=True)


def test_each_loss_vanishes_when_prediction_is_the_target_and_grows_when_it_is_not(loaded):
    aux = _aux(loaded).eval()
    gen = torch.Generator().manual_seed(5)
    codes = torch.randint(0, 2048, (2 * 10, 16), generator=gen)
    other = torch.randint(0, 2048, codes.shape, generator=gen)
    with torch.no_grad():
        matched = aux(_peaked(codes))
        wrong = _peaked(other)
        wrong.frame_codes = codes  # the prediction is confidently different codes
        mismatched = aux(wrong)
    for name in (MEL_RECONSTRUCTION, PROSODY):
        assert float(matched[name]) < 1e-4
        assert float(mismatched[name]) > 0.1
    assert abs(float(matched[VOICE_CONSISTENCY])) < 1e-5
    assert float(mismatched[VOICE_CONSISTENCY]) > 100 * max(float(matched[VOICE_CONSISTENCY]), 1e-6)


def test_voice_consistency_compares_with_the_decoded_target_not_a_speaker_mean(loaded, tiny_model_dir):
    """Perfect codes score 0 whatever the speaker's reference x-vector is: the loss never pulls the talker away
    from its data; a prediction in another voice (the other bundled speaker's codes) scores clearly above 0."""
    aux = _aux(loaded, only=VOICE_CONSISTENCY).eval()
    from finetuning.preparation.encoder import SpeechEncoder

    speakers = ("english_speaker", "swahili_speaker")
    clips = [sf.read(VOICES_DIR / f"{speaker}.wav", dtype="float32")[0][: 2 * SAMPLE_RATE] for speaker in speakers]
    encoded = SpeechEncoder(str(tiny_model_dir / "speech_tokenizer"), device="cpu").encode(clips)
    length = min(c.shape[0] for c in encoded)
    own, other = (torch.from_numpy(c[:length].astype(np.int64)) for c in encoded)  # (T, 16) each
    with torch.no_grad():
        matched = aux(_peaked(torch.cat([own, own])))
        wrong = _peaked(torch.cat([other, other]))
        wrong.frame_codes = torch.cat([own, own])
        other_voice = aux(wrong)
    assert abs(float(matched[VOICE_CONSISTENCY])) < 1e-5
    # the tiny random speaker encoder maps every voice close together: "clearly" is relative to the matched value
    assert float(other_voice[VOICE_CONSISTENCY]) > 100 * max(float(matched[VOICE_CONSISTENCY]), 1e-6)


@pytest.fixture
def restored_talker(loaded):
    """The shared model, with its talker weights put back after the test trains them."""
    saved = copy.deepcopy(loaded.model.talker.state_dict())
    yield loaded.model
    loaded.model.talker.load_state_dict(saved)
    loaded.model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", AUX_LOSS_NAMES)
def test_a_few_adam_steps_on_one_loss_alone_reduce_it(loaded, restored_talker, name):
    model = restored_talker
    aux = AuxiliaryLosses(
        loaded.decoder,
        model.speaker_encoder,
        **{f"{n}_weight": float(n == name) for n in AUX_LOSS_NAMES},
        crop_frames=10,
    ).train()
    text_ids, codes = _inputs(loaded, lengths=(10, 10))  # crop == utterance: the same frames every step
    optimizer = torch.optim.Adam(model.talker.parameters(), lr=1e-2)
    values = []
    for _ in range(6):
        value = aux(_forward(model, text_ids, codes))[name]
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        values.append(float(value.detach()))
    assert min(values[-2:]) < 0.8 * values[0], values


def test_zero_weight_skips_its_work(loaded):
    out = _peaked(torch.randint(0, 2048, (2 * 8, 16), generator=torch.Generator().manual_seed(6)))
    encoder_calls, decoder_calls = [], []
    handles = [
        loaded.model.speaker_encoder.register_forward_hook(lambda *_: encoder_calls.append(1)),
        loaded.decoder.pre_conv.register_forward_hook(lambda *_: decoder_calls.append(1)),
    ]
    try:
        voice_only = _aux(loaded, only=VOICE_CONSISTENCY)
        assert set(voice_only(out)) == {VOICE_CONSISTENCY}
        assert encoder_calls and decoder_calls

        encoder_calls.clear()
        no_voice = _aux(loaded, voice_consistency_weight=0.0)
        assert set(no_voice(out)) == {MEL_RECONSTRUCTION, PROSODY}
        assert VOICE_CONSISTENCY not in no_voice.losses and encoder_calls == []

        decoder_calls.clear()
        off = _aux(loaded, **{f"{n}_weight": 0.0 for n in AUX_LOSS_NAMES})
        assert off(out) == {} and decoder_calls == []
    finally:
        for handle in handles:
            handle.remove()


def test_cadence_counts_training_calls_and_eval_always_computes(loaded):
    aux = _aux(loaded, only=MEL_RECONSTRUCTION, every_n_steps=3).train()
    out = _peaked(torch.randint(0, 2048, (2 * 8, 16), generator=torch.Generator().manual_seed(7)))
    with torch.no_grad():
        computed = [bool(aux(out)) for _ in range(6)]
        aux.eval()
        assert aux(out) and aux(out)
        aux.train()
        assert bool(aux(out))  # the 7th training call: 6 % 3 == 0
    assert computed == [True, False, False, True, False, False]


def test_crops_are_contiguous_frames_of_one_utterance_and_seeded(loaded):
    frame_batch = torch.tensor([0] * 20 + [1] * 7 + [2] * 30)
    first = _aux(loaded, crop_frames=16, seed=3).train()
    rows, index = first.crop_indices(frame_batch)
    assert rows.tolist() == [0, 1, 2] and index.shape == (3, 7)  # shortest utterance bounds the crop
    assert (index.diff(dim=1) == 1).all()
    assert (frame_batch[index] == rows[:, None]).all()
    again = _aux(loaded, crop_frames=16, seed=3).train()
    assert torch.equal(again.crop_indices(frame_batch)[1], index)
    starts = {tuple(first.crop_indices(frame_batch)[1][:, 0].tolist()) for _ in range(10)}
    assert len(starts) > 1


def test_talker_step_total_adds_weighted_components(loaded, tiny_model_dir, tmp_path):
    from finetuning.training.optim import make_optimizer

    model = loaded.model
    settings = make_settings(
        tmp_path,
        tiny_model_dir,
        USE_AUXILIARY_LOSSES=True,
        MEL_RECONSTRUCTION_WEIGHT=0.7,
        VOICE_CONSISTENCY_WEIGHT=0.2,
        PROSODY_WEIGHT=0.4,
    )
    aux = build_auxiliary_losses(settings, model, tiny_model_dir, torch.device("cpu"))
    assert aux.weights == {MEL_RECONSTRUCTION: 0.7, VOICE_CONSISTENCY: 0.2, PROSODY: 0.4}
    aux.codec.decoder.load_state_dict(loaded.decoder.state_dict())  # the audible one
    text_ids, codes = _inputs(loaded, lengths=(9, 13))
    speaker_embeds = torch.randn(2, model.config.talker_config.hidden_size)
    step = TalkerStep(model, speaker_embeds, sub_talker_loss_weight=0.3, aux_losses=aux).train()
    batch = {"text_ids": text_ids, "codes": codes, "speaker": torch.tensor([1, 0]), "language": ["english", "auto"]}
    loss, out = step(batch)
    assert set(out.aux) == set(AUX_LOSS_NAMES)
    expected = out.codec0_loss + 0.3 * out.sub_talker_loss + sum(aux.weights[k] * v for k, v in out.aux.items())
    torch.testing.assert_close(loss, expected)
    assert float(loss.detach()) > float((out.codec0_loss + 0.3 * out.sub_talker_loss).detach())
    assert not aux.codec.decoder.training and not model.speaker_encoder.training  # frozen modules stay in eval

    # frozen modules stay out of what trains: the optimizer, the step's trainable list and the model's parameters
    trained = {id(p) for group in make_optimizer(model, settings).param_groups for p in group["params"]}
    trained |= {id(p) for p in step.parameters() if p.requires_grad}
    frozen = {id(p) for p in aux.codec.parameters()} | {id(p) for p in model.speaker_encoder.parameters()}
    assert not trained & frozen
    assert not {id(p) for p in aux.codec.parameters()} & {id(p) for p in model.parameters()}
    _, plain = TalkerStep(model, speaker_embeds).train()(batch)
    assert plain.aux == {}


def test_builder_returns_none_when_off(loaded, tiny_model_dir, tmp_path):
    off = make_settings(tmp_path, tiny_model_dir, USE_AUXILIARY_LOSSES=False)
    assert build_auxiliary_losses(off, loaded.model, tiny_model_dir, "cpu") is None
    zero = make_settings(
        tmp_path,
        tiny_model_dir,
        USE_AUXILIARY_LOSSES=True,
        MEL_RECONSTRUCTION_WEIGHT=0,
        VOICE_CONSISTENCY_WEIGHT=0,
        PROSODY_WEIGHT=0,
    )
    assert build_auxiliary_losses(zero, loaded.model, tiny_model_dir, "cpu") is None
    with pytest.raises(ValueError, match="speaker encoder"):
        AuxiliaryLosses(loaded.decoder, None, voice_consistency_weight=0.5)
