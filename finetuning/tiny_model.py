"""Tiny, randomly initialised Qwen3-TTS Base models of the real architecture, built offline.

The kit builds a complete model directory that stock ``qwen_tts.Qwen3TTSModel.from_pretrained`` loads:
talker + code predictor + speaker encoder (``Qwen3TTSForConditionalGeneration``), the 12 Hz speech tokenizer
(``Qwen3TTSTokenizerV2Model``) and a small byte-level BPE text tokenizer. Every class is qwen-tts's own; only
the sizes are small. Tests and the offline demo use it because no real weights can be downloaded here.

Two layouts exist, as in the released checkpoints:
  * ``"equal"``: text embedding width == talker width (the 1.7B layout);
  * ``"wide_text"``: text width != talker width (the 0.6B layout, 2048 text vs 1024 talker).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from finetuning.constants import FRAME_RATE_HZ, NUM_CODEBOOKS, SAMPLE_RATE, SAMPLES_PER_FRAME
from finetuning.published_models import BASE_LANGUAGE_IDS, CODEC_IDS

TINY_KIT_VERSION = 2
LAYOUTS = ("equal", "wide_text")

CODEBOOK_SIZE = 2048
TALKER_VOCAB_SIZE = 3072  # codes 0..2047, control ids 2048.., speaker rows 3000..

# Control ids and language ids of the talker's codec vocabulary: the released models' own. The control ids sit in
# the top 1024 rows, which generate() suppresses (except EOS).
CODEC_LANGUAGE_IDS = BASE_LANGUAGE_IDS

TEXT_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|tts_pad|>",
    "<|tts_text_bos|>",
    "<|tts_text_eod|>",
)
TEXT_VOCAB_SIZE = 768
# Pre-split pattern of the Qwen2 tokenizer: keeps "\n" apart from letters so that
# "<|im_start|>assistant\n" is exactly three tokens, which generate() relies on (input_id[:, :3]).
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TOKENIZER_CORPUS = (
    "assistant user system",
    "The quick brown fox jumps over the lazy dog.",
    "Good morning, how are you today? I am fine, thank you.",
    "Please read this sentence slowly and clearly.",
    "Habari ya asubuhi, jina langu ni Amina. Karibu sana.",
    "Ina kwana, yaya aiki? Lafiya lau, na gode.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9, and punctuation: ! ? ; : - ' \" ( ).",
)


@dataclass(frozen=True)
class TinyModelSpec:
    """Sizes of one tiny model; the defaults keep a CPU training step in the tens of milliseconds."""

    layout: str = "equal"
    seed: int = 0
    talker_hidden_size: int = 32
    wide_text_hidden_size: int = 48
    talker_layers: int = 2
    code_predictor_hidden_size: int = 24
    code_predictor_layers: int = 1

    @property
    def text_hidden_size(self) -> int:
        return self.talker_hidden_size if self.layout == "equal" else self.wide_text_hidden_size

    def fingerprint(self) -> str:
        payload = json.dumps({"kit": TINY_KIT_VERSION, **self.__dict__}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def build_text_tokenizer():
    """Train a small byte-level BPE with Qwen2's pre-split and wrap it as ``Qwen2TokenizerFast``.

    Deterministic: the corpus and the trainer are fixed. Any UTF-8 text encodes (byte fallback alphabet).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TEXT_VOCAB_SIZE - len(TEXT_SPECIAL_TOKENS),
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(_TOKENIZER_CORPUS) * 8, trainer=trainer)
    wrapped = Qwen2TokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=None,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=list(TEXT_SPECIAL_TOKENS[1:]),
    )
    wrapped.add_special_tokens({"eos_token": "<|endoftext|>"})
    return wrapped


