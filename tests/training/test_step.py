"""The training step builds exactly what generation builds, and aligns labels and sub-talker inputs correctly."""

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import VOICES_DIR, shift_labels_once_more

from finetuning.training.step import (
    IGNORE_INDEX,
    TalkerStep,
    assistant_text,
    build_sequence,
    build_talker_inputs,
    frame_embeddings,
    language_id_for,
    talker_forward,
)

SPEAKER = "alice"
SPEAKER_ROW = 3000


@pytest.fixture(scope="module")
def loaded(tiny_model_dirs):
    """{layout: (model, tokenizer)} with one custom-voice speaker row registered in memory."""
    import qwen_tts

    out = {}
    for layout, path in tiny_model_dirs.items():
        wrapper = qwen_tts.Qwen3TTSModel.from_pretrained(str(path), dtype=torch.float32)
        model = wrapper.model.eval()
        model.config.talker_config.spk_id = {SPEAKER: SPEAKER_ROW}
        model.config.talker_config.spk_is_dialect = {SPEAKER: False}
        out[layout] = (model, wrapper.processor.tokenizer)
    return out


def _capture_prefill(model, text_ids, language, non_streaming):
    """Run stock generate for a few frames and return the talker's prefill kwargs."""
    captured = {}

    def hook(module, args, kwargs):
        if "prefill" not in captured:
            captured["prefill"] = kwargs["inputs_embeds"].detach().clone()
            captured["trailing"] = kwargs["trailing_text_hidden"].detach().clone()
            captured["pad"] = kwargs["tts_pad_embed"].detach().clone()

    handle = model.talker.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model.generate(
            input_ids=[text_ids[None]],
            languages=[language],
            speakers=[SPEAKER],
            non_streaming_mode=non_streaming,
            do_sample=False,
            subtalker_dosample=False,
            max_new_tokens=3,
        )
    finally:
        handle.remove()
    return captured


def _frames_from_tables(talker, codes: torch.Tensor) -> torch.Tensor:
    """(T, 16) codes -> (T, D) what generate feeds back for each finished frame, read straight from the embedding
    tables: the talker's codec row of codebook 0 plus the code predictor's table k-1 row of codebook k (k = 1..15)."""
    talker_table = talker.get_input_embeddings().weight  # (V, D)
    predictor_tables = [table.weight for table in talker.code_predictor.get_input_embeddings()]  # 15 x (2048, D)
    assert len(predictor_tables) == 15
    frames = talker_table[codes[:, 0]].clone()
    for k, table in enumerate(predictor_tables, start=1):
        frames += table[codes[:, k]]
    return frames


@pytest.mark.parametrize("tiny_layout", ["equal", "wide_text"])
@pytest.mark.parametrize("layout", ["non_streaming", "streaming"])
@pytest.mark.parametrize("language", ["english", "auto"])
def test_built_sequence_equals_generate_prefill_and_feedback(loaded, tiny_layout, layout, language):
    model, tokenizer = loaded[tiny_layout]
    text_ids = tokenizer(assistant_text("Good morning, how are you?"), return_tensors="pt")["input_ids"][0]
    num_frames = 30  # longer than the text, so streaming runs past the trailing text into tts_pad
    codes = torch.randint(0, 2048, (num_frames, 16), generator=torch.Generator().manual_seed(0))
    captured = _capture_prefill(model, text_ids, language, non_streaming=(layout == "non_streaming"))
    with torch.no_grad():
        speaker_embed = model.talker.get_input_embeddings().weight[SPEAKER_ROW]
        lang_id = language_id_for(model.config.talker_config, language)
        embeds, prefill_len = build_sequence(model, text_ids, codes, speaker_embed, lang_id, layout)
        frames = _frames_from_tables(model.talker, codes)

    prefill = captured["prefill"][0]
    assert prefill_len == prefill.shape[0]
    torch.testing.assert_close(embeds[:prefill_len], prefill, rtol=0, atol=1e-6)
    # After the prefill, generate feeds frame j plus trailing_text_hidden[j] (tts_pad once it runs out).
    trailing = captured["trailing"][0]
    expected = torch.cat([trailing, captured["pad"][0].expand(num_frames, -1)])[:num_frames]
    torch.testing.assert_close(embeds[prefill_len:] - frames, expected, rtol=0, atol=1e-5)
    if language == "english":
        assert lang_id == model.config.talker_config.codec_language_id["english"]
    else:
        assert lang_id is None


def _toy_batch(tokenizer, lengths=(7, 4)):
    gen = torch.Generator().manual_seed(1)
    texts = ["The coffee is too hot.", "Habari."]
    text_ids = [tokenizer(assistant_text(t), return_tensors="pt")["input_ids"][0] for t in texts]
    codes = [torch.randint(0, 2048, (n, 16), generator=gen) for n in lengths]
    return text_ids, codes


