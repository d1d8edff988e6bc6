"""Long recordings -> candidate clips: decoding any container (PyAV), speech regions (silero-vad), cutting.

A recording (an interview, an audiobook chapter, a phone video) is decoded whole to 24 kHz mono, its speech
regions are found with silero-vad (the model ships inside the wheel; it runs offline), and the regions become
clips of ``SEGMENT_MIN_S``-``SEGMENT_MAX_S``:

* a pause of at least ``SEGMENT_MIN_PAUSE_S`` ends a clip, so clips start and end in pauses, never mid-word
  when a pause exists;
* speech shorter than ``SEGMENT_MIN_S`` joins its nearer neighbour (pause at most ``MERGE_MAX_GAP_S``) when the
  joined clip still fits ``SEGMENT_MAX_S``; otherwise it stays alone and the quality gate judges it;
* speech longer than ``SEGMENT_MAX_S`` is split at its quietest 10 ms frame, chosen where both sides can fit;
* each clip keeps ``SEGMENT_PAD_S`` of the surrounding pause at both ends, at most half the pause, so clips
  never overlap.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from finetuning.constants import SAMPLE_RATE
from finetuning.preparation.audio import AudioDecodeError, resample

VAD_SAMPLE_RATE = 16_000  # silero-vad runs at 16 kHz (or 8 kHz)
MIN_SPEECH_MS = 150  # silero-vad: shorter bursts are noise, not speech
MERGE_MAX_GAP_S = 1.0  # a short clip joins a neighbour across at most this much silence
ENERGY_FRAME_S = 0.025  # frame and hop of the energy curve searched for the quietest split point
ENERGY_HOP_S = 0.010


@dataclass(frozen=True)
class SegmentRules:
    """How speech regions become clips (seconds; see the module docstring). Built from settings."""

    min_s: float
    max_s: float
    min_pause_s: float
    pad_s: float
    vad_threshold: float


@dataclass(frozen=True)
class Segment:
    """One candidate clip of a recording: ``start_s``/``end_s`` where it is cut (padding included)."""

    start_s: float
    end_s: float
    text: str = ""


def decode_recording(path: Path) -> np.ndarray:
    """Decode the first audio stream of any container FFmpeg reads (wav, flac, mp3, ogg, opus, m4a, mp4, mkv,
    webm, ...) through PyAV's bundled FFmpeg, downmix to mono and resample to 24 kHz (libsoxr HQ).

    Returns (samples,) float32. Raises FileNotFoundError for a missing path and AudioDecodeError for a file
    without an audio stream or one FFmpeg cannot decode.
    """
    import av

    if not path.exists():
        raise FileNotFoundError(str(path))
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise AudioDecodeError(f"{path} has no audio stream")
            stream = container.streams.audio[0]
            # packed float32 mono at the stream's own rate; the resampling to 24 kHz is the gate's soxr HQ one
            mono = av.AudioResampler(format="flt", layout="mono", rate=stream.rate)
            chunks, rate = [], stream.rate
            for frame in container.decode(stream):
                for converted in mono.resample(frame):
                    chunks.append(converted.to_ndarray().reshape(-1))
            chunks.extend(converted.to_ndarray().reshape(-1) for converted in mono.resample(None))
    except av.FFmpegError as error:
        raise AudioDecodeError(f"cannot decode {path}: {error}") from error
    if not chunks or not rate:
        raise AudioDecodeError(f"{path} holds no audio samples")
    return resample(np.concatenate(chunks).astype(np.float32), int(rate))


@functools.cache
def _vad_model():
    from silero_vad import load_silero_vad

    return load_silero_vad(onnx=False)  # the TorchScript model inside the wheel: no download, CPU


def speech_regions(
    samples: np.ndarray, rules: SegmentRules, progress: Callable[[float], None] | None = None
) -> list[tuple[float, float]]:
    """Speech regions of a 24 kHz mono signal as (start_s, end_s), in order, without padding; pauses shorter
    than ``rules.min_pause_s`` stay inside a region. ``progress`` receives the percentage done."""
    import torch
    from silero_vad import get_speech_timestamps

    wav = torch.from_numpy(resample(samples, SAMPLE_RATE, VAD_SAMPLE_RATE))
    stamps = get_speech_timestamps(
        wav,
        _vad_model(),
        threshold=rules.vad_threshold,
        sampling_rate=VAD_SAMPLE_RATE,
        min_speech_duration_ms=MIN_SPEECH_MS,
        min_silence_duration_ms=round(rules.min_pause_s * 1000),
        speech_pad_ms=0,
        progress_tracking_callback=progress,
    )
    return [(stamp["start"] / VAD_SAMPLE_RATE, stamp["end"] / VAD_SAMPLE_RATE) for stamp in stamps]


def _merge_short(regions: list[tuple[float, float]], rules: SegmentRules) -> list[tuple[float, float]]:
    """Join each region shorter than ``min_s`` to its nearer neighbour when the pause between them is at most
    MERGE_MAX_GAP_S and the joined region still fits ``max_s``."""
    merged = list(regions)
    index = 0
    while index < len(merged):
        start, end = merged[index]
        options = []
        if end - start < rules.min_s:
            if (
                index > 0
                and start - merged[index - 1][1] <= MERGE_MAX_GAP_S
                and end - merged[index - 1][0] <= rules.max_s
            ):
                options.append((start - merged[index - 1][1], index - 1))
            if (
                index + 1 < len(merged)
                and merged[index + 1][0] - end <= MERGE_MAX_GAP_S
                and merged[index + 1][1] - start <= rules.max_s
            ):
                options.append((merged[index + 1][0] - end, index + 1))
        if not options:
            index += 1
            continue
        first, last = sorted((index, min(options)[1]))
        merged[first : last + 1] = [(merged[first][0], merged[last][1])]
        index = first
    return merged


def _split_long(region: tuple[float, float], energy: np.ndarray, rules: SegmentRules) -> list[tuple[float, float]]:
    """Cut a region longer than ``max_s`` at its quietest frame among the points that leave the first part at
    most ``max_s`` and both parts at least ``min_s``; repeat on what is left (``max_s >= 2 * min_s``).
    ``energy`` is the recording's RMS per ENERGY_HOP_S."""
    start, end = region
    if end - start <= rules.max_s:
        return [region]
    low, high = start + rules.min_s, min(start + rules.max_s, end - rules.min_s)
    first, last = round(low / ENERGY_HOP_S), max(round(high / ENERGY_HOP_S), round(low / ENERGY_HOP_S) + 1)
    window = energy[first:last]
    cut = (first + int(np.argmin(window))) * ENERGY_HOP_S if window.size else (low + high) / 2
    return [(start, cut), *_split_long((cut, end), energy, rules)]


