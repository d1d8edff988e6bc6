"""Evaluation on generated speech, per speaker: generate -> score against the speaker's real audio -> results.

For every speaker the runner takes the held-out utterances of ``targets.load_targets``, lets the model under
evaluation speak each text (free-running sampling, seeded per utterance, at most EVAL_MAX_SECONDS; see
``speech``) and scores the result:

* perplexity   teacher-forced on the utterance's real codes: codec-0 (talker) and sub-talker (codebooks 2-16)
               separately, conditioned exactly as generation conditions the model (same speaker embedding,
               language prefix and layout);
* speaker similarity of the generated clip to the speaker's reference clips;
* pronunciation (WER/CER of an ASR transcript) where the recogniser knows the language;
* tone (speaker-normalised F0 contour) and prosody, against the real recording of the same text.

A checkpoint trained with instructions (``finetune_info.json``: ``trained_calls.instruct`` holds true; every
voice-design export) speaks each row with the row's own instruction, and perplexity is conditioned on it too. The
means are then also grouped per instruction (``"instructions"``, keyed by the instruction text, "" = none), beside
the per-speaker ones. Where an instruction can be left out (custom voice), each row with one is generated a second
time without it (same text, speaker and seed), and ``instruct_effect`` says how far the instruction moved the
prosody (``metrics.prosody_difference`` of the clip with it against the clip without it: 0 semitones and ratios of
1 = the instruction changed nothing).

Scoring models load once (``scorers.load_scorers``) and are passed in; one that cannot load is reported as
unavailable with the reason, never replaced. Every number names the scorer behind it; ranges and directions come
from ``metrics.metric_catalogue``. The runner returns results as JSON-safe dicts; ``report`` writes and logs them.
"""

from __future__ import annotations

import gc
import math
import re
import time
from pathlib import Path

from tqdm.auto import tqdm

from finetuning.constants import FRAME_RATE_HZ, SAMPLE_RATE
from finetuning.evaluation import end_of_speech as eos
from finetuning.evaluation.grouping import instruct_effect, instruction_groups, means
from finetuning.evaluation.metrics import metric_catalogue
from finetuning.evaluation.scorers import Scorers, load_scorers
from finetuning.evaluation.speech import (
    MODEL_TYPES,
    EvaluationError,
    generate_speech,
    generation_language,
    load_model,
    make_voice,
    speaking_layout,
    utterance_seed,
)
from finetuning.evaluation.targets import SpeakerTargets, checked, held_out_perplexity, load_targets, score_generated
from finetuning.settings import Settings
from finetuning.training.data import build_examples
from finetuning.training.export import read_info

REPORT_VERSION = 1
AUDIO_DIR = "audio"
REAL_AUDIO_SUBDIR = "real"  # the held-out recordings themselves, for listening beside the generated clips
WITHOUT_INSTRUCT_SUBDIR = "without_instruct"  # the same rows generated without their instruction


def evaluate_model(
    wrapper,
    settings: Settings,
    targets: dict[str, SpeakerTargets],
    scorers: Scorers,
    checkpoint: str | Path,
    output_dir: str | Path,
    audio_subdir: str = AUDIO_DIR,
    layout: str | None = None,
    layout_source: str | None = None,
    step: int | None = None,
    language: str | None = None,
) -> dict:
    """Generate and score every target speaker's held-out texts with ``wrapper`` (a loaded ``Qwen3TTSModel``),
    each in its row's language, or with ``language="auto"`` in stock's "Auto" (``language`` left out).

    Generated clips are written under ``output_dir/audio_subdir/<speaker>/``; the returned report (JSON-safe,
    see ``render_markdown``) refers to them by relative path. ``layout`` None means the checkpoint's training
    layout (finetune_info.json), else TRAINING_LAYOUT. Raises EvaluationError for an unsupported model type or a
    speaker the checkpoint lacks.
    """
    model = wrapper.model
    if model.tts_model_type not in MODEL_TYPES:
        raise EvaluationError(f"cannot evaluate a {model.tts_model_type!r} model; one of {', '.join(MODEL_TYPES)}")
    model.eval()
    layout, layout_source = _layout(str(checkpoint), settings, layout, layout_source, model.tts_model_type)
    max_new_tokens = math.ceil(settings.EVAL_MAX_SECONDS * FRAME_RATE_HZ)
    output_dir = Path(output_dir)
    described = scorers.describe()
    started = time.perf_counter()
    speakers = {
        speaker: _evaluate_speaker(
            wrapper, speaker, target, scorers, settings, layout, max_new_tokens, output_dir, audio_subdir, language
        )
        for speaker, target in targets.items()
    }
    return {
        "report_version": REPORT_VERSION,
        "kind": "evaluation",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "elapsed_s": round(time.perf_counter() - started, 2),
        "step": step,
        "output_dir": str(output_dir.resolve()),
        "checkpoint": {
            "path": str(checkpoint),
            "model_type": model.tts_model_type,
            "layout": layout,
            "layout_source": layout_source,
            "generate_defaults": dict(wrapper.generate_defaults),
            "trained_instruct": read_info(model.name_or_path).get("trained_calls", {}).get("instruct"),
        },
        "generation": {
            "sampling": "the model's generate_config defaults, seeded per utterance (utterance_seed)",
            "seed": settings.SEED,
            "max_new_tokens": max_new_tokens,
            "max_seconds": settings.EVAL_MAX_SECONDS,
            "max_utterances": settings.EVAL_MAX_UTTERANCES,
        },
        "scorers": described,
        "metrics": {
            name: {**info, "scorer": described[info["group"]]["backend"]} for name, info in metric_catalogue().items()
        },
        "end_of_speech": end_of_speech_summary(speakers),
        "speakers": speakers,
        "instructions": instruction_groups(speakers, described),
        "settings": settings.public_dict(),
    }


