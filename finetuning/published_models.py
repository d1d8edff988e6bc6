"""The released Qwen3-TTS 12 Hz Base models' architecture, from their published config values, and a meta build.

No weights and no download: ``published_config(hub_id)`` gives the ``config.json`` fields that shape the model and
``build_on_meta(config)`` builds qwen-tts's own ``Qwen3TTSForConditionalGeneration`` on the meta device (shapes
only, no memory), so parameter counts and memory estimates of the real models can be checked offline.

Sources of the values (no single verbatim copy of the 1.7B ``config.json`` was reachable; every value below is
seen in at least one port or audit of the released checkpoints, and the meta build reproduces the published
parameter counts exactly, which pins every width):

* Dicklesworthstone/franken_tts ``docs/truth-pack/FACT_DISPOSITIONS.md`` (the 0.6B-Base ``config.json`` at HF
  revision 5d83992436eae1d760afd27aff78a71d676296fc), ``docs/truth-pack/PIN_RECORD.md`` (safetensors total
  914,643,008 BF16) and ``crates/ftts-cli/pinned/TENSOR_INVENTORY.json`` (478 tensor shapes);
  docs.rs ``ftts-cli`` ``pinned/model_config.json`` (verbatim 0.6B-Base config excerpt).
* Rust and Swift/MLX ports' test fixtures of the 1.7B-Base talker and code predictor (``parse_main_config``,
  "matching mlx-community/Qwen3-TTS-12Hz-1.7B-Base-bf16"), and the 1.7B HF API count {'BF16': 1928677440}.
* huggingface.co/api/models?author=Qwen&search=TTS: ``numParameters`` 914,643,008 (0.6B-Base) and
  1,928,677,440 (1.7B-Base).

Traps the values avoid: ``head_dim`` and ``text_vocab_size`` are not in ``Qwen3TTSTalkerConfig``'s signature
(without ``head_dim`` the 0.6B talker gets 1024 / 16 = 64 and the wrong size); the codec ids' class defaults
(4196...) and ``rope_scaling=None`` are not the released ones; the 1.7B MLP is 6144 wide (8192, quoted in some
documents, gives about 2.28B parameters).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

MODEL_0_6B = "Qwen/Qwen3-TTS-12Hz-0.6B-Base"
MODEL_1_7B = "Qwen/Qwen3-TTS-12Hz-1.7B-Base"

# Hub numParameters of the released checkpoints (state-dict elements; equal to nn.Parameter elements here).
PUBLISHED_PARAMETERS = {MODEL_0_6B: 914_643_008, MODEL_1_7B: 1_928_677_440}

# Control ids in the talker's codec vocabulary (franken_tts FACT_DISPOSITIONS E-2; rust port parse_main_config).
CODEC_IDS = {
    "codec_pad_id": 2148,
    "codec_bos_id": 2149,
    "codec_eos_token_id": 2150,
    "codec_think_id": 2154,
    "codec_nothink_id": 2155,
    "codec_think_bos_id": 2156,
    "codec_think_eos_id": 2157,
}
# Codec language ids of the Base models: talker_config.codec_language_id (franken_tts FACT_DISPOSITIONS E-2).
BASE_LANGUAGE_IDS = {
    "chinese": 2055,
    "english": 2050,
    "german": 2053,
    "italian": 2070,
    "portuguese": 2071,
    "spanish": 2054,
    "japanese": 2058,
    "korean": 2064,
    "french": 2061,
    "russian": 2069,
}

# talker_config.code_predictor_config: the same in 0.6B and 1.7B (franken_tts; rust port parse_main_config).
CODE_PREDICTOR = {
    "model_type": "qwen3_tts_talker_code_predictor",
    "vocab_size": 2048,
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_hidden_layers": 5,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "hidden_act": "silu",
    "max_position_embeddings": 65536,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000,
    "rope_scaling": None,
    "attention_bias": False,
    "attention_dropout": 0,
    "use_sliding_window": False,
    "num_code_groups": 16,
    "initializer_range": 0.02,
}

# (talker hidden_size, talker intermediate_size, speaker encoder enc_dim, tts_model_size) per model:
# 0.6B 1024 / 3072 / 1024 (franken_tts, 0.6B config); 1.7B 2048 / 6144 / 2048 (rust and MLX 1.7B fixtures).
WIDTHS = {MODEL_0_6B: (1024, 3072, 1024, "0b6"), MODEL_1_7B: (2048, 6144, 2048, "1b7")}


def published_config(hub_id: str) -> dict:
    """The architecture fields of ``hub_id``'s ``config.json`` (a Base model of ``WIDTHS``).

    Raises KeyError naming the known ids for any other id.
    """
    if hub_id not in WIDTHS:
        raise KeyError(f"no published config for {hub_id!r}; known: {', '.join(WIDTHS)}")
    hidden, intermediate, enc_dim, size = WIDTHS[hub_id]
    talker = {
        "model_type": "qwen3_tts_talker",
        "vocab_size": 3072,  # codec vocabulary: 2048 codes, control ids, speaker rows from 3000
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000,
        "rope_scaling": {"interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default", "type": "default"},
        "attention_bias": False,
        "attention_dropout": 0,
        "use_sliding_window": False,
        "initializer_range": 0.02,
        "num_code_groups": 16,
        "text_hidden_size": 2048,
        "text_vocab_size": 151936,
        "position_id_per_seconds": 13,
        **CODEC_IDS,
        "codec_language_id": dict(BASE_LANGUAGE_IDS),
        "spk_id": {},
        "spk_is_dialect": {},
        "code_predictor_config": copy.deepcopy(CODE_PREDICTOR),
    }
    return {
        "architectures": ["Qwen3TTSForConditionalGeneration"],
        "model_type": "qwen3_tts",
        "tokenizer_type": "qwen3_tts_tokenizer_12hz",
        "tts_model_size": size,
        "tts_model_type": "base",
        "assistant_token_id": 77091,
        "im_start_token_id": 151644,
        "im_end_token_id": 151645,
        "tts_pad_token_id": 151671,
        "tts_bos_token_id": 151672,
        "tts_eos_token_id": 151673,
        "talker_config": talker,
        "speaker_encoder_config": {"enc_dim": enc_dim, "sample_rate": 24000},
    }


def model_config(source: str | Path) -> dict:
    """``config.json`` of ``source``: a model folder, a config file, or a Hub id of ``WIDTHS`` (published values).

    Raises FileNotFoundError when ``source`` is neither, naming the known Hub ids.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        return json.loads(path.read_text())
    if str(source) in WIDTHS:
        return published_config(str(source))
    raise FileNotFoundError(
        f"{source!r} is not a model folder or config.json, nor a known Hub id ({', '.join(WIDTHS)})"
    )


