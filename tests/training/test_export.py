"""Export refuses weights a diverged run leaves behind, and an earlier export survives the refusal."""

import pytest
import torch
from safetensors.torch import load_file

from finetuning.training.export import ExportError, export_checkpoint


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
