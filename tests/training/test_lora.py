"""LoRA fine-tuning (FINETUNE_METHOD=lora): overfit -> merged export -> stock generate, what trains, the merge.

The overfit runs are those of ``test_train`` (real loop, two speakers x two utterances, one sentence said by
both) with adapters instead of full fine-tuning; the merged export must give back the trained codes under greedy
stock ``generate_custom_voice`` with the same teacher-forced margin floor. The final training state of each run
(the adapted model before any merge) shows that only adapters and the fully trained codec heads and embeddings
changed.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import OVERFIT_STEPS, SPEAKERS, LazyRuns, _train, assert_reproduces_every_speaker

from finetuning.training.checkpointing import saved_states
from finetuning.training.export import INFO_FILE
from finetuning.training.lora import ADAPTER_DIR, LoraError, apply_lora, trainable_summary

LORA_STEPS = OVERFIT_STEPS
# Default LoRA settings (rank 16 of the tiny model's 24-64 wide layers, codec heads and embeddings fully trained) at
# the overfit runs' learning rate; half the steps (150, at a learning rate of 1e-2) leave sub-talker margins of 0.1.
LORA_SETTINGS = dict(FINETUNE_METHOD="lora", SAVE_STEPS=LORA_STEPS)  # the final state: weights before the merge
# Merged weights compute W x + s B (A x) as (W + s B A) x: float32 rounding differs by ~1e-6 relative.
MERGE_LOGIT_ATOL = 1e-4


@pytest.fixture(scope="module")
def lora_runs(tiny_model_dirs, tmp_path_factory):
    """Both tiny layouts, each trained with LoRA through the real loop: the 1.7B-like one in non-streaming mode,
    the 0.6B-like one (text width != talker width) in both layouts (the default, TRAINING_LAYOUT=mixed), whose
    export claims every generate_custom_voice call, as full fine-tuning's does."""

    def make(case):
        return _train(tmp_path_factory, tiny_model_dirs[case[0]], case[1], steps=LORA_STEPS, **LORA_SETTINGS)

    return LazyRuns(make)


@pytest.mark.slow
@pytest.mark.parametrize("case", [("equal", "non_streaming"), ("wide_text", "mixed")], ids="-".join)
def test_lora_overfit_then_generate_reproduces_every_speaker(lora_runs, case, margin_log):
    settings, result = lora_runs[case]
    assert result.optimizer_steps == LORA_STEPS and result.skipped_steps == 0
    model = assert_reproduces_every_speaker(settings, result, margin_log, f"lora-{'-'.join(case)}")
    info = json.loads((result.export_dir / INFO_FILE).read_text())
    assert info["finetune_method"] == "lora"
    assert sorted(model.get_supported_speakers()) == sorted(SPEAKERS)


def _final_state(settings) -> dict[str, torch.Tensor]:
    """The adapted model's weights at the end of training (accelerate state; keys as in the model)."""
    state = load_file(str(saved_states(settings.OUTPUT_DIR)[-1] / "model.safetensors"))
    return {name.removeprefix("model."): tensor for name, tensor in state.items()}


@pytest.mark.slow
def test_only_adapters_and_listed_modules_change(lora_runs):
    settings, result = lora_runs[("equal", "non_streaming")]
    base = load_file(str(Path(settings.INIT_MODEL_PATH) / "model.safetensors"))
    trained = _final_state(settings)
    adapters = {n for n in trained if ".lora_" in n}
    for name, tensor in trained.items():
        if name in adapters:
            continue
        base_name = name.replace(".base_layer.", ".").replace(".original_module.", ".")
        same = torch.equal(tensor, base[base_name.replace(".modules_to_save.default.", ".")])
        if ".modules_to_save." in name:
            assert not same, f"{name}: a listed module must train"
        else:
            assert same, f"{name}: a frozen base weight changed"
    lora_b = [n for n in adapters if n.endswith(".lora_B.default.weight")]
    assert lora_b and all(trained[n].abs().max() > 0 for n in lora_b)  # B starts at zero: every adapter trained
    adapted = {n.removesuffix(".lora_B.default.weight") for n in lora_b}
    assert {n.split(".")[-1] for n in adapted} == set(settings.LORA_TARGETS)
    assert all(n.startswith("talker.") for n in adapted)
    listed = {n for n in trained if ".modules_to_save." in n}
    assert {n.split(".modules_to_save.")[0] for n in listed} >= {"talker.codec_head", "talker.model.codec_embedding"}
    assert any(".lm_head." in n for n in listed) and any("code_predictor.model.codec_embedding." in n for n in listed)


