"""Evaluation-metric throughput on CPU over the bundled voices and the test fixtures; prints JSON.

    uv run python bench/metrics_throughput.py

For each metric: seconds of audio scored per wall second (higher is faster), with scorers loaded and warmed up
before the clock starts. Speaker similarity embeds each clip once (references are embedded separately, as an
evaluation would cache them); tone and prosody time the comparison of already-analysed clips apart from the
analysis itself; perplexity reports tokens per second. Backends that cannot load are listed with the reason.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finetuning.constants import SAMPLE_RATE  # noqa: E402
from finetuning.evaluation.metrics import (  # noqa: E402
    analyse_clip,
    perplexity,
    pronunciation_score,
    prosody_difference,
    tone_similarity,
)
from finetuning.evaluation.scorers import BackendUnavailable, load_asr_backend, load_speaker_backend  # noqa: E402
from finetuning.preparation.audio import load_mono_24k  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
CODEC_VOCAB = 3072  # talker codec-0 vocabulary size of the released 12 Hz models
PERPLEXITY_SHAPE = (8, 250)  # batch x frames (20 s at 12.5 Hz)


def corpus(speaker: str) -> list[tuple[np.ndarray, str]]:
    folder = REPO_ROOT / "voices" / speaker
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    return [(load_mono_24k(folder / row["audio"]), row["text"]) for row in rows]


def timed(function, items) -> tuple[list, float]:
    start = time.perf_counter()
    results = [function(item) for item in items]
    return results, time.perf_counter() - start


def rate(audio_s: float, wall_s: float) -> dict[str, float]:
    return {
        "audio_seconds": round(audio_s, 2),
        "wall_s": round(wall_s, 3),
        "audio_seconds_per_wall_second": round(audio_s / wall_s, 2),
    }


def main() -> None:
    english, swahili = corpus("english_speaker"), corpus("swahili_speaker")
    clips = [audio for audio, _ in english + swahili]
    clips_s = sum(len(audio) for audio in clips) / SAMPLE_RATE
    english_s = sum(len(audio) for audio, _ in english) / SAMPLE_RATE
    report: dict[str, object] = {"benchmark": "metrics_throughput", "device": "cpu", "clips": len(clips)}

    unavailable = {}
    try:
        load_speaker_backend("ecapa")
    except BackendUnavailable as error:
        unavailable["ecapa"] = error.reason
    speaker = load_speaker_backend("resemblyzer")
    speaker.embed(clips[0], SAMPLE_RATE)  # warm-up: first LSTM call and librosa caches
    _, wall = timed(lambda audio: speaker.embed(audio, SAMPLE_RATE), clips)
    report["speaker_similarity"] = {"scorer": speaker.name, **rate(clips_s, wall)}

    asr = load_asr_backend("pocketsphinx")
    asr.transcribe(english[0][0], SAMPLE_RATE)
    scores, wall = timed(lambda item: pronunciation_score(asr, item[0], SAMPLE_RATE, item[1]), english)
    report["pronunciation"] = {
        "scorer": asr.name,
        **rate(english_s, wall),
        "mean_wer": round(float(np.mean([score.wer for score in scores])), 3),
    }

    analyse_clip(clips[0], SAMPLE_RATE)
    analyses, wall = timed(lambda audio: analyse_clip(audio, SAMPLE_RATE), clips)
    report["analyse_clip"] = {"scorer": "librosa-pyin", **rate(clips_s, wall)}

    # Each clip against the next one of the same speaker: the audio scored is both clips of every pair.
    pairs = [(analyses[i], analyses[i + 1]) for i in range(len(analyses) - 1) if i + 1 != len(english)]
    pairs_s = sum((a.f0_hz.size + b.f0_hz.size) * a.hop_s for a, b in pairs)
    _, wall = timed(lambda pair: tone_similarity(*pair), pairs)
    report["tone_similarity"] = {"scorer": "mfcc-dtw", **rate(pairs_s, wall)}
    _, wall = timed(lambda pair: prosody_difference(*pair), pairs)
    report["prosody_difference"] = {"scorer": "mfcc-dtw", **rate(pairs_s, wall)}

    import torch

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(*PERPLEXITY_SHAPE, CODEC_VOCAB, generator=generator)
    labels = torch.randint(0, CODEC_VOCAB, PERPLEXITY_SHAPE, generator=generator)
    perplexity(logits, labels)
    _, wall = timed(lambda _: perplexity(logits, labels), range(10))
    report["perplexity"] = {"tokens_per_second": round(10 * labels.numel() / wall), "vocab": CODEC_VOCAB}

    report["unavailable"] = unavailable
    report["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
