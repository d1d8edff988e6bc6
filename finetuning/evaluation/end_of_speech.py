"""End-of-speech failures: does a generation stop where its text should end?

A generation fails when it reaches ``max_new_tokens`` without EOS (runaway), or when its duration is below
``EOS_SHORT_RATIO`` (truncated) or above ``EOS_LONG_RATIO`` (run-on) times what its text predicts at the speaker's
own speaking rate (``speaking_rate``: the median seconds per character of the speaker's real held-out clips).
``eos_failure_rate`` (``metrics.metric_catalogue``) is the share of generations that fail. Pure functions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# A sentence spoken at half or twice the speaker's rate is still speech; beyond that it was cut short or ran on.
EOS_SHORT_RATIO = 0.5
EOS_LONG_RATIO = 2.0
EOS_FAILURES = ("runaway", "truncated", "run_on")


def text_characters(text: str) -> int:
    """Characters that take time to say: every non-space character (what the preparation's chars/s gate counts)."""
    return sum(1 for c in text if not c.isspace())


def speaking_rate(texts: Sequence[str], durations_s: Sequence[float]) -> float:
    """The speaker's seconds per character: the median over clips of duration / ``text_characters`` (NaN
    without a clip that has text)."""
    rates = [d / text_characters(t) for t, d in zip(texts, durations_s, strict=True) if text_characters(t) > 0]
    return float(np.median(rates)) if rates else float("nan")


def end_of_speech_failure(
    text: str, generated_s: float, seconds_per_char: float, reached_length_cap: bool
) -> str | None:
    """How a generation of ``text`` failed to end, or None when it ended where expected: "runaway" when it
    reached ``max_new_tokens`` without EOS; "truncated" / "run_on" when ``generated_s`` is below
    ``EOS_SHORT_RATIO`` / above ``EOS_LONG_RATIO`` times ``text_characters(text) * seconds_per_char``. With an
    unknown rate (NaN) only runaways are detected."""
    if reached_length_cap:
        return "runaway"
    expected_s = text_characters(text) * seconds_per_char
    if not (math.isfinite(expected_s) and expected_s > 0):
        return None
    ratio = generated_s / expected_s
    if ratio < EOS_SHORT_RATIO:
        return "truncated"
    if ratio > EOS_LONG_RATIO:
        return "run_on"
    return None


def failure_counts(kinds: Sequence[str | None]) -> dict:
    """{"rate", "n", and a count per ``EOS_FAILURES`` kind} of per-generation failure kinds (None = ended well)."""
    counts = {kind: sum(1 for k in kinds if k == kind) for kind in EOS_FAILURES}
    failed = sum(counts.values())
    return {"rate": failed / len(kinds) if kinds else None, "n": len(kinds), **counts}
