"""What each speaker's generated speech is compared with, and how one clip is scored against it.

``load_targets`` reads, per speaker, up to EVAL_MAX_UTTERANCES held-out utterances (the validation split, else
the test split) with their real audio, codes and pitch analysis, plus the speaker's reference clips, and scores the
real recordings once (the ceiling for speaker similarity, the recogniser's own floor for WER/CER). Every model
evaluated is then scored against the same targets: ``score_generated`` for a generated clip (speaker similarity,
pronunciation, tone, prosody) and ``held_out_perplexity`` for the model's teacher-forced perplexity of the real
codes. A metric that gives NaN is reported as None with ``metrics.NAN_REASON``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from finetuning.constants import SAMPLE_RATE
from finetuning.evaluation import metrics
from finetuning.evaluation.scorers import Scorers
from finetuning.preparation import schema
from finetuning.preparation.audio import resample
from finetuning.settings import Settings
from finetuning.training.data import load_references, load_split

HELD_OUT_SPLITS = ("validation", "test")  # first one with rows is evaluated
ROW_COLUMNS = ["id", "text", "language", "audio", "audio_codes", "instruct"]


@dataclass
class Utterance:
    """One held-out utterance: real 24 kHz audio, its codes (T, 16), its pitch analysis (None if silent) and the
    instruction it was recorded under ("" = none; a dataset prepared before the column existed has none)."""

    id: str
    text: str
    language: str
    audio: np.ndarray
    codes: np.ndarray
    analysis: metrics.ClipAnalysis | None
    analysis_error: str | None = None
    instruct: str = ""


@dataclass
class SpeakerTargets:
    """What a speaker's generated speech is compared with; scored once, shared by every model evaluated."""

    speaker: str
    split: str | None  # None: no held-out rows (``note`` says so)
    note: str
    utterances: list[Utterance]
    reference_ids: list[str]
    references: list[np.ndarray]
    unavailable: dict[str, str]  # group -> why it cannot be scored for this speaker
    real: list[dict]  # per utterance: speaker similarity / WER / CER of the real recording


def _audio(row) -> np.ndarray:
    audio = np.asarray(row["audio"]["array"], dtype=np.float32)
    return resample(audio, int(row["audio"]["sampling_rate"]), SAMPLE_RATE)


def _asr_unavailable(scorers: Scorers, language: str) -> str | None:
    if scorers.asr is None:
        return scorers.unavailable.get("pronunciation", "no speech recogniser loaded")
    languages = scorers.asr.languages
    if languages is not None and language.lower() not in languages:
        return f"{scorers.asr.name} recognises only {', '.join(languages)}, not {language!r}"
    return None


def load_targets(settings: Settings, speakers: list[str], scorers: Scorers) -> dict[str, SpeakerTargets]:
    """Held-out utterances, reference clips and real-audio scores of each speaker.

    Raises DataError for a speaker that is not prepared or has no reference clip. A speaker without validation
    and test rows is kept with ``split=None`` and a note saying so.
    """
    targets = {}
    for speaker in speakers:
        refs = load_references(settings, speaker, ["id", "audio"])
        split, rows = None, []
        for candidate in HELD_OUT_SPLITS:
            dataset = load_split(settings, speaker, candidate, ROW_COLUMNS)
            if dataset is not None and len(dataset) > 0:
                split, rows = candidate, dataset.select(range(min(settings.EVAL_MAX_UTTERANCES, len(dataset))))
                break
        where = settings.HF_DATASET_REPO or settings.DATASET_DIR
        if split is None:
            note = (
                f"no validation or test rows for {speaker} in {where}: nothing to generate; prepare the data with "
                "VALIDATION_FRACTION > 0 (or TEST_FRACTION > 0)"
            )
        elif split == "validation":
            note = f"{len(rows)} validation utterance(s)"
        else:
            note = f"no validation rows for {speaker}; evaluated on {len(rows)} test utterance(s) instead"
        utterances = [_utterance(row) for row in rows]
        language = utterances[0].language if utterances else schema.UNKNOWN_LANGUAGE
        target = SpeakerTargets(
            speaker=speaker,
            split=split,
            note=note,
            utterances=utterances,
            reference_ids=[row["id"] for row in refs],
            references=[_audio(row) for row in refs],
            unavailable={},
            real=[],
        )
        if scorers.speaker is None:
            target.unavailable["speaker_similarity"] = scorers.unavailable.get("speaker_similarity", "not loaded")
        if scorers.naturalness is None:
            target.unavailable["naturalness"] = scorers.unavailable.get("naturalness", "not loaded")
        asr_reason = _asr_unavailable(scorers, language)
        if asr_reason:
            target.unavailable["pronunciation"] = asr_reason
        for utterance in utterances:
            values, errors, _ = score_identity(utterance.audio, utterance, target, scorers)
            target.real.append({"values": values, "errors": errors})
        targets[speaker] = target
    return targets


