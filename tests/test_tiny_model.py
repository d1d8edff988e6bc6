import hashlib
import json

import numpy as np
import pytest
import soundfile as sf
from conftest import VOICES_DIR

from finetuning.constants import SAMPLES_PER_FRAME
from finetuning.tiny_model import build_tiny_model


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("layout", ["equal", "wide_text"])
def test_layout_loads_with_stock_api_and_generates(tiny_model_dirs, layout):
    import qwen_tts

    model = qwen_tts.Qwen3TTSModel.from_pretrained(str(tiny_model_dirs[layout]))
    talker_cfg = model.model.config.talker_config
    if layout == "equal":
        assert talker_cfg.text_hidden_size == talker_cfg.hidden_size
    else:
        assert talker_cfg.text_hidden_size != talker_cfg.hidden_size
    ref, sr = sf.read(VOICES_DIR / "english_speaker.wav", dtype="float32")
    wavs, out_sr = model.generate_voice_clone(
        text="Hello there.",
        language="english",
        ref_audio=(ref, sr),
        x_vector_only_mode=True,
        max_new_tokens=12,
    )
    assert out_sr == 24000
    assert wavs[0].ndim == 1 and wavs[0].size > 0
    assert np.isfinite(wavs[0]).all()


def test_text_tokenizer_keeps_role_prefix_three_tokens(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    ids = tok("<|im_start|>assistant\nHabari, dunia!<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
    assert tok.convert_ids_to_tokens(ids[:3]) == ["<|im_start|>", "assistant", "Ċ"]
    assert tok.convert_ids_to_tokens(ids[-5:]) == ["<|im_end|>", "Ċ", "<|im_start|>", "assistant", "Ċ"]
    assert tok.decode(ids[3:-5]) == "Habari, dunia!"


def test_speech_tokenizer_round_trip_on_bundled_clip(tiny_model_dir):
    import qwen_tts

    clip = VOICES_DIR / "english_speaker.wav"
    wav, sr = sf.read(clip, dtype="float32")
    duration_s = len(wav) / sr
    st = qwen_tts.Qwen3TTSTokenizer.from_pretrained(str(tiny_model_dir / "speech_tokenizer"))
    codes = st.encode(wav, sr=sr).audio_codes[0]
    frames = codes.shape[0]
    assert codes.shape[1] == 16
    assert abs(frames - duration_s * 12.5) <= 1.0
    assert len(np.unique(codes.numpy())) > 16, "codebooks must be randomised, not all zero"
    wavs, out_sr = st.decode({"audio_codes": codes})
    assert out_sr == 24000
    assert wavs[0].shape[0] == frames * SAMPLES_PER_FRAME


def test_kit_is_deterministic_for_a_seed(tmp_path, tiny_model_dir):
    again = build_tiny_model(tmp_path / "again", layout="equal", seed=0)
    other = build_tiny_model(tmp_path / "other", layout="equal", seed=1)
    for rel in ("model.safetensors", "speech_tokenizer/model.safetensors", "tokenizer.json"):
        assert _sha(again / rel) == _sha(tiny_model_dir / rel)
    assert _sha(other / "model.safetensors") != _sha(tiny_model_dir / "model.safetensors")
    assert _sha(other / "speech_tokenizer/model.safetensors") != _sha(
        tiny_model_dir / "speech_tokenizer/model.safetensors"
    )


def test_kit_reuses_a_finished_build(tmp_path):
    first = build_tiny_model(tmp_path / "m", layout="wide_text", seed=3)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    build_tiny_model(tmp_path / "m", layout="wide_text", seed=3)
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert json.loads((first / "tiny_model.json").read_text())["layout"] == "wide_text"
    with pytest.raises(ValueError, match="unknown tiny layout"):
        build_tiny_model(tmp_path / "x", layout="huge")


def test_tiny_decoder_is_audible(tiny_model_dir):
    import qwen_tts
    import torch

    tokenizer = qwen_tts.Qwen3TTSTokenizer.from_pretrained(str(tiny_model_dir / "speech_tokenizer"))
    codes = torch.randint(0, 2048, (20, 16), generator=torch.Generator().manual_seed(0))
    wavs, sample_rate = tokenizer.decode([{"audio_codes": codes}])
    rms = float(np.sqrt(np.mean(np.square(wavs[0]))))
    assert sample_rate == 24000 and 0.01 < rms < 1.0