def _speech_tokenizer_config():
    from qwen_tts.core.tokenizer_12hz.configuration_qwen3_tts_tokenizer_v2 import Qwen3TTSTokenizerV2Config

    encoder = dict(
        sampling_rate=SAMPLE_RATE,
        frame_rate=FRAME_RATE_HZ,
        hidden_size=32,
        num_filters=4,
        upsampling_ratios=[8, 6, 5, 4],
        codebook_size=CODEBOOK_SIZE,
        codebook_dim=16,
        vector_quantization_hidden_dimension=16,
        num_quantizers=NUM_CODEBOOKS,
        num_semantic_quantizers=1,
        upsample_groups=32,
        num_hidden_layers=1,
        intermediate_size=64,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=250,
    )
    decoder = dict(
        codebook_size=CODEBOOK_SIZE,
        codebook_dim=16,
        hidden_size=32,
        latent_dim=32,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=64,
        num_hidden_layers=1,
        num_quantizers=NUM_CODEBOOKS,
        upsample_rates=[8, 5, 4, 3],
        upsampling_ratios=[2, 2],
        decoder_dim=32,
        sliding_window=72,
    )
    return Qwen3TTSTokenizerV2Config(
        encoder_config=encoder,
        decoder_config=decoder,
        encoder_valid_num_quantizers=NUM_CODEBOOKS,
        input_sample_rate=SAMPLE_RATE,
        output_sample_rate=SAMPLE_RATE,
        decode_upsample_rate=SAMPLES_PER_FRAME,
        encode_downsample_rate=SAMPLES_PER_FRAME,
    )


def _randomise_codebooks(speech_tokenizer: torch.nn.Module, generator: torch.Generator) -> None:
    """Random init leaves every codebook at zero (so every code is 0); give them distinct random vectors."""
    with torch.no_grad():
        for name, buffer in speech_tokenizer.named_buffers():
            if name.endswith("embed_sum"):
                buffer.copy_(torch.randn(buffer.shape, generator=generator))
        for name, param in speech_tokenizer.named_parameters():
            if name.endswith("embedding_sum"):
                param.copy_(torch.randn(param.shape, generator=generator))


DECODER_RMS = 0.1  # output level of the tiny decoder on random codes


def _make_decoder_audible(speech_tokenizer: torch.nn.Module, generator: torch.Generator) -> None:
    """Random init shrinks the decoder's signal ~10x per convolution, so tiny codes decode to ~1e-9 (silence, and
    denormals that slow CPU convolutions ~10x). Give its convolutions variance-preserving weights and scale the
    last one so random codes decode at about DECODER_RMS."""
    decoder = speech_tokenizer.decoder
    with torch.no_grad():
        for name, module in decoder.named_modules():
            if name.startswith(("quantizer", "pre_transformer")):
                continue
            if isinstance(module, torch.nn.Conv1d):
                fan_in = module.weight[0].numel()
            elif isinstance(module, torch.nn.ConvTranspose1d):
                fan_in = module.weight.shape[0] * module.weight.shape[2] / module.stride[0]
            else:
                continue
            module.weight.copy_(torch.randn(module.weight.shape, generator=generator) / math.sqrt(fan_in))
        last = decoder.decoder[-1].conv
        captured = []
        handle = last.register_forward_hook(lambda _m, _i, output: captured.append(output))
        decoder(torch.randint(0, CODEBOOK_SIZE, (2, NUM_CODEBOOKS, 8), generator=generator))
        handle.remove()
        last.weight.mul_(DECODER_RMS / captured[0].std())
        last.bias.zero_()


def _model_config(spec: TinyModelSpec, text_tokenizer):
    from qwen_tts.core.models.configuration_qwen3_tts import Qwen3TTSConfig

    head_dim = 16
    talker = dict(
        vocab_size=TALKER_VOCAB_SIZE,
        hidden_size=spec.talker_hidden_size,
        intermediate_size=2 * spec.talker_hidden_size,
        num_hidden_layers=spec.talker_layers,
        num_attention_heads=spec.talker_hidden_size // head_dim,
        num_key_value_heads=1,
        head_dim=head_dim,
        # multimodal rope: sections must sum to head_dim / 2
        rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3], "interleaved": True},
        max_position_embeddings=4096,
        num_code_groups=NUM_CODEBOOKS,
        text_hidden_size=spec.text_hidden_size,
        text_vocab_size=len(text_tokenizer),
        spk_id={},
        spk_is_dialect={},
        codec_language_id=dict(CODEC_LANGUAGE_IDS),
        code_predictor_config=dict(
            vocab_size=CODEBOOK_SIZE,
            hidden_size=spec.code_predictor_hidden_size,
            intermediate_size=2 * spec.code_predictor_hidden_size,
            num_hidden_layers=spec.code_predictor_layers,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=12,
            max_position_embeddings=64,
            num_code_groups=NUM_CODEBOOKS,
        ),
        **CODEC_IDS,
    )
    speaker_encoder = dict(
        mel_dim=128,
        enc_dim=spec.talker_hidden_size,
        enc_channels=[16, 16, 16, 16, 48],  # last = sum of the three middle ones
        enc_kernel_sizes=[5, 3, 3, 3, 1],
        enc_dilations=[1, 2, 3, 4, 1],
        enc_attention_channels=8,
        enc_res2net_scale=4,
        enc_se_channels=8,
        sample_rate=SAMPLE_RATE,
    )
    ids = text_tokenizer.convert_tokens_to_ids
    return Qwen3TTSConfig(
        talker_config=talker,
        speaker_encoder_config=speaker_encoder,
        tokenizer_type="qwen3_tts_tokenizer_12hz",
        tts_model_size="1b7" if spec.layout == "equal" else "0b6",
        tts_model_type="base",
        im_start_token_id=ids("<|im_start|>"),
        im_end_token_id=ids("<|im_end|>"),
        tts_pad_token_id=ids("<|tts_pad|>"),
        tts_bos_token_id=ids("<|tts_text_bos|>"),
        tts_eos_token_id=ids("<|tts_text_eod|>"),
    )