def _utterance(row) -> Utterance:
    audio = _audio(row)
    try:
        analysis, error = metrics.analyse_clip(audio, SAMPLE_RATE), None
    except ValueError as exc:
        analysis, error = None, f"real clip: {exc}"
    codes = np.asarray(row["audio_codes"], dtype=np.int64)
    instruct = (row.get("instruct") or "").strip()
    return Utterance(row["id"], row["text"], row["language"], audio, codes, analysis, error, instruct)


# -------------------------------------------------------------------------------------------- scoring --


def _finite(value: float) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def score_identity(audio, utterance: Utterance, target: SpeakerTargets, scorers: Scorers):
    """Speaker similarity, pronunciation and naturalness of one clip: (values, errors, transcript)."""
    values, errors, transcript = {}, {}, None
    if "naturalness" not in target.unavailable:
        try:
            values["naturalness"] = scorers.naturalness.score(audio, SAMPLE_RATE)
        except ValueError as error:
            errors["naturalness"] = str(error)
    if "speaker_similarity" not in target.unavailable:
        try:
            values["speaker_similarity"] = metrics.speaker_similarity(
                scorers.speaker, audio, target.references, SAMPLE_RATE
            )
        except ValueError as error:
            errors["speaker_similarity"] = str(error)
    if "pronunciation" not in target.unavailable:
        language = None if utterance.language == schema.UNKNOWN_LANGUAGE else utterance.language
        try:
            score = metrics.pronunciation_score(scorers.asr, audio, SAMPLE_RATE, utterance.text, language)
            values.update(wer=score.wer, cer=score.cer)
            transcript = score.transcript
        except ValueError as error:
            errors["pronunciation"] = str(error)
    return checked(values, errors), errors, transcript


def score_generated(audio, utterance: Utterance, target: SpeakerTargets, scorers: Scorers):
    """Speaker similarity, pronunciation, tone and prosody of a generated clip: (values, errors, transcript)."""
    values, errors, transcript = score_identity(audio, utterance, target, scorers)
    try:
        generated = metrics.analyse_clip(audio, SAMPLE_RATE)
    except ValueError as error:
        generated = None
        errors["tone"] = errors["prosody"] = f"generated clip: {error}"
    if generated is not None and utterance.analysis is None:
        errors["tone"] = errors["prosody"] = utterance.analysis_error or "real clip not analysed"
    elif generated is not None:
        pitch = metrics.tone_similarity(generated, utterance.analysis)
        pitch.update(metrics.prosody_difference(generated, utterance.analysis))
        values.update(checked(pitch, errors))
    return values, errors, transcript


def checked(values: dict, errors: dict) -> dict:
    """Values with NaN turned into None (JSON null), each such metric's reason added to ``errors``."""
    out = {metric: _finite(value) for metric, value in values.items()}
    errors.update({metric: metrics.NAN_REASON for metric, value in out.items() if value is None})
    return out


def held_out_perplexity(
    model, text_ids, codes, speaker_embed, language: str, layout: str, instruct_ids=None
) -> tuple[dict, dict]:
    """Teacher-forced perplexities of one utterance's real codes: ({metric: value}, {metric: targets scored}).

    ``model`` is a ``Qwen3TTSForConditionalGeneration``; text_ids (Lt,) long, codes (T, 16) long, speaker_embed
    (D,) or None (voice design: no speaker slot), instruct_ids (Li,) long the instruction's user turn as
    generation was given it, or None. Codec-0 covers the T first codes and EOS; sub-talker covers the 15 x T codes
    of codebooks 2-16.
    """
    import torch

    from finetuning.training.step import build_talker_inputs, language_id_for, talker_forward

    device = model.talker.device
    with torch.inference_mode():
        inputs = build_talker_inputs(
            model,
            [torch.as_tensor(text_ids, device=device)],
            [torch.as_tensor(codes, device=device, dtype=torch.long)],
            None if speaker_embed is None else speaker_embed.view(1, -1).to(device, model.talker.dtype),
            [language_id_for(model.config.talker_config, language)],
            layout=layout,
            instruct_ids=[None if instruct_ids is None else torch.as_tensor(instruct_ids, device=device)],
        )
        out = talker_forward(model, inputs)
        values = {
            "perplexity_codec0": metrics.perplexity(out.label_logits, out.label_targets),
            "perplexity_sub_talker": metrics.perplexity(out.sub_talker_logits, out.frame_codes[:, 1:]),
        }
    return values, {"perplexity_codec0": out.codec0_tokens, "perplexity_sub_talker": out.sub_talker_tokens}