def end_of_speech_summary(speakers: dict[str, dict]) -> dict:
    """End-of-speech failures over every speaker's generations ("overall") with the thresholds used; each
    speaker's own counts are in its section's "end_of_speech"."""
    kinds = [u["end_of_speech"] for section in speakers.values() for u in section["utterances"]]
    return {
        "thresholds": {
            "runaway": "reached max_new_tokens without EOS",
            "truncated": f"duration < {eos.EOS_SHORT_RATIO} x characters x the speaker's seconds per character",
            "run_on": f"duration > {eos.EOS_LONG_RATIO} x characters x the speaker's seconds per character",
            "seconds_per_char": "median over the speaker's real held-out clips",
        },
        "overall": eos.failure_counts(kinds),
    }


def _evaluate_speaker(
    wrapper,
    speaker: str,
    target: SpeakerTargets,
    scorers: Scorers,
    settings: Settings,
    layout: str,
    max_new_tokens: int,
    output_dir: Path,
    audio_subdir: str,
    language_override: str | None = None,
) -> dict:
    """One speaker's section of the report: every held-out utterance generated, saved under
    ``output_dir/audio_subdir/<speaker>/`` and scored, then the means of the generated and of the real clips."""
    import soundfile as sf

    model = wrapper.model
    section = {
        "split": target.split,
        "note": target.note,
        "language": target.utterances[0].language if target.utterances else None,
        "references": target.reference_ids,
        "unavailable": dict(target.unavailable),
        "utterances": [],
        "means": {},
        "real_audio": {},
    }
    if not target.utterances:
        return section
    voice = make_voice(wrapper, speaker, target, non_streaming=layout == "non_streaming")
    section["conditioning"] = voice.conditioning
    instructs = {u.id: u.instruct if voice.takes_instruct else "" for u in target.utterances}
    rows = [
        {"id": u.id, "text": u.text, "language": u.language, "audio_codes": u.codes, "instruct": instructs[u.id]}
        for u in target.utterances
    ]
    examples, section["skipped_rows"] = build_examples(rows, 0, wrapper.processor.tokenizer, speaker, target.split)
    by_id = {example.id: example for example in examples}
    spoken = [u for u in target.utterances if u.id in by_id]
    real_s = [u.audio.size / SAMPLE_RATE for u in target.utterances]
    seconds_per_char = eos.speaking_rate([u.text for u in target.utterances], real_s)
    for utterance in tqdm(spoken, desc=f"{speaker}: generating and scoring", unit="utt", leave=False):
        language = language_override or generation_language(model, utterance.language)
        seed = utterance_seed(settings.SEED, speaker, utterance.id)
        instruct = instructs[utterance.id]
        wav = generate_speech(voice, utterance.text, language, seed, max_new_tokens, wrapper.device, instruct)
        audio_path = Path(audio_subdir) / speaker / _file_name(utterance.id)  # relative to output_dir
        real_path = Path(AUDIO_DIR) / REAL_AUDIO_SUBDIR / speaker / _file_name(utterance.id)
        for path, samples in ((audio_path, wav), (real_path, utterance.audio)):
            (output_dir / path).parent.mkdir(parents=True, exist_ok=True)
            sf.write(output_dir / path, samples, SAMPLE_RATE)
        example = by_id[utterance.id]
        perplexities, tokens = held_out_perplexity(
            model, example.text_ids, utterance.codes, voice.speaker_embed, language, layout, example.instruct_ids
        )
        values, errors, transcript = score_generated(wav, utterance, target, scorers)
        frames = round(wav.size / SAMPLE_RATE * FRAME_RATE_HZ)
        # stock generate returns at most max_new_tokens - 1 frames: the last sampled token's codebooks 2-16 are
        # never predicted
        capped = frames >= max_new_tokens - 1
        ending = eos.end_of_speech_failure(utterance.text, wav.size / SAMPLE_RATE, seconds_per_char, capped)
        values["eos_failure_rate"] = float(ending is not None)
        section["utterances"].append(
            {
                "id": utterance.id,
                "text": utterance.text,
                "generation_language": language,
                "seed": seed,
                "audio": audio_path.as_posix(),
                "real_audio": real_path.as_posix(),
                "generated_frames": frames,
                "generated_s": wav.size / SAMPLE_RATE,
                "reached_length_cap": capped,
                "end_of_speech": ending,
                "real_s": utterance.audio.size / SAMPLE_RATE,
                "values": {**checked(perplexities, errors), **values},
                "tokens": tokens,
                "transcript": transcript,
                "errors": errors,
                "instruct": instruct,
            }
        )
        if instruct and voice.without:
            without_path = Path(audio_subdir) / WITHOUT_INSTRUCT_SUBDIR / speaker / _file_name(utterance.id)
            effect = instruct_effect(voice, utterance.text, language, seed, max_new_tokens, wrapper.device, wav)
            (output_dir / without_path).parent.mkdir(parents=True, exist_ok=True)
            sf.write(output_dir / without_path, effect.pop("wav"), SAMPLE_RATE)
            section["utterances"][-1]["instruct_effect"] = {"audio_without": without_path.as_posix(), **effect}
    described = scorers.describe()
    section["end_of_speech"] = {
        **eos.failure_counts([u["end_of_speech"] for u in section["utterances"]]),
        "seconds_per_char": seconds_per_char,
    }
    section["means"] = means(section["utterances"], described)
    section["real_audio"] = means(target.real, described)
    return section


