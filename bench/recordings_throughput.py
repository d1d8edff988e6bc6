"""Throughput of the ``recordings`` stages on CPU, one thread; prints JSON.

    uv run python bench/recordings_throughput.py [--minutes 10]

A long recording is made from the bundled English sentences joined with 0.6-1.2 s pauses until it lasts
``--minutes`` and is written as MP3 (PyAV). Timed separately, in recording-seconds per wall second: decoding
(PyAV + resampling to 24 kHz), speech detection (silero-vad), cutting (``plan_segments``) and the speaker filter
(resemblyzer GE2E, per clip). Models are loaded before the clocks start. The segment count is checked against
the number of sentences joined.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from finetuning.constants import SAMPLE_RATE  # noqa: E402
from finetuning.preparation.audio import load_mono_24k  # noqa: E402
from finetuning.preparation.recordings import (  # noqa: E402
    SegmentRules,
    cut,
    decode_recording,
    plan_segments,
    speech_regions,
)
from finetuning.preparation.speaker_filter import SpeakerFilter  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
PAUSES_S = (0.6, 0.9, 0.7, 1.2)
RULES = SegmentRules(min_s=1.0, max_s=15.0, min_pause_s=0.3, pad_s=0.1, vad_threshold=0.5)


def long_recording(minutes: float) -> tuple[np.ndarray, int]:
    """(24 kHz samples, sentences joined) of at least ``minutes``."""
    voices = REPO_ROOT / "voices" / "english_speaker"
    rows = [json.loads(line) for line in (voices / "metadata.jsonl").read_text().splitlines()]
    clips = [load_mono_24k(voices / row["audio"]) for row in rows]
    pieces, total, count = [], 0, 0
    while total < minutes * 60 * SAMPLE_RATE:
        clip = clips[count % len(clips)]
        pause = np.zeros(round(PAUSES_S[count % len(PAUSES_S)] * SAMPLE_RATE), np.float32)
        pieces += [clip, pause]
        total += len(clip) + len(pause)
        count += 1
    return np.concatenate(pieces), count


def write_mp3(path: Path, samples: np.ndarray) -> None:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libmp3lame", rate=SAMPLE_RATE, layout="mono")
        pcm = np.round(np.clip(samples, -1, 1) * 32767).astype(np.int16)
        step = stream.codec_context.frame_size or 1152
        for start in range(0, len(pcm), step):
            frame = av.AudioFrame.from_ndarray(pcm[None, start : start + step], format="s16", layout="mono")
            frame.sample_rate, frame.pts = SAMPLE_RATE, start
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    samples, sentences = long_recording(args.minutes)
    seconds = len(samples) / SAMPLE_RATE
    speaker_filter = SpeakerFilter([load_mono_24k(REPO_ROOT / "voices" / "english_speaker.wav")])
    speech_regions(samples[: SAMPLE_RATE * 2], RULES)  # loads silero-vad
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "long.mp3"
        write_mp3(path, samples)
        clock = time.perf_counter()
        decoded = decode_recording(path)
        decode_s = time.perf_counter() - clock
    clock = time.perf_counter()
    regions = speech_regions(decoded, RULES)
    vad_s = time.perf_counter() - clock
    clock = time.perf_counter()
    segments = plan_segments(regions, decoded, RULES)
    plan_s = time.perf_counter() - clock
    clock = time.perf_counter()
    similarities = [speaker_filter.similarity(cut(decoded, segment)) for segment in segments]
    filter_s = time.perf_counter() - clock
    print(
        json.dumps(
            {
                "recording_s": round(seconds, 1),
                "sentences": sentences,
                "segments": len(segments),
                "decode_mp3_x_realtime": round(seconds / decode_s, 1),
                "vad_x_realtime": round(seconds / vad_s, 1),
                "plan_x_realtime": round(seconds / plan_s, 1),
                "speaker_filter_x_realtime": round(seconds / filter_s, 1),
                "similarity_min": round(min(similarities), 3),
                "threads": torch.get_num_threads(),
                "load_average": os.getloadavg()[0],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