GENERATE_DEFAULTS = {
    "do_sample": True,
    "top_k": 50,
    "top_p": 1.0,
    "temperature": 0.9,
    "repetition_penalty": 1.05,
    "subtalker_dosample": True,
    "subtalker_top_k": 50,
    "subtalker_top_p": 1.0,
    "subtalker_temperature": 0.9,
    "max_new_tokens": 2048,
}


def write_config_json(config, path: Path) -> None:
    """Write a Qwen3TTSConfig as config.json.

    qwen-tts 0.1.1's ``save_pretrained`` trips on its own configs (the speaker-encoder config cannot take
    ``model_type`` back; transformers' config diff raises ``KeyError: 'dtype'``), so the dict is written directly.
    """
    data = config.to_dict()
    data.get("speaker_encoder_config", {}).pop("model_type", None)
    data["architectures"] = ["Qwen3TTSForConditionalGeneration"]
    path.write_text(json.dumps(data, indent=2, sort_keys=True))


def build_tiny_model(output_dir: str | os.PathLike, layout: str = "equal", seed: int = 0) -> Path:
    """Build a tiny random Qwen3-TTS Base model directory at ``output_dir`` and return its path.

    The directory holds config.json, model.safetensors, generation_config.json, tokenizer files and
    speech_tokenizer/{config.json, model.safetensors, preprocessor_config.json}. The same (layout, seed)
    gives byte-identical weights. If ``output_dir`` already holds a build of the same spec it is reused.

    Raises ValueError for an unknown layout.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown tiny layout {layout!r}; choose one of {LAYOUTS}")
    from qwen_tts.core.models.modeling_qwen3_tts import Qwen3TTSForConditionalGeneration
    from qwen_tts.core.tokenizer_12hz.modeling_qwen3_tts_tokenizer_v2 import Qwen3TTSTokenizerV2Model
    from safetensors.torch import save_file
    from transformers import EncodecFeatureExtractor

    spec = TinyModelSpec(layout=layout, seed=seed)
    output_dir = Path(output_dir)
    marker = output_dir / "tiny_model.json"
    if marker.exists() and json.loads(marker.read_text()).get("fingerprint") == spec.fingerprint():
        return output_dir

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=output_dir.parent))
    try:
        text_tokenizer = build_text_tokenizer()
        text_tokenizer.save_pretrained(staging)

        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        config = _model_config(spec, text_tokenizer)
        model = Qwen3TTSForConditionalGeneration(config).eval()
        write_config_json(config, staging / "config.json")
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt"})
        (staging / "generation_config.json").write_text(json.dumps(GENERATE_DEFAULTS, indent=2))

        torch.manual_seed(seed + 1)
        speech_config = _speech_tokenizer_config()
        speech_tokenizer = Qwen3TTSTokenizerV2Model(speech_config).eval()
        _randomise_codebooks(speech_tokenizer, generator)
        _make_decoder_audible(speech_tokenizer, generator)
        speech_dir = staging / "speech_tokenizer"
        speech_dir.mkdir()
        speech_tokenizer.save_pretrained(speech_dir, safe_serialization=True)
        EncodecFeatureExtractor(
            feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0, return_attention_mask=True
        ).save_pretrained(speech_dir)

        (staging / "tiny_model.json").write_text(
            json.dumps({"fingerprint": spec.fingerprint(), **spec.__dict__}, indent=2)
        )
        if output_dir.exists():
            shutil.rmtree(output_dir)
        staging.rename(output_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return output_dir