@pytest.mark.parametrize("tiny_layout", ["equal", "wide_text"])
@pytest.mark.parametrize("layout", ["non_streaming", "streaming", "mixed"])
def test_batch_rows_equal_each_utterance_built_alone(loaded, tiny_layout, layout):
    """The batch is built by gathering into index grids; each row must be exactly its utterance built alone (which
    the test above ties to generate), whatever its neighbours' lengths, languages and (TRAINING_LAYOUT=mixed) text
    layouts, and zero past its end."""
    model, tokenizer = loaded[tiny_layout]
    texts = ["The coffee is too hot.", "Habari.", "Good morning, how are you today, my friend?", "Yes."]
    text_ids = [tokenizer(assistant_text(t), return_tensors="pt")["input_ids"][0] for t in texts]
    gen = torch.Generator().manual_seed(3)
    codes = [torch.randint(0, 2048, (n, 16), generator=gen) for n in (7, 12, 2, 5)]
    speakers = torch.randn(4, model.config.talker_config.hidden_size, generator=gen)
    languages = [None, 2050, 2050, None]
    layouts = ["non_streaming", "streaming", "streaming", "non_streaming"] if layout == "mixed" else [layout] * 4
    with torch.no_grad():
        batch = build_talker_inputs(
            model, text_ids, codes, speakers, languages, layouts if layout == "mixed" else layout
        )
        # The codec head scores exactly the positions that hold a target, in frame order then EOS.
        labelled = (batch.labels != IGNORE_INDEX).nonzero()  # (N + B, 2), row-major
        order = torch.argsort(batch.label_batch * batch.labels.shape[1] + batch.label_position)
        assert torch.equal(torch.stack([batch.label_batch, batch.label_position], dim=1)[order], labelled)
        for b in range(4):
            alone = build_talker_inputs(
                model, text_ids[b : b + 1], codes[b : b + 1], speakers[b : b + 1], [languages[b]], layouts[b]
            )
            length = alone.inputs_embeds.shape[1]
            torch.testing.assert_close(batch.inputs_embeds[b, :length], alone.inputs_embeds[0], rtol=0, atol=1e-6)
            assert not batch.inputs_embeds[b, length:].any()
            assert torch.equal(batch.labels[b, :length], alone.labels[0])
            assert (batch.labels[b, length:] == IGNORE_INDEX).all()
            assert int(batch.attention_mask[b].sum()) == length
            rows = batch.frame_batch == b
            assert torch.equal(batch.frame_position[rows], alone.frame_position)
            assert torch.equal(batch.frame_codes[rows], codes[b])
            torch.testing.assert_close(batch.frame_codebook_embeds[rows], alone.frame_codebook_embeds, rtol=0, atol=0)


def test_a_step_calls_each_embedding_table_once(loaded):
    """One lookup per table per step (text, codec, the 15 code-predictor tables): each call adds a full-size
    gradient in backward, so per-utterance or repeated lookups cost time in proportion to the batch."""
    model, tokenizer = loaded["wide_text"]
    text_ids, codes = _toy_batch(tokenizer, lengths=(6, 3))
    calls: dict[str, int] = {}
    tables = {name: m for name, m in model.talker.named_modules() if isinstance(m, torch.nn.Embedding)}
    handles = [
        m.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
        for name, m in tables.items()
    ]
    step = TalkerStep(model, torch.zeros(2, model.config.talker_config.hidden_size))
    try:
        with torch.no_grad():
            step({"text_ids": text_ids, "codes": codes, "speaker": torch.tensor([0, 1]), "language": ["auto"] * 2})
    finally:
        for handle in handles:
            handle.remove()
    assert len(tables) == 17
    assert calls == {name: 1 for name in tables}