def compare_reports(baseline: dict, candidate: dict) -> dict:
    """Side-by-side report: both runs and, per speaker and metric, candidate - baseline with a verdict."""
    difference = {}
    for speaker, section in candidate["speakers"].items():
        base_means = baseline["speakers"].get(speaker, {}).get("means", {})
        rows = {}
        for metric, mean in section.get("means", {}).items():
            if metric not in base_means:
                continue
            a, b = base_means[metric]["value"], mean["value"]
            better = metric_catalogue()[metric]["better"]
            rows[metric] = {
                "baseline": a,
                "candidate": b,
                "difference": None if a is None or b is None else b - a,
                "verdict": _verdict(better, a, b),
                "scorer": mean["scorer"],
            }
        difference[speaker] = rows
    return {
        "report_version": REPORT_VERSION,
        "kind": "comparison",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "output_dir": candidate["output_dir"],
        "baseline": baseline,
        "candidate": candidate,
        "difference": difference,
    }


def _verdict(better: str, baseline: float | None, candidate: float | None) -> str | None:
    if baseline is None or candidate is None:
        return None
    if better in ("higher", "lower"):
        gain = (candidate - baseline) * (1 if better == "higher" else -1)
    else:  # "closer to X"
        target = float(better.rsplit(" ", 1)[-1])
        gain = abs(baseline - target) - abs(candidate - target)
    return "better" if gain > 0 else "worse" if gain < 0 else "same"


def select_speakers(wrapper, settings: Settings, requested: list[str] | None = None) -> list[str]:
    """Requested speakers, else a custom-voice checkpoint's trained speakers, else TRAIN_SPEAKERS.

    Raises EvaluationError for a requested speaker a custom-voice checkpoint does not have.
    """
    model = wrapper.model
    if model.tts_model_type != "custom_voice":
        return list(requested or settings.TRAIN_SPEAKERS)
    available = list(read_info(model.name_or_path).get("speakers", {})) or list(model.config.talker_config.spk_id)
    missing = [s for s in requested or [] if s.lower() not in [a.lower() for a in available]]
    if missing:
        raise EvaluationError(f"speaker(s) {missing} are not in {model.name_or_path}; it has {sorted(available)}")
    return list(requested or available)