def _logits(model, tokenizer, row, speaker_embed, layout):
    from finetuning.training.step import assistant_text, build_talker_inputs, language_id_for, talker_forward

    tcfg = model.config.talker_config
    text_ids = tokenizer(assistant_text(row["text"]), return_tensors="pt")["input_ids"][0]
    with torch.no_grad():
        inputs = build_talker_inputs(
            model,
            [text_ids],
            [row["audio_codes"]],
            speaker_embed[None],
            [language_id_for(tcfg, row["language"])],
            layout=layout,
        )
        out = talker_forward(model, inputs)
    return out.label_logits, out.sub_talker_logits


@pytest.mark.slow
def test_merged_export_equals_the_adapter_model(lora_runs):
    """The stock-loaded merged export, the adapter model (Base + ``adapter/`` through peft) and peft's own
    ``merge_and_unload`` give the same logits (MERGE_LOGIT_ATOL); speaker rows survive the merge."""
    import qwen_tts
    from peft import PeftModel
    from test_train import _trained_rows

    settings, result = lora_runs[("equal", "non_streaming")]
    export = qwen_tts.Qwen3TTSModel.from_pretrained(str(result.export_dir))
    base = qwen_tts.Qwen3TTSModel.from_pretrained(settings.INIT_MODEL_PATH, dtype=torch.float32)
    tokenizer = base.processor.tokenizer
    adapted = PeftModel.from_pretrained(base.model, str(result.export_dir / ADAPTER_DIR)).eval()
    assert json.loads((result.export_dir / ADAPTER_DIR / "adapter_config.json").read_text())["r"] == 16
    tcfg = export.model.config.talker_config
    for row in _trained_rows(settings)[:2]:
        speaker = export.model.talker.get_input_embeddings().weight[tcfg.spk_id[row["speaker"]]].detach()
        merged = _logits(export.model, tokenizer, row, speaker, settings.TRAINING_LAYOUT)
        with_adapter = _logits(adapted.base_model.model, tokenizer, row, speaker, settings.TRAINING_LAYOUT)
        for a, b in zip(merged, with_adapter, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=MERGE_LOGIT_ATOL)
    peft_merged = adapted.merge_and_unload().state_dict()
    exported = export.model.state_dict()
    for name, tensor in exported.items():
        if name == "talker.model.codec_embedding.weight":  # speaker rows are written after the merge
            rows = list(tcfg.spk_id.values())
            keep = torch.ones(tensor.shape[0], dtype=torch.bool)
            keep[rows] = False
            torch.testing.assert_close(tensor[keep], peft_merged[name][keep], rtol=0, atol=1e-6)
            assert not torch.equal(tensor[rows], peft_merged[name][rows])
        else:
            torch.testing.assert_close(tensor, peft_merged[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.slow
def test_merge_scale_0_gives_the_base_models_logits_and_1_the_trained_export(lora_runs):
    """``merged_state_dict(state, scale)``: at 0 (which LORA_MERGE_SCALE itself refuses) every weight is the Base
    model's, so its logits are the Base model's exactly; at 1 every weight is the merged export's (which
    ``test_merged_export_equals_the_adapter_model`` matches with the adapter model's logits)."""
    import qwen_tts
    from conftest import make_settings
    from test_train import _trained_rows

    from finetuning.constants import FIRST_SPEAKER_ROW
    from finetuning.evaluation.lora_scales import scaled_weights
    from finetuning.settings import SettingsError
    from finetuning.training.lora import LORA_WEIGHT_PARTS, LoraAdapter

    settings, result = lora_runs[("equal", "non_streaming")]
    state = _final_state(settings)
    layers = [name.removesuffix(LORA_WEIGHT_PARTS[0]) for name in state if name.endswith(LORA_WEIGHT_PARTS[0])]
    adapter = LoraAdapter(peft_model=None, scalings=dict.fromkeys(layers, settings.LORA_ALPHA / settings.LORA_RANK))
    base_weights = load_file(str(Path(settings.INIT_MODEL_PATH) / "model.safetensors"))
    at_zero, at_one = adapter.merged_state_dict(state, 0.0), adapter.merged_state_dict(state, 1.0)
    exported = load_file(str(result.export_dir / "model.safetensors"))
    assert set(at_zero) == set(at_one) == set(exported) and set(exported) <= set(base_weights)
    speaker_rows = torch.zeros(exported["talker.model.codec_embedding.weight"].shape[0], dtype=torch.bool)
    speaker_rows[FIRST_SPEAKER_ROW:] = True  # written from the speaker embeddings after the merge
    changed = 0
    for name, tensor in at_one.items():
        expected = exported[name]
        if name == "talker.model.codec_embedding.weight":
            tensor, expected = tensor[~speaker_rows], expected[~speaker_rows]
        assert torch.equal(tensor, expected), name
        assert torch.equal(at_zero[name], base_weights[name]), name
        changed += not torch.equal(at_one[name], base_weights[name])
    assert changed > len(layers)  # adapted layers and fully trained modules moved
    # evaluate.py --lora-scales merges by a straight line from the Base weights to the export: the same weights
    at_half = scaled_weights(exported, base_weights, 0.5, export_scale=1.0)
    for name, tensor in adapter.merged_state_dict(state, 0.5).items():
        if name != "talker.model.codec_embedding.weight":
            torch.testing.assert_close(at_half[name], tensor, rtol=1e-5, atol=1e-6, msg=name)

    wrapper = qwen_tts.Qwen3TTSModel.from_pretrained(settings.INIT_MODEL_PATH, dtype=torch.float32)
    base, tokenizer = wrapper.model.eval(), wrapper.processor.tokenizer
    row = _trained_rows(settings)[0]
    speaker = torch.randn(base.config.talker_config.hidden_size, generator=torch.Generator().manual_seed(0))
    before = _logits(base, tokenizer, row, speaker, "non_streaming")
    missing, unexpected = base.load_state_dict(at_zero, strict=False)
    assert not unexpected and all(name.startswith("speaker_encoder.") for name in missing)
    after = _logits(base, tokenizer, row, speaker, "non_streaming")
    for a, b in zip(before, after, strict=True):
        assert torch.equal(a, b)
    with pytest.raises(SettingsError, match="LORA_MERGE_SCALE"):
        make_settings(Path(settings.OUTPUT_DIR), Path(settings.INIT_MODEL_PATH), LORA_MERGE_SCALE=0)


def test_trainable_share_and_bad_names(tiny_model_dir, tmp_path):
    import qwen_tts
    from conftest import make_settings

    model = qwen_tts.Qwen3TTSModel.from_pretrained(str(tiny_model_dir), dtype=torch.float32).model
    total = sum(p.numel() for p in model.parameters())
    with pytest.raises(LoraError, match="LORA_TARGETS: 'qproj'"):
        apply_lora(model, make_settings(tmp_path, tiny_model_dir, FINETUNE_METHOD="lora", LORA_TARGETS="qproj"))
    with pytest.raises(LoraError, match="LORA_TARGETS and LORA_FULLY_TRAINED"):
        overlap = make_settings(tmp_path, tiny_model_dir, FINETUNE_METHOD="lora", LORA_FULLY_TRAINED="q_proj")
        apply_lora(model, overlap)
    assert apply_lora(model, make_settings(tmp_path, tiny_model_dir)) is None  # FINETUNE_METHOD=full
    lora = apply_lora(model, make_settings(tmp_path, tiny_model_dir, FINETUNE_METHOD="lora", LORA_RANK=2))
    summary = trainable_summary(model)
    heads = sum(p.numel() for n, p in model.named_parameters() if ".modules_to_save." in n)
    adapters = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    assert summary["trainable_parameters"] == heads + adapters
    assert summary["total_parameters"] == total + heads + adapters  # the heads' trained copies sit beside them
    assert summary["optimizer_state_bytes"] == 8 * summary["trainable_parameters"]
    assert lora.scalings and all(s == 32 / 2 for s in lora.scalings.values())  # LORA_ALPHA / LORA_RANK


RESUME_STEPS = 12  # states every SAVE_STEPS (4); the run is killed once step 8's state is complete


@pytest.fixture(scope="module")
def prepared(tiny_model_dir, tmp_path_factory):
    """Four prepared clips of the bundled speakers, as ``test_resume`` trains on."""
    from conftest import make_settings

    from finetuning.preparation.prepare import prepare_dataset

    root = tmp_path_factory.mktemp("lora_resume")
    prepare_dataset(
        make_settings(root, tiny_model_dir, VALIDATION_FRACTION=0.0),
        max_samples=4,
        report=lambda _: None,
    )
    return root, tiny_model_dir


@pytest.mark.slow
def test_hard_killed_lora_run_resumes_to_the_same_weights(prepared, caplog):
    """SIGKILL after a saved state, resume: the merged export and the adapter equal an uninterrupted run's. The
    killed run is a forked copy of this process that kills itself as its third state save begins (step 12's, after
    step 8's is complete); ``test_resume`` kills the real command the same way."""
    import logging

    from conftest import run_killed
    from test_resume import SAVE_STEPS, _env_file

    import finetuning.training.loop as loop
    from finetuning.settings import load_settings

    root, model_dir = prepared
    lora = {"FINETUNE_METHOD": "lora", "LORA_RANK": 4, "MAX_STEPS": RESUME_STEPS, "USE_AUXILIARY_LOSSES": "false"}

    def settings(name, **extra):
        return load_settings(_env_file(root, model_dir, name, **lora, **extra), environ={})

    with caplog.at_level(logging.INFO):
        loop.train(settings("lora_straight"))
    logged = caplog.text
    assert "lora fine-tuning:" in logged and "parameters trainable" in logged and "optimizer state" in logged
    killed_settings = settings("lora_killed", RESUME_FROM="latest")
    killed, _ = run_killed(lambda: loop.train(killed_settings), [(loop, "save_training_state")], kill_at=3)
    assert killed and (root / "lora_killed" / "states" / f"step-{2 * SAVE_STEPS:08d}" / "progress.done").exists()
    assert not (root / "lora_killed" / "model").exists(), "the run finished before it could be killed"
    caplog.clear()
    with caplog.at_level(logging.INFO):
        loop.train(killed_settings)
    assert "resumed from" in caplog.text
    for relative in ("model/model.safetensors", f"model/{ADAPTER_DIR}/adapter_model.safetensors"):
        a, b = load_file(str(root / "lora_straight" / relative)), load_file(str(root / "lora_killed" / relative))
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


def test_auxiliary_loss_gradients_reach_the_adapters(tiny_model_dir, tmp_path):
    """The mel / voice / prosody losses (decoded audio only, no codec loss) train every adapter of the talker and
    the code predictor: B starts at zero, so its gradient is the one that moves an adapter first."""
    import qwen_tts
    from conftest import make_settings

    from finetuning.training.losses import AUX_LOSS_NAMES, AuxiliaryLosses, load_codec_decoder
    from finetuning.training.step import assistant_text, build_talker_inputs, talker_forward

    wrapper = qwen_tts.Qwen3TTSModel.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    model = wrapper.model
    decoder = load_codec_decoder(model, tiny_model_dir)
    apply_lora(model, make_settings(tmp_path, tiny_model_dir, FINETUNE_METHOD="lora"))
    aux = AuxiliaryLosses(decoder, model.speaker_encoder, **{f"{n}_weight": 1.0 for n in AUX_LOSS_NAMES}).train()
    codes = [torch.randint(0, 2048, (n, 16), generator=torch.Generator().manual_seed(n)) for n in (14, 11)]
    text_ids = [wrapper.processor.tokenizer(assistant_text(t), return_tensors="pt")["input_ids"][0] for t in "ab"]
    speakers = torch.zeros(2, model.config.talker_config.hidden_size)
    out = talker_forward(model, build_talker_inputs(model, text_ids, codes, speakers, [None, None]))
    sum(aux(out).values()).backward()
    lora_b = {n: p for n, p in model.named_parameters() if ".lora_B." in n}
    assert any(".code_predictor." in n for n in lora_b) and any(".talker.model.layers." in f".{n}" for n in lora_b)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b.values()), "an adapter got no gradient"
    assert all(p.grad is None for n, p in model.named_parameters() if ".lora_" not in n and not p.requires_grad)
