"""The released 0.6B / 1.7B Base architectures, built on the meta device from their published config values."""

import pytest

from finetuning.published_models import (
    PUBLISHED_PARAMETERS,
    WIDTHS,
    build_on_meta,
    model_config,
    published_config,
)


@pytest.mark.parametrize("hub_id", sorted(WIDTHS))
def test_meta_build_has_exactly_the_published_parameter_count(hub_id):
    model = build_on_meta(published_config(hub_id))
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMETERS[hub_id]
    talker = model.config.talker_config
    assert (talker.num_hidden_layers, talker.num_attention_heads, talker.num_key_value_heads) == (28, 16, 8)
    assert model.talker.model.layers[0].self_attn.q_proj.out_features == 16 * 128  # head_dim 128, not width / heads


def test_model_config_reads_a_folder_and_names_the_known_ids(tiny_model_dir, tmp_path):
    assert (
        model_config(tiny_model_dir)["talker_config"]["hidden_size"]
        == model_config(tiny_model_dir / "config.json")["talker_config"]["hidden_size"]
    )
    with pytest.raises(FileNotFoundError, match="Qwen/Qwen3-TTS-12Hz-1.7B-Base"):
        model_config(tmp_path / "nothing")