def default_output_dir(settings: Settings, step: int | None = None) -> Path:
    """OUTPUT_DIR/evaluation, or OUTPUT_DIR/evaluation/step-NNNNNN for an evaluation during training."""
    root = Path(settings.OUTPUT_DIR) / "evaluation"
    return root if step is None else root / f"step-{step:06d}"


def evaluate_checkpoint(
    checkpoint_dir: str | Path,
    settings: Settings,
    scorers: Scorers | None = None,
    step: int | None = None,
    output_dir: str | Path | None = None,
    speakers: list[str] | None = None,
    targets: dict[str, SpeakerTargets] | None = None,
    language: str | None = None,
) -> dict:
    """Load ``checkpoint_dir`` and evaluate it (``evaluate_model``, ``language``: "auto" or None for each row's);
    the generated audio goes under ``output_dir`` (default ``default_output_dir``). Returns the report;
    ``report.write_report`` writes it.

    For repeated evaluations (during training): pass ``scorers`` (``load_scorers``) and ``targets``
    (``load_targets``) made once so that each call only loads the checkpoint, generates and scores.
    Raises EvaluationError / DataError with the reason.
    """
    scorers = scorers if scorers is not None else load_scorers(settings)
    wrapper = load_model(checkpoint_dir, settings)
    if targets is None:
        targets = load_targets(settings, select_speakers(wrapper, settings, speakers), scorers)
    output_dir = Path(output_dir) if output_dir else default_output_dir(settings, step)
    report = evaluate_model(
        wrapper, settings, targets, scorers, checkpoint_dir, output_dir, step=step, language=language
    )
    del wrapper
    _free_memory()
    return report


def compare_checkpoints(
    checkpoint_dir: str | Path,
    baseline_dir: str | Path,
    settings: Settings,
    scorers: Scorers | None = None,
    output_dir: str | Path | None = None,
    speakers: list[str] | None = None,
    language: str | None = None,
) -> dict:
    """Evaluate ``checkpoint_dir`` (candidate) and ``baseline_dir`` (e.g. the Base model as a zero-shot clone)
    on the same utterances, seeds and scorers; return the comparison (``compare_reports``).

    A Base baseline is generated with the candidate's layout, so the two differ only in the weights and the
    speaker conditioning. Audio goes to ``audio/checkpoint`` and ``audio/compare``.
    """
    scorers = scorers if scorers is not None else load_scorers(settings)
    output_dir = Path(output_dir) if output_dir else default_output_dir(settings)
    wrapper = load_model(checkpoint_dir, settings)
    targets = load_targets(settings, select_speakers(wrapper, settings, speakers), scorers)
    candidate = evaluate_model(
        wrapper,
        settings,
        targets,
        scorers,
        checkpoint_dir,
        output_dir,
        audio_subdir=f"{AUDIO_DIR}/checkpoint",
        language=language,
    )
    del wrapper
    _free_memory()
    wrapper = load_model(baseline_dir, settings)
    select_speakers(wrapper, settings, list(targets))
    layout = candidate["checkpoint"]["layout"] if wrapper.model.tts_model_type == "base" else None
    baseline = evaluate_model(
        wrapper,
        settings,
        targets,
        scorers,
        baseline_dir,
        output_dir,
        audio_subdir=f"{AUDIO_DIR}/compare",
        layout=layout,
        layout_source="same as the evaluated checkpoint" if layout else None,
        language=language,
    )
    del wrapper
    _free_memory()
    return compare_reports(baseline, candidate)


def _free_memory() -> None:
    """Give a released model's memory back before the next one loads (two 1.7B models need not coexist)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _layout(checkpoint: str, settings: Settings, layout: str | None, source: str | None, model_type: str):
    if layout is not None:
        return layout, source or "given by the caller"
    # Any checkpoint this package exported (custom-voice or voice-clone) speaks in the layout it was trained in;
    # one trained in both (mixed) in the stock call's default.
    trained = read_info(checkpoint).get("training_layout") if Path(checkpoint).is_dir() else None
    if trained:
        return speaking_layout(trained, model_type), "finetune_info.json"
    return speaking_layout(settings.TRAINING_LAYOUT, model_type), "TRAINING_LAYOUT setting"


def _file_name(utterance_id: str) -> str:
    return re.sub(r"[^\w.-]", "_", utterance_id) + ".wav"