def plan_segments(regions: list[tuple[float, float]], samples: np.ndarray, rules: SegmentRules) -> list[Segment]:
    """Clips (with padding) from the speech regions of a 24 kHz recording, by the rules of the module docstring."""
    import librosa

    duration_s = len(samples) / SAMPLE_RATE
    frame, hop = round(ENERGY_FRAME_S * SAMPLE_RATE), round(ENERGY_HOP_S * SAMPLE_RATE)
    energy = librosa.feature.rms(y=samples, frame_length=frame, hop_length=hop, center=True)[0]
    pieces = [piece for region in _merge_short(regions, rules) for piece in _split_long(region, energy, rules)]
    segments = []
    for index, (start, end) in enumerate(pieces):
        before = start - pieces[index - 1][1] if index > 0 else start
        after = pieces[index + 1][0] - end if index + 1 < len(pieces) else duration_s - end
        pad_before = min(rules.pad_s, before / 2 if index > 0 else before)
        pad_after = min(rules.pad_s, after / 2 if index + 1 < len(pieces) else after)
        segments.append(Segment(max(0.0, start - pad_before), min(duration_s, end + pad_after)))
    return segments


def cut(samples: np.ndarray, segment: Segment) -> np.ndarray:
    """The 24 kHz samples of one segment."""
    return samples[round(segment.start_s * SAMPLE_RATE) : round(segment.end_s * SAMPLE_RATE)]
