"""Voice-clone layouts: the training step builds exactly what stock ``generate_voice_clone`` builds.

For a reference clip and its transcript, stock ``create_voice_clone_prompt`` gives the reference codes and x-vector;
``generate_voice_clone`` then prefills the talker. The batch builder, given the same codes, x-vector and the
reference transcript's content ids (as training takes them from the prepared dataset), must produce the same
prefill and the same per-frame feedback, in x-vector mode and in ICL mode, for both tiny layouts and both
generation layouts (the streaming ICL layout with a reference transcript both longer and shorter than its codes).
"""

import pytest
import torch
from conftest import speechlike

from finetuning.training.layout import ROLE_TOKENS, SUFFIX_TOKENS
from finetuning.training.step import (
    IGNORE_INDEX,
    assistant_text,
    build_talker_inputs,
    language_id_for,
)

TEXT = "Good morning, how are you?"
REF_TEXT = "Habari ya asubuhi, rafiki yangu."


@pytest.fixture(scope="module")
def wrappers(tiny_model_dirs):
    import qwen_tts

    return {
        layout: qwen_tts.Qwen3TTSModel.from_pretrained(str(path), dtype=torch.float32)
        for layout, path in tiny_model_dirs.items()
    }


def reference_content_ids(tokenizer, text: str) -> torch.Tensor:
    """The content ids of a clip's transcript as training has them (its assistant text without role and suffix)."""
    ids = tokenizer(assistant_text(text), return_tensors="pt")["input_ids"][0]
    return ids[ROLE_TOKENS:-SUFFIX_TOKENS]