def test_labels_are_codes_shifted_once_and_sub_talker_reads_the_predicting_position(loaded):
    model, tokenizer = loaded["equal"]
    text_ids, codes = _toy_batch(tokenizer)
    eos = model.config.talker_config.codec_eos_token_id
    spk = torch.zeros(2, model.config.talker_config.hidden_size)
    with torch.no_grad():
        inputs = build_talker_inputs(model, text_ids, codes, spk, [None, 2050])
        lengths = inputs.attention_mask.sum(1)
        for b, code in enumerate(codes):
            _, prefill_len = build_sequence(model, text_ids[b], code, spk[b], [None, 2050][b], "non_streaming")
            labels = inputs.labels[b]
            num_frames = code.shape[0]
            # The last prefill position predicts frame 0; frame j's position predicts frame j+1; the last frame EOS.
            assert labels[prefill_len - 1 : prefill_len - 1 + num_frames].tolist() == code[:, 0].tolist()
            assert labels[prefill_len - 1 + num_frames].item() == eos
            assert int((labels != IGNORE_INDEX).sum()) == num_frames + 1
            assert int(lengths[b]) == prefill_len + num_frames
            positions = inputs.frame_position[inputs.frame_batch == b]
            assert positions.tolist() == list(range(prefill_len - 1, prefill_len - 1 + num_frames))
            # The hidden state that predicts code_j0 is where labels == code_j0: the sub-talker reads exactly there.
            assert labels[positions].tolist() == code[:, 0].tolist()

        shifted = shift_labels_once_more(inputs)
        for built in (inputs, shifted):  # the host-side count the loss averages by equals the real targets
            assert built.num_labels == int((built.labels != IGNORE_INDEX).sum())
        # The official recipe's double shift: each position learns the code one frame further ahead.
        _, prefill_len = build_sequence(model, text_ids[0], codes[0], spk[0], None, "non_streaming")
        assert shifted.labels[0, prefill_len - 2].item() == codes[0][0, 0].item()


