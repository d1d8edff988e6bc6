"""Instruction and voice-design layouts: the batch builder builds exactly what stock generation prefills.

Stock ``generate_custom_voice(instruct=...)`` and ``generate_voice_design(instruct=...)`` tokenize the whole user
turn ``<|im_start|>user\\n{instruct}<|im_end|>\\n`` and pass it to ``Qwen3TTSForConditionalGeneration.generate`` as
``instruct_ids`` (custom voice with a speaker, voice design with none). The prefill is captured from that call
(the 0.6B-like ``wide_text`` layout too, whose ``generate_custom_voice`` drops the instruction before it), and the
builder must give the same prefill and the same per-frame feedback, both tiny layouts, both text layouts.
"""

import pytest
import torch

from finetuning.training.layout import instruct_text
from finetuning.training.step import IGNORE_INDEX, assistant_text, build_talker_inputs, language_id_for

TEXT = "Good morning, how are you?"
INSTRUCT = "Speak slowly, in a whisper."
SPEAKER, SPEAKER_ROW = "alice", 3000


@pytest.fixture(scope="module")
def wrappers(tiny_model_dirs):
    import qwen_tts

    out = {}
    for layout, path in tiny_model_dirs.items():
        wrapper = qwen_tts.Qwen3TTSModel.from_pretrained(str(path), dtype=torch.float32)
        wrapper.model.eval()
        wrapper.model.config.talker_config.spk_id = {SPEAKER: SPEAKER_ROW}
        wrapper.model.config.talker_config.spk_is_dialect = {SPEAKER: False}
        out[layout] = wrapper
    return out


def _capture(wrapper, text_ids, instruct_ids, speaker, language, non_streaming):
    """The talker's prefill kwargs of stock generate, called as generate_custom_voice / generate_voice_design call
    it (``speakers=None`` for voice design)."""
    captured = {}

    def hook(module, args, kwargs):
        if "prefill" not in captured:
            captured["prefill"] = kwargs["inputs_embeds"].detach().clone()
            captured["trailing"] = kwargs["trailing_text_hidden"].detach().clone()
            captured["pad"] = kwargs["tts_pad_embed"].detach().clone()

    handle = wrapper.model.talker.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        wrapper.model.generate(
            input_ids=[text_ids[None]],
            instruct_ids=[instruct_ids[None]],
            languages=[language],
            speakers=None if speaker is None else [speaker],
            non_streaming_mode=non_streaming,
            do_sample=False,
            subtalker_dosample=False,
            max_new_tokens=3,
        )
    finally:
        handle.remove()
    return captured


@pytest.mark.parametrize("tiny_layout", ["equal", "wide_text"])
@pytest.mark.parametrize("layout", ["non_streaming", "streaming"])
@pytest.mark.parametrize("mode", ["custom_voice", "voice_design"])
def test_instructed_sequence_equals_stock_prefill(wrappers, tiny_layout, layout, mode):
    wrapper = wrappers[tiny_layout]
    model, tokenizer = wrapper.model, wrapper.processor.tokenizer
    # what stock tokenizes for instruct= (the whole user turn, nothing sliced off)
    stock_instruct = wrapper._tokenize_texts([wrapper._build_instruct_text(INSTRUCT)])[0][0]
    instruct_ids = tokenizer(instruct_text(INSTRUCT), return_tensors="pt")["input_ids"][0]
    assert torch.equal(instruct_ids, stock_instruct)
    text_ids = tokenizer(assistant_text(TEXT), return_tensors="pt")["input_ids"][0]
    num_frames = 30
    codes = torch.randint(0, 2048, (num_frames, 16), generator=torch.Generator().manual_seed(0))
    speaker = SPEAKER if mode == "custom_voice" else None
    captured = _capture(wrapper, text_ids, instruct_ids, speaker, "english", layout == "non_streaming")
    with torch.no_grad():
        speaker_embeds = model.talker.get_input_embeddings().weight[SPEAKER_ROW][None] if speaker else None
        lang = language_id_for(model.config.talker_config, "english")
        inputs = build_talker_inputs(
            model, [text_ids], [codes], speaker_embeds, [lang], layout, instruct_ids=[instruct_ids]
        )
        plain = build_talker_inputs(model, [text_ids], [codes], speaker_embeds, [lang], layout)
    embeds, prefill_len = inputs.inputs_embeds[0], int(inputs.frame_position[0]) + 1
    prefill = captured["prefill"][0]
    assert prefill_len == prefill.shape[0]
    torch.testing.assert_close(embeds[:prefill_len], prefill, rtol=0, atol=1e-6)
    trailing = captured["trailing"][0]
    expected = torch.cat([trailing, captured["pad"][0].expand(num_frames, -1)])[:num_frames]
    with torch.no_grad():
        frames = inputs.frame_codebook_embeds.sum(dim=1)
    torch.testing.assert_close(embeds[prefill_len:] - frames, expected, rtol=0, atol=1e-5)
    # The instruction shifts everything after it by its length; labels move with it.
    shift = instruct_ids.numel()
    assert torch.equal(inputs.frame_position, plain.frame_position + shift)
    assert torch.equal(inputs.labels[0, shift:], plain.labels[0])
    assert (inputs.labels[0, :shift] == IGNORE_INDEX).all()
    torch.testing.assert_close(inputs.inputs_embeds[0, shift:], plain.inputs_embeds[0], rtol=0, atol=1e-6)


def test_a_batch_mixing_instructions_equals_each_utterance_alone(wrappers):
    """Per-utterance heads: a batch with and without instructions (and an ICL reference) gives each row exactly
    its utterance built alone."""
    wrapper = wrappers["equal"]
    model, tokenizer = wrapper.model, wrapper.processor.tokenizer
    ids = [tokenizer(assistant_text(t), return_tensors="pt")["input_ids"][0] for t in ("Yes.", TEXT, "Habari.")]
    instructs = [tokenizer(instruct_text(INSTRUCT), return_tensors="pt")["input_ids"][0], None]
    instructs.append(tokenizer(instruct_text("Angry."), return_tensors="pt")["input_ids"][0])
    gen = torch.Generator().manual_seed(2)
    codes = [torch.randint(0, 2048, (n, 16), generator=gen) for n in (5, 9, 3)]
    ref_text = [None, None, ids[0][3:-5]]
    ref_codes = [None, None, torch.randint(0, 2048, (4, 16), generator=gen)]
    speakers = torch.randn(3, model.config.talker_config.hidden_size, generator=gen)
    layouts = ["non_streaming", "streaming", "streaming"]
    with torch.no_grad():
        batch = build_talker_inputs(
            model, ids, codes, speakers, [None, 2050, None], layouts, ref_text, ref_codes, instructs
        )
        for b in range(3):
            alone = build_talker_inputs(
                model, ids[b : b + 1], codes[b : b + 1], speakers[b : b + 1], [[None, 2050, None][b]], layouts[b],
                ref_text[b : b + 1], ref_codes[b : b + 1], instructs[b : b + 1],
            )  # fmt: skip
            length = alone.inputs_embeds.shape[1]
            torch.testing.assert_close(batch.inputs_embeds[b, :length], alone.inputs_embeds[0], rtol=0, atol=1e-6)
            assert torch.equal(batch.labels[b, :length], alone.labels[0])
            assert torch.equal(batch.frame_position[batch.frame_batch == b], alone.frame_position)