TEXT_SPECIAL_IDS = ("im_start_token_id", "im_end_token_id", "tts_pad_token_id", "tts_bos_token_id", "tts_eos_token_id")


def with_layers(config: dict, talker_layers: int, code_predictor_layers: int, text_vocab_size: int) -> dict:
    """A copy of ``config`` with fewer decoder layers and a smaller text vocabulary, every width kept: the
    real-width, few-layer models on which memory estimates are measured. The special text ids (chat and tts
    markers) move to the top rows of the smaller vocabulary."""
    config = copy.deepcopy(config)
    for offset, key in enumerate(TEXT_SPECIAL_IDS, start=1):
        config[key] = text_vocab_size - offset
    talker = config["talker_config"]
    talker["num_hidden_layers"] = talker_layers
    talker["text_vocab_size"] = text_vocab_size
    talker["code_predictor_config"]["num_hidden_layers"] = code_predictor_layers
    return config


def build_on_meta(config: dict):
    """``Qwen3TTSForConditionalGeneration`` of ``config`` on the meta device: every shape, no memory."""
    from qwen_tts.core.models.modeling_qwen3_tts import Qwen3TTSForConditionalGeneration

    with torch.device("meta"):
        return Qwen3TTSForConditionalGeneration(qwen3_tts_config(config))


def qwen3_tts_config(config: dict):
    """A ``Qwen3TTSConfig`` from a ``config.json`` dict (keys the constructor refuses are left out)."""
    from qwen_tts.core.models.configuration_qwen3_tts import Qwen3TTSConfig

    kept = {k: v for k, v in config.items() if k not in ("architectures", "model_type", "transformers_version")}
    if isinstance(kept.get("speaker_encoder_config"), dict):  # its config cannot take model_type back
        kept["speaker_encoder_config"] = {k: v for k, v in kept["speaker_encoder_config"].items() if k != "model_type"}
    return Qwen3TTSConfig(**kept)
