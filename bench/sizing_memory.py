"""Memory estimate vs measured peak on real-width, few-layer Qwen3-TTS models (CPU), as JSON lines.

Each published model (0.6B, 1.7B Base) is rebuilt with every width kept but 2 of its 28 talker layers, 1 of its
5 code-predictor layers and a 4096-row text vocabulary (the full one alone is 311 M parameters), randomly
initialised, and trained for two AdamW steps on one synthetic micro-batch in float32 and under bf16 autocast;
``finetuning.training.memory_probe`` measures the peak tensor memory, ``finetuning.training.sizing`` predicts it.

    uv run python bench/sizing_memory.py
"""

from __future__ import annotations

import json

from finetuning.published_models import MODEL_0_6B, MODEL_1_7B, published_config, with_layers
from finetuning.training.memory_probe import measure_training_peak
from finetuning.training.sizing import GIB, TrainingPlan, estimate_memory, model_shape

TALKER_LAYERS = 2
CODE_PREDICTOR_LAYERS = 1
TEXT_VOCAB = 4096
BATCH_SIZE = 2
FRAMES = 150  # 12 s of speech per utterance
TEXT_TOKENS = 20


def main() -> None:
    for hub_id in (MODEL_0_6B, MODEL_1_7B):
        config = with_layers(published_config(hub_id), TALKER_LAYERS, CODE_PREDICTOR_LAYERS, TEXT_VOCAB)
        shape = model_shape(config)
        for precision in ("no", "bf16"):
            measured = measure_training_peak(config, BATCH_SIZE, FRAMES, TEXT_TOKENS, precision)
            plan = TrainingPlan(precision=precision, positions=measured.positions, frames=measured.frames)
            estimate = estimate_memory(shape, plan)
            record = {
                "model": hub_id,
                "layers": f"{TALKER_LAYERS}/28 talker, {CODE_PREDICTOR_LAYERS}/5 code predictor",
                "parameters": shape.parameters,
                "precision": precision,
                "positions": measured.positions,
                "frames": measured.frames,
                "measured_gib": round(measured.peak_bytes / GIB, 3),
                "estimated_gib": round(estimate.total / GIB, 3),
                "ratio": round(estimate.total / measured.peak_bytes, 3),
            }
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