def test_losses_are_token_means_unaffected_by_padding(loaded):
    model, tokenizer = loaded["wide_text"]
    text_ids, codes = _toy_batch(tokenizer, lengths=(9, 3))
    spk = torch.randn(2, model.config.talker_config.hidden_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        both = talker_forward(model, build_talker_inputs(model, text_ids, codes, spk, [None, None]))
        singles = [
            talker_forward(model, build_talker_inputs(model, [text_ids[b]], [codes[b]], spk[b : b + 1], [None]))
            for b in range(2)
        ]
    codec0 = sum(s.codec0_loss * s.codec0_tokens for s in singles) / sum(s.codec0_tokens for s in singles)
    sub = sum(s.sub_talker_loss * s.sub_talker_tokens for s in singles) / sum(s.sub_talker_tokens for s in singles)
    assert both.codec0_tokens == (9 + 1) + (3 + 1)
    assert both.sub_talker_tokens == (9 + 3) * 15
    torch.testing.assert_close(both.codec0_loss, codec0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(both.sub_talker_loss, sub, rtol=1e-4, atol=1e-5)


def test_sub_talker_logits_match_the_code_predictor_at_generation(loaded):
    """Teacher-forced sub-talker logits equal what the stock code predictor computes when generating a frame."""
    model, tokenizer = loaded["wide_text"]
    text_ids, codes = _toy_batch(tokenizer, lengths=(5,))
    spk = torch.zeros(1, model.config.talker_config.hidden_size)
    with torch.no_grad():
        out = talker_forward(model, build_talker_inputs(model, text_ids[:1], codes[:1], spk, [None]))
        predictor = model.talker.code_predictor
        j = 2
        past_hidden = out.hidden_states[0, out.hidden_states.shape[1] - 5 - 1 + j][None, None]  # (1, 1, D)
        first = model.talker.get_input_embeddings()(codes[0][j : j + 1, :1])  # (1, 1, D)
        result = predictor.generate(
            inputs_embeds=torch.cat([past_hidden, first], dim=1),
            max_new_tokens=15,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            prefix_allowed_tokens_fn=lambda batch_id, ids: (
                [int(codes[0][j, ids.shape[-1] + 1])] if ids.shape[-1] < 15 else list(range(2048))
            ),
        )
    # Forcing generation down the trained codes makes every step's raw logits comparable with teacher forcing.
    gen_logits = torch.stack(result.logits, dim=1)[0]  # (15, V)
    torch.testing.assert_close(out.sub_talker_logits[j], gen_logits, rtol=1e-4, atol=1e-4)


def test_speaker_embedding_is_the_norm_matched_mean_over_clips_and_encoder_gets_no_gradient(loaded):
    from finetuning.training.optim import make_optimizer
    from finetuning.training.speakers import clip_xvectors, freeze_speaker_encoder, speaker_embedding

    model, tokenizer = loaded["equal"]
    clip_a, _ = sf.read(VOICES_DIR / "english_speaker.wav", dtype="float32")
    clip_b, _ = sf.read(VOICES_DIR / "swahili_speaker.wav", dtype="float32")
    row = speaker_embedding(model, [clip_a, clip_b])
    each = [model.extract_speaker_embedding(c, 24000).float() for c in (clip_a, clip_b)]  # stock, one clip each
    torch.testing.assert_close(clip_xvectors(model, [clip_a, clip_b]), torch.stack(each))
    assert not torch.allclose(each[0], each[1])
    mean = (each[0] + each[1]) / 2
    torch.testing.assert_close(row / row.norm(), mean / mean.norm())  # the mean's direction ...
    torch.testing.assert_close(row.norm(), (each[0].norm() + each[1].norm()) / 2)  # ... at one clip's length
    assert mean.norm() < row.norm()
    torch.testing.assert_close(speaker_embedding(model, [clip_a]), each[0])
    # In bfloat16, as stock computes x-vectors for a bfloat16 checkpoint; the training model stays float32.
    half = clip_xvectors(model, [clip_a], torch.bfloat16)
    assert half.dtype == torch.bfloat16 and next(model.speaker_encoder.parameters()).dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(half.float(), each[0][None]).item() > 0.99
    with pytest.raises(ValueError, match="at least one"):
        speaker_embedding(model, [])

    freeze_speaker_encoder(model)
    before = {k: v.clone() for k, v in model.speaker_encoder.state_dict().items()}
    optimizer = make_optimizer(model, _settings_stub())
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not any(id(p) in optimized for p in model.speaker_encoder.parameters())
    text_ids, codes = _toy_batch(tokenizer)
    step = TalkerStep(model, torch.stack([mean, mean]))
    model.train()
    batch = {"text_ids": text_ids, "codes": codes, "speaker": torch.tensor([0, 1]), "language": ["english", "auto"]}
    for _ in range(2):
        loss, _ = step(batch)
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in model.speaker_encoder.parameters())
        assert model.talker.codec_head.weight.grad is not None
        optimizer.step()
    model.eval()
    after = model.speaker_encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model.speaker_encoder.training


def _settings_stub():
    from finetuning.settings import load_settings

    return load_settings(None, environ={}, overrides={"LEARNING_RATE": "1e-4", "WEIGHT_DECAY": "0.1"})


def test_codebook0_loss_normalises_over_the_ids_generation_can_emit(loaded):
    """Stock generation suppresses the last 1024 codec ids except EOS; the loss gives them no probability mass:
    it equals a cross-entropy over the allowed ids alone, whatever the suppressed logits are."""
    import torch.nn.functional as F

    model, tokenizer = loaded["equal"]
    tcfg = model.config.talker_config
    text_ids, codes = _toy_batch(tokenizer)
    speakers = torch.zeros(2, tcfg.hidden_size)
    with torch.no_grad():
        inputs = build_talker_inputs(model, text_ids, codes, speakers, [None, 2050])
        out = talker_forward(model, inputs)
        hidden = out.hidden_states[inputs.label_batch, inputs.label_position]
        raw = model.talker.codec_head(hidden).float()  # (N + B, V)
    ids = torch.arange(tcfg.vocab_size)
    allowed = (ids < tcfg.vocab_size - 1024) | (ids == tcfg.codec_eos_token_id)
    assert int(allowed.sum()) == 2049  # 2048 codes and EOS, as in stock generate's suppress_tokens
    targets = out.label_targets
    assert (targets == tcfg.codec_eos_token_id).sum() == 2
    remapped = torch.cumsum(allowed.long(), 0)[targets] - 1  # each target's column among the allowed ids
    expected = F.cross_entropy(raw[:, allowed], remapped)
    torch.testing.assert_close(out.codec0_loss, expected)
    assert not torch.isclose(out.codec0_loss, F.cross_entropy(raw, targets))  # the whole vocabulary differs
    assert torch.isinf(out.label_logits[:, ~allowed]).all() and torch.isfinite(out.label_logits[:, allowed]).all()


def test_unknown_layout_is_rejected(loaded):
    model, _ = loaded["equal"]
    with pytest.raises(ValueError, match="unknown layout"):
        TalkerStep(model, torch.zeros(1, 4), layout="interleaved")


def test_frame_embedding_sums_all_codebooks(loaded):
    model, _ = loaded["equal"]
    codes = torch.randint(0, 2048, (6, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        summed = frame_embeddings(model.talker, codes)
        expected = _frames_from_tables(model.talker, codes)
        torch.testing.assert_close(summed, expected, rtol=0, atol=1e-6)
        codes[0, 9] = (codes[0, 9] + 1) % 2048  # codebook 10 alone changes by its table's row difference
        table = model.talker.code_predictor.get_input_embeddings()[8].weight
        moved = frame_embeddings(model.talker, codes)[0] - summed[0]
        torch.testing.assert_close(moved, table[codes[0, 9]] - table[codes[0, 9] - 1], rtol=0, atol=1e-6)
    assert np.isfinite(summed.numpy()).all()


def test_speaker_rows_must_fit_the_vocabulary():
    from finetuning.training.export import ExportError, speaker_rows

    assert speaker_rows(["Alice", "bob"], 3072) == {"alice": 3000, "bob": 3001}
    with pytest.raises(ExportError, match="vocabulary"):
        speaker_rows([f"s{i}" for i in range(80)], 3072)
    with pytest.raises(ExportError, match="ignoring case"):
        speaker_rows(["Alice", "alice"], 3072)