def _capture_clone_prefill(wrapper, prompt, language, non_streaming):
    captured = {}

    def hook(module, args, kwargs):
        if "prefill" not in captured:
            captured["prefill"] = kwargs["inputs_embeds"].detach().clone()
            captured["trailing"] = kwargs["trailing_text_hidden"].detach().clone()
            captured["pad"] = kwargs["tts_pad_embed"].detach().clone()

    handle = wrapper.model.talker.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        wrapper.generate_voice_clone(
            text=TEXT,
            language=language,
            voice_clone_prompt=prompt,
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
@pytest.mark.parametrize(("mode", "ref_duration_s"), [("x_vector", 1.0), ("icl", 0.4), ("icl", 2.0)])
def test_built_clone_sequence_equals_generate_voice_clone(wrappers, tiny_layout, layout, mode, ref_duration_s):
    wrapper = wrappers[tiny_layout]
    model, tokenizer = wrapper.model, wrapper.processor.tokenizer
    x_vector_only = mode == "x_vector"
    reference = (speechlike(ref_duration_s, seed=4), 24000)
    [item] = wrapper.create_voice_clone_prompt(ref_audio=reference, ref_text=REF_TEXT, x_vector_only_mode=x_vector_only)
    captured = _capture_clone_prefill(wrapper, [item], "english", non_streaming=layout == "non_streaming")

    text_ids = tokenizer(assistant_text(TEXT), return_tensors="pt")["input_ids"][0]
    num_frames = 40  # longer than every text here: streaming runs past the trailing text into tts_pad
    codes = torch.randint(0, 2048, (num_frames, 16), generator=torch.Generator().manual_seed(0))
    ref_text_ids = None if x_vector_only else [reference_content_ids(tokenizer, REF_TEXT)]
    ref_codes = None if x_vector_only else [item.ref_code]
    if not x_vector_only:  # the case this parameter stands for: reference text longer or shorter than its codes
        text_longer = (
            ref_text_ids[0].numel() + text_ids.numel() - ROLE_TOKENS - SUFFIX_TOKENS + 1 > len(item.ref_code) + 1
        )
        assert text_longer == (ref_duration_s < 1)
    with torch.no_grad():
        inputs = build_talker_inputs(
            model,
            [text_ids],
            [codes],
            item.ref_spk_embedding[None].float(),
            [language_id_for(model.config.talker_config, "english")],
            layout,
            ref_text_ids=ref_text_ids,
            ref_codes=ref_codes,
        )
        # what generate feeds back per frame, from the tables: codebook 0's talker row + codebook k's predictor row
        frames = model.talker.get_input_embeddings().weight[codes[:, 0]].clone()
        for k, table in enumerate(model.talker.code_predictor.get_input_embeddings(), start=1):
            frames += table.weight[codes[:, k]]

    embeds, prefill_len = inputs.inputs_embeds[0], int(inputs.frame_position[0]) + 1
    prefill = captured["prefill"][0]
    assert prefill_len == prefill.shape[0]
    torch.testing.assert_close(embeds[:prefill_len], prefill, rtol=0, atol=1e-6)
    trailing = captured["trailing"][0]
    expected = torch.cat([trailing, captured["pad"][0].expand(num_frames, -1)])[:num_frames]
    torch.testing.assert_close(embeds[prefill_len:] - frames, expected, rtol=0, atol=1e-5)
    # Only the utterance's own frames and EOS are targets; the sub-talker sees only them.
    labels = inputs.labels[0]
    assert torch.equal(labels[labels != IGNORE_INDEX][:-1], codes[:, 0])
    assert inputs.num_labels == num_frames + 1 and torch.equal(inputs.frame_codes, codes)
    assert torch.equal(inputs.frame_position, torch.arange(num_frames) + prefill_len - 1)


def test_a_batch_mixing_modes_equals_each_utterance_alone(wrappers):
    """Custom-voice / x-vector rows and ICL rows side by side: each row is exactly its utterance built alone."""
    wrapper = wrappers["equal"]
    model, tokenizer = wrapper.model, wrapper.processor.tokenizer
    gen = torch.Generator().manual_seed(5)
    texts = ["The coffee is too hot.", "Habari.", "Yes."]
    text_ids = [tokenizer(assistant_text(t), return_tensors="pt")["input_ids"][0] for t in texts]
    codes = [torch.randint(0, 2048, (n, 16), generator=gen) for n in (7, 12, 3)]
    ref_text_ids = [reference_content_ids(tokenizer, "Karibu sana."), None, reference_content_ids(tokenizer, "Hi.")]
    ref_codes = [torch.randint(0, 2048, (n, 16), generator=gen) for n in (4, 1, 9)]
    ref_codes[1] = None
    speakers = torch.randn(3, model.config.talker_config.hidden_size, generator=gen)
    languages = [None, 2050, None]
    with torch.no_grad():
        batch = build_talker_inputs(model, text_ids, codes, speakers, languages, "streaming", ref_text_ids, ref_codes)
        # The codec head scores exactly the positions that hold a target, in frame order then EOS.
        labelled = (batch.labels != IGNORE_INDEX).nonzero()  # (N + B, 2), row-major
        order = torch.argsort(batch.label_batch * batch.labels.shape[1] + batch.label_position)
        assert torch.equal(torch.stack([batch.label_batch, batch.label_position], dim=1)[order], labelled)
        for b in range(3):
            alone = build_talker_inputs(
                model, text_ids[b : b + 1], codes[b : b + 1], speakers[b : b + 1], languages[b : b + 1],
                "streaming", ref_text_ids[b : b + 1], ref_codes[b : b + 1],
            )  # fmt: skip
            length = alone.inputs_embeds.shape[1]
            torch.testing.assert_close(batch.inputs_embeds[b, :length], alone.inputs_embeds[0], rtol=0, atol=1e-6)
            assert not batch.inputs_embeds[b, length:].any()
            assert torch.equal(batch.labels[b, :length], alone.labels[0])
            rows = batch.frame_batch == b
            assert torch.equal(batch.frame_position[rows], alone.frame_position)
            assert torch.equal(batch.frame_codes[rows], codes[b])
            torch.testing.assert_close(batch.frame_codebook_embeds[rows], alone.frame_codebook_embeds, rtol=0, atol=0)
    with pytest.raises(ValueError, match="both its transcript ids and its codes"):
        build_talker_inputs(model, text_ids[:1], codes[:1], speakers[:1], [None], "streaming", ref_text_ids[:1], None)


def test_the_step_conditions_each_sample_on_its_reference_with_one_lookup_per_table(wrappers):
    """``TalkerStep`` on a voice-clone batch: the speaker slot holds the x-vector row the batch names (not the
    speaker's), ICL references go through the same builder, and every embedding table is still called once."""
    from finetuning.training.step import TalkerStep, talker_forward

    wrapper = wrappers["wide_text"]
    model, tokenizer = wrapper.model, wrapper.processor.tokenizer
    gen = torch.Generator().manual_seed(9)
    text_ids = [tokenizer(assistant_text(t), return_tensors="pt")["input_ids"][0] for t in ("Habari.", "Yes, yes.")]
    codes = [torch.randint(0, 2048, (n, 16), generator=gen) for n in (5, 4)]
    xvectors = torch.randn(6, model.config.talker_config.hidden_size, generator=gen)  # one row per clip
    batch = {
        "text_ids": text_ids,
        "codes": codes,
        "speaker": torch.tensor([0, 1]),
        "language": ["auto", "english"],
        "xvector_row": torch.tensor([4, 2]),
        "xvector": xvectors[[4, 2]],  # gathered by collate from the per-clip table
        "ref_text_ids": [reference_content_ids(tokenizer, "Karibu."), None],
        "ref_codes": [torch.randint(0, 2048, (3, 16), generator=gen), None],
    }
    calls: dict[str, int] = {}
    tables = {name: m for name, m in model.talker.named_modules() if isinstance(m, torch.nn.Embedding)}
    handles = [
        m.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
        for name, m in tables.items()
    ]
    step = TalkerStep(model, xvectors[:0], layout="streaming")  # no per-clip table in the step
    try:
        with torch.no_grad():
            loss, _ = step(batch)
    finally:
        for handle in handles:
            handle.remove()
    assert calls == {name: 1 for name in tables}
    languages = [None, language_id_for(model.config.talker_config, "english")]
    with torch.no_grad():
        expected = build_talker_inputs(
            model, text_ids, codes, xvectors[[4, 2]], languages, "streaming", batch["ref_text_ids"], batch["ref_codes"]
        )
        out = talker_forward(model, expected)
        wrong_rows = build_talker_inputs(
            model, text_ids, codes, xvectors[[0, 1]], languages, "streaming", batch["ref_text_ids"], batch["ref_codes"]
        )
        wrong = talker_forward(model, wrong_rows)
    torch.testing.assert_close(loss, out.codec0_loss + 0.3 * out.sub_talker_loss, rtol=0, atol=0)
    assert not torch.equal(loss, wrong.codec0_loss + 0.3 * wrong.sub_talker_loss)
