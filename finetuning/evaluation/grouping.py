"""Means over generated utterances, per speaker or per instruction, and what an instruction changes.

``means`` aggregates the per-utterance values of ``runner`` (perplexities token-weighted, the rest plain means).
``instruction_groups`` regroups every speaker's utterances by the instruction each was generated with ("" = none).
``instruct_effect`` generates a row again without its instruction and measures, with the prosody metrics of
``metrics.prosody_difference``, how far the clip with the instruction departs from the one without: 0 semitones,
ratios of 1 and identical clips say the instruction changed nothing.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

from finetuning.constants import SAMPLE_RATE
from finetuning.evaluation.metrics import GROUP_METRICS, analyse_clip, metric_catalogue, prosody_difference
from finetuning.evaluation.speech import Voice, generate_speech
from finetuning.evaluation.targets import checked

INSTRUCT_EFFECT = "generated with the row's instruction vs generated without it (same text, speaker and seed)"


def means(utterances: list[dict], described: dict) -> dict:
    """{metric: {"value", "n", "of", "scorer", "aggregate"}}; perplexities are token-weighted (exp of the mean
    cross-entropy over all targets of all utterances), other metrics are plain means over utterances."""
    out = {}
    for metric, info in metric_catalogue().items():
        if not any(metric in u["values"] for u in utterances):
            continue  # never scored (scorer unavailable, language unsupported)
        values = [(u["values"].get(metric), u.get("tokens", {}).get(metric, 1)) for u in utterances]
        present = [(v, n) for v, n in values if v is not None]
        if not present:
            value = None
        elif info["group"] == "perplexity":
            value = math.exp(sum(n * math.log(v) for v, n in present) / sum(n for _, n in present))
        else:
            value = float(np.mean([v for v, _ in present]))
        out[metric] = {
            "value": value,
            "n": len(present),
            "of": len(utterances),
            "scorer": described[info["group"]]["backend"],
            "aggregate": "token-weighted" if info["group"] == "perplexity" else "mean",
        }
    return out


def instruct_effect(voice: Voice, text: str, language: str, seed: int, max_new_tokens: int, device, wav) -> dict:
    """The row generated again without its instruction (same text, language and seed) and how the clip with the
    instruction (``wav``) departs from it: {"wav", "identical", "values": prosody_difference(with, without),
    "errors"}. A value that cannot be computed is None with the reason in "errors"."""
    without = generate_speech(voice, text, language, seed, max_new_tokens, device)
    values, errors = {}, {}
    try:
        values = prosody_difference(analyse_clip(wav, SAMPLE_RATE), analyse_clip(without, SAMPLE_RATE))
    except ValueError as error:
        errors["prosody"] = str(error)
    identical = wav.shape == without.shape and bool(np.array_equal(wav, without))
    return {"wav": without, "identical": identical, "values": checked(values, errors), "errors": errors}


def instruction_groups(speakers: dict[str, dict], described: dict) -> dict:
    """Means per instruction: {instruction ("" = none): {"utterances", "speakers": {speaker: n}, "means",
    "instruct_effect"}} over every speaker's utterances, grouped by the instruction each was generated with.
    ``instruct_effect`` (rows generated both with and without their instruction): per prosody metric the mean
    difference of the clip with the instruction from the one without, with "identical" the pairs that came out the
    same sample for sample."""
    members: dict[str, list[tuple[str, dict]]] = {}
    for speaker, section in speakers.items():
        for utterance in section["utterances"]:
            members.setdefault(utterance["instruct"], []).append((speaker, utterance))
    groups = {}
    for instruct, pairs in members.items():
        utterances = [utterance for _, utterance in pairs]
        groups[instruct] = {
            "utterances": len(utterances),
            "speakers": dict(Counter(speaker for speaker, _ in pairs)),
            "means": means(utterances, described),
        }
        effects = [u["instruct_effect"] for u in utterances if "instruct_effect" in u]
        if effects:
            groups[instruct]["instruct_effect"] = {
                "compared": INSTRUCT_EFFECT,
                "pairs": len(effects),
                "identical": sum(effect["identical"] for effect in effects),
                "scorer": described["prosody"]["backend"],
                "means": {
                    metric: _plain_mean([effect["values"].get(metric) for effect in effects])
                    for metric in GROUP_METRICS["prosody"]
                },
            }
    return groups


def _plain_mean(values: list[float | None]) -> dict:
    present = [value for value in values if value is not None]
    return {"value": float(np.mean(present)) if present else None, "n": len(present), "of": len(values)}
