"""Export: a sharded base model's own weight files never reach the checkpoint, which loads in stock qwen_tts; weights
a diverged run leaves behind are refused, and an earlier export survives the refusal."""

import hashlib
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from finetuning.training.export import ExportError, export_checkpoint

SHARDS = (
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
    "model.safetensors.index.json",
    "pytorch_model-00001-of-00002.bin",
    "pytorch_model.bin.index.json",
)


def test_sharded_base_weights_are_never_copied(tiny_model_dir, tmp_path):
    import qwen_tts

    base = tmp_path / "sharded_base"
    shutil.copytree(tiny_model_dir, base)
    for name in SHARDS:
        (base / name).write_text("old weights")
    model = qwen_tts.Qwen3TTSModel.from_pretrained(str(tiny_model_dir), dtype=torch.float32).model
    embeds = torch.randn(1, model.config.talker_config.hidden_size)
    out = export_checkpoint(model, base, ["english_speaker"], embeds, {}, tmp_path / "export")
    assert not [name for name in SHARDS if (out / name).exists()]
    assert (out / "model.safetensors").exists() and (out / "speech_tokenizer" / "model.safetensors").exists()
    loaded = qwen_tts.Qwen3TTSModel.from_pretrained(str(out), dtype=torch.float32)
    assert loaded.get_supported_speakers() == ["english_speaker"]


def test_export_refuses_non_finite_weights_and_keeps_the_previous_export(tmp_path, tiny_model_dir):
    state = load_file(str(tiny_model_dir / "model.safetensors"))  # the tiny Base model's real weights
    embedding = state["talker.model.codec_embedding.weight"]  # (vocab, D)
    speaker_embeds = torch.zeros(1, embedding.shape[1])  # (S=1, D)
    output = tmp_path / "model"
    export_checkpoint(None, tiny_model_dir, ["spk"], speaker_embeds, {}, output, state_dict=state)
    exported = (output / "model.safetensors").read_bytes()

    name = next(k for k, v in state.items() if v.is_floating_point() and not k.startswith("speaker_encoder."))
    state[name] = state[name].clone()
    state[name].view(-1)[0] = float("inf")
    with pytest.raises(ExportError, match=f"NaN or infinite values \\(first: {name}\\).*LEARNING_RATE"):
        export_checkpoint(None, tiny_model_dir, ["spk"], speaker_embeds, {}, output, state_dict=state)
    assert (output / "model.safetensors").read_bytes() == exported
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no half-written staging folder left


def _hashes(folder):
    files = [p for p in folder.rglob("*") if p.is_file()]
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_in_training_exports_never_write_into_an_earlier_export_they_train_from(tmp_path, tiny_model_dir):
    """INIT_MODEL_PATH is an earlier export (a voice-clone export: a Base model with settings, info and a LoRA
    adapter folder); a LoRA run with in-training evaluation exports (base files hard-linked) every step. Every
    file of the earlier export is byte-identical afterwards."""
    import qwen_tts
    from conftest import make_settings

    from finetuning.preparation.prepare import prepare_dataset
    from finetuning.training.loop import train

    model = qwen_tts.Qwen3TTSModel.from_pretrained(str(tiny_model_dir), dtype=torch.float32).model
    earlier_settings = make_settings(tmp_path / "earlier_run", tiny_model_dir)

    def write_adapter(folder):
        (folder / "adapter").mkdir()
        (folder / "adapter" / "adapter_config.json").write_text('{"r": 4}')

    earlier = export_checkpoint(
        model, tiny_model_dir, ["english_speaker"], torch.zeros(1, 1), {}, tmp_path / "earlier",
        settings=earlier_settings, write_extra=write_adapter, speaker_encoder=model.speaker_encoder,
    )  # fmt: skip
    before = _hashes(earlier)
    assert {"finetune_info.json", "training_settings.json", "adapter/adapter_config.json"} <= set(before)

    values = {"TRAIN_SPEAKERS": "english_speaker", "VALIDATION_FRACTION": 0.0, "MAX_STEPS": 2, "SAVE_STEPS": 0}
    values.update({"GRADIENT_ACCUMULATION_STEPS": 1, "EVAL_STEPS": 0, "REPORT_TO": "none", "EVAL_GENERATE_STEPS": 1})
    values.update({"FINETUNE_METHOD": "lora", "LORA_RANK": 2, "USE_AUXILIARY_LOSSES": "false"})
    settings = make_settings(tmp_path, earlier, **values)
    prepare_dataset(settings, max_samples=2, report=lambda _: None)
    exported = []
    train(settings, on_export=lambda folder, step, _: exported.append((step, _hashes(folder))))
    assert [step for step, _ in exported] == [1, 2]  # the step-1 export in eval_checkpoint/, the final one
    assert "adapter/adapter_config.json" in exported[0][1]
    assert exported[0][1]["finetune_info.json"] != before["finetune_info.json"]
    assert _hashes(earlier) == before
    # no local path leaves the machine in an export: settings, info and the adapter config name the base by name
    for export in (earlier, settings.export_dir):
        for path in export.rglob("*.json"):
            assert str(tmp_path) not in path.read_text(), path
    assert json.loads((settings.export_dir / "finetune_info.json").read_text())["base_model"] == "<local>/earlier"
