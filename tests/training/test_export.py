"""Export of a sharded base model: none of its own weight files reach the checkpoint, which loads in stock qwen_tts."""

import shutil

import torch

from finetuning.training.export import export_checkpoint

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
