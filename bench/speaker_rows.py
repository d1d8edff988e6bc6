"""Which x-vector should a custom-voice speaker row hold? Measured on the bundled speakers' clips.

For each bundled speaker, every clip's x-vector (the speaker encoder of a tiny model whose last layer is centred on
the clips so that it tells voices apart, ``tests/conftest.discriminative_copy``; no trained encoder can be
downloaded here) and three candidate rows: the plain mean, the norm-matched mean (the mean's direction at the
clips' mean norm, what training uses) and the medoid clip. Prints JSON: per speaker the clips' norms, each
candidate's norm and its cosine to every clip (min / mean), and the cosine and relative norm difference between
x-vectors computed in float32 and in bfloat16 (the dtype stock computes them in for a published checkpoint).

    uv run python bench/speaker_rows.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]


def main() -> None:
    import qwen_tts
    from conftest import discriminative_copy

    from finetuning.preparation.audio import resample
    from finetuning.tiny_model import build_tiny_model
    from finetuning.training.speakers import clip_xvectors, norm_matched_mean

    torch.set_num_threads(1)
    speakers = ("english_speaker", "swahili_speaker")
    clips = {s: sorted((REPO / "voices" / s / "clips").glob("*.flac")) for s in speakers}
    with tempfile.TemporaryDirectory() as tmp:
        base = build_tiny_model(Path(tmp) / "tiny", layout="equal", seed=0)
        all_clips = [p for s in speakers for p in clips[s]]
        model_dir = discriminative_copy(base, all_clips, Path(tmp) / "model", scale=35.0)
        model = qwen_tts.Qwen3TTSModel.from_pretrained(str(model_dir), dtype=torch.float32).model
        report = {"encoder": "tiny discriminative copy (scale 35)", "speakers": {}}
        for speaker in speakers:
            audio = []
            for path in clips[speaker]:
                samples, rate = sf.read(path, dtype="float32")
                audio.append(resample(samples, rate, 24000))
            vectors = clip_xvectors(model, audio)  # (C, D) float32
            half = clip_xvectors(model, audio, torch.bfloat16).float()
            unit = torch.nn.functional.normalize(vectors, dim=-1)
            candidates = {
                "mean": vectors.mean(0),
                "norm_matched_mean": norm_matched_mean(vectors),
                "medoid": vectors[int((unit @ unit.T).sum(1).argmax())],
            }
            rows = {}
            for name, row in candidates.items():
                cosines = torch.nn.functional.cosine_similarity(row[None], vectors)
                rows[name] = {
                    "norm": round(float(row.norm()), 4),
                    "cosine_min": round(float(cosines.min()), 4),
                    "cosine_mean": round(float(cosines.mean()), 4),
                }
            norms = vectors.norm(dim=-1)
            report["speakers"][speaker] = {
                "clips": len(audio),
                "clip_norm_min": round(float(norms.min()), 4),
                "clip_norm_mean": round(float(norms.mean()), 4),
                "clip_norm_max": round(float(norms.max()), 4),
                "rows": rows,
                "bf16_vs_fp32_cosine_min": round(float(torch.nn.functional.cosine_similarity(half, vectors).min()), 5),
                "bf16_vs_fp32_norm_rel_diff_max": round(float(((half.norm(dim=-1) - norms).abs() / norms).max()), 5),
            }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
