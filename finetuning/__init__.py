"""Multi-speaker fine-tuning of Qwen3-TTS 12 Hz models."""

import os

# onnxruntime (imported by qwen_tts) sends telemetry unless told not to; training data stays private.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
