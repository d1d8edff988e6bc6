"""Evaluation on generated speech, per speaker: generate -> score against real audio -> JSON + Markdown report.

For every speaker the runner takes up to EVAL_MAX_UTTERANCES held-out utterances (the validation split, else the
test split), lets the model under evaluation speak each text (free-running sampling, seeded per utterance, at most
EVAL_MAX_SECONDS) and scores the result:

* perplexity   teacher-forced on the utterance's real codes: codec-0 (talker) and sub-talker (codebooks 2-16)
               separately, conditioned exactly as generation conditions the model (same speaker embedding,
               language prefix and layout);
* speaker similarity of the generated clip to the speaker's reference clips;
* pronunciation (WER/CER of an ASR transcript) where the recogniser knows the language;
* tone (speaker-normalised F0 contour) and prosody, against the real recording of the same text.

The model type decides how it speaks: a ``custom_voice`` checkpoint (exported by this package) through stock
``generate_custom_voice(speaker=...)`` with its own speaker row; a ``base`` model as a zero-shot clone through
stock ``generate_voice_clone`` in x-vector-only mode from the speaker's first reference clip. Scoring models
load once (``load_scorers``) and are passed in; one that cannot load is reported as unavailable with the reason,
never replaced. Every number in the report names the scorer behind it; ranges and directions come from the table
in ``finetuning.evaluation.metrics``. The training loop can call ``evaluate_checkpoint`` and ``log_report``
(``finetuning.evaluation.report`` writes and logs reports).
"""

from __future__ import annotations

import gc
import logging
import math
import re
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from finetuning.evaluation import metrics
from finetuning.evaluation.report import (  # noqa: F401  (the report API is re-exported for callers of the runner)
    JSON_FILE,
    MARKDOWN_FILE,
    log_report,
    render_markdown,
    report_scalars,
    write_report,
)
from finetuning.evaluation.scorers import (
    BackendUnavailable,
    SpeakerEncoder,
    SpeechRecognizer,
    load_asr_backend,
    load_speaker_backend,
)
from finetuning.preparation import schema
from finetuning.preparation.audio import resample
from finetuning.settings import Settings
from finetuning.training.data import DataError, build_examples, load_split
from finetuning.training.export import read_info

logger = logging.getLogger(__name__)

REPORT_VERSION = 1
SAMPLE_RATE = 24_000
FRAME_RATE_HZ = 12.5  # 12 Hz codec frames per second
HELD_OUT_SPLITS = ("validation", "test")  # first one with rows is evaluated
ROW_COLUMNS = ["id", "text", "language", "audio", "audio_codes"]
MODEL_TYPES = ("base", "custom_voice")
AUDIO_DIR = "audio"
PITCH_SCORER = "librosa-pyin+mfcc-dtw"  # analyse_clip features, DTW-aligned to the real clip
PERPLEXITY_SCORER = "teacher-forced talker of the evaluated model"
GROUP_METRICS = {
    "perplexity": ("perplexity_codec0", "perplexity_sub_talker"),
    "speaker_similarity": ("speaker_similarity",),
    "pronunciation": ("wer", "cer"),
    "tone": ("tone_f0_corr", "tone_f0_rmse_st", "tone_voicing_agreement"),
    "prosody": (
        "f0_median_diff_st",
        "f0_range_diff_st",
        "energy_corr",
        "syllable_rate_ratio",
        "duration_ratio",
        "pause_fraction_diff",
    ),
}
METRIC_GROUP = {metric: group for group, names in GROUP_METRICS.items() for metric in names}
NAN_REASON = "not computable for this clip (the metric gave NaN, e.g. no voiced frames)"


class EvaluationError(RuntimeError):
    """The evaluation cannot run as asked (model type, missing speaker, unloadable checkpoint); says why."""


@lru_cache(maxsize=1)
def metric_catalogue() -> dict[str, dict[str, str]]:
    """{metric: {"group", "range", "better"}} for every reported metric, from the table in ``metrics``' docstring."""
    table = {}
    for line in (metrics.__doc__ or "").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not line.lstrip().startswith("|") or len(cells) != 3 or cells[0] == "metric" or not cells[0].strip("-"):
            continue
        for name in cells[0].split(" / "):
            table[name.strip()] = {"range": cells[1], "better": cells[2]}
    catalogue = {}
    for metric, group in METRIC_GROUP.items():
        row = table.get("perplexity" if group == "perplexity" else metric)
        if row is None:
            raise RuntimeError(f"finetuning.evaluation.metrics' docstring table has no row for {metric!r}")
        catalogue[metric] = {"group": group, **row}
    return catalogue


# ---------------------------------------------------------------------------------------------- scorers --


@dataclass
class Scorers:
    """Scoring models loaded once; ``unavailable`` maps a metric group to why its scorer could not load."""

    speaker: SpeakerEncoder | None
    asr: SpeechRecognizer | None
    unavailable: dict[str, str] = field(default_factory=dict)

    def describe(self) -> dict[str, dict]:
        """{group: {"backend": name or None, "skipped": {backend: reason}, "unavailable": reason}}."""
        out = {"perplexity": {"backend": PERPLEXITY_SCORER}}
        for group, backend in (("speaker_similarity", self.speaker), ("pronunciation", self.asr)):
            if backend is None:
                out[group] = {"backend": None, "unavailable": self.unavailable.get(group, "not loaded")}
            else:
                out[group] = {"backend": backend.name, "skipped": dict(backend.skipped)}
        if self.asr is not None:
            out["pronunciation"]["languages"] = list(self.asr.languages) if self.asr.languages else "any"
        out["tone"] = {"backend": PITCH_SCORER}
        out["prosody"] = {"backend": PITCH_SCORER}
        return out


def load_scorers(settings: Settings) -> Scorers:
    """Speaker encoder (SPEAKER_SIM_BACKEND, ECAPA_SOURCE) and recogniser (ASR_BACKEND, ASR_MODEL) per settings.

    Weights come from local folders or the HF cache unless SCORER_ALLOW_DOWNLOAD. A backend that cannot load is
    recorded in ``unavailable`` with the reason; its metrics are then reported as unavailable, not computed with
    another backend ("auto" lists what it tried first in the loaded backend's ``skipped``).
    """
    from finetuning.generate import resolve_device

    device = resolve_device(settings.DEVICE)
    common = {"device": device, "allow_download": settings.SCORER_ALLOW_DOWNLOAD, "token": settings.HF_TOKEN or None}
    scorers = Scorers(speaker=None, asr=None)
    try:
        scorers.speaker = load_speaker_backend(settings.SPEAKER_SIM_BACKEND, settings.ECAPA_SOURCE, **common)
    except BackendUnavailable as error:
        scorers.unavailable["speaker_similarity"] = str(error)
    try:
        scorers.asr = load_asr_backend(settings.ASR_BACKEND, settings.ASR_MODEL or None, **common)
    except (BackendUnavailable, ValueError) as error:
        scorers.unavailable["pronunciation"] = str(error)
    return scorers


# ---------------------------------------------------------------------------------------------- targets --


@dataclass
class Utterance:
    """One held-out utterance: real 24 kHz audio, its codes (T, 16) and its pitch analysis (None if silent)."""

    id: str
    text: str
    language: str
    audio: np.ndarray
    codes: np.ndarray
    analysis: metrics.ClipAnalysis | None
    analysis_error: str | None = None


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
        refs = load_split(settings, speaker, schema.REFERENCE_SPLIT, ["id", "audio"])
        if refs is None or len(refs) == 0:
            raise DataError(f"speaker {speaker} has no reference split; re-run data preparation")
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
        asr_reason = _asr_unavailable(scorers, language)
        if asr_reason:
            target.unavailable["pronunciation"] = asr_reason
        for utterance in utterances:
            values, errors, _ = _score_identity(utterance.audio, utterance, target, scorers)
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
    return Utterance(row["id"], row["text"], row["language"], audio, codes, analysis, error)


# -------------------------------------------------------------------------------------------- scoring --


def _finite(value: float) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def _score_identity(audio, utterance: Utterance, target: SpeakerTargets, scorers: Scorers):
    """Speaker similarity and pronunciation of one clip: (values, errors, transcript)."""
    values, errors, transcript = {}, {}, None
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
    return _checked(values, errors), errors, transcript


def _score_generated(audio, utterance: Utterance, target: SpeakerTargets, scorers: Scorers):
    values, errors, transcript = _score_identity(audio, utterance, target, scorers)
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
        values.update(_checked(pitch, errors))
    return values, errors, transcript


def _checked(values: dict, errors: dict) -> dict:
    """Values with NaN turned into None (JSON null), each such metric's reason added to ``errors``."""
    out = {metric: _finite(value) for metric, value in values.items()}
    errors.update({metric: NAN_REASON for metric, value in out.items() if value is None})
    return out


def held_out_perplexity(model, text_ids, codes, speaker_embed, language: str, layout: str) -> tuple[dict, dict]:
    """Teacher-forced perplexities of one utterance's real codes: ({metric: value}, {metric: targets scored}).

    ``model`` is a ``Qwen3TTSForConditionalGeneration``; text_ids (Lt,) long, codes (T, 16) long, speaker_embed
    (D,). Codec-0 covers the T first codes and EOS; sub-talker covers the 15 x T codes of codebooks 2-16.
    """
    import torch

    from finetuning.training.step import build_talker_inputs, language_id_for, talker_forward

    device = model.talker.device
    with torch.inference_mode():
        inputs = build_talker_inputs(
            model,
            [torch.as_tensor(text_ids, device=device)],
            [torch.as_tensor(codes, device=device, dtype=torch.long)],
            speaker_embed.view(1, -1).to(device, model.talker.dtype),
            [language_id_for(model.config.talker_config, language)],
            layout=layout,
        )
        out = talker_forward(model, inputs)
        values = {
            "perplexity_codec0": metrics.perplexity(out.codec0_logits, inputs.labels),
            "perplexity_sub_talker": metrics.perplexity(out.sub_talker_logits, out.frame_codes[:, 1:]),
        }
    return values, {"perplexity_codec0": out.codec0_tokens, "perplexity_sub_talker": out.sub_talker_tokens}


# ----------------------------------------------------------------------------------------- generation --


@dataclass
class Voice:
    """How one model speaks as one speaker: the generation call and the speaker embedding (D,) it conditions on."""

    speaker_embed: object
    conditioning: str
    speak: Callable[[str, str, int], tuple[list, int]]  # (text, language, max_new_tokens) -> (wavs, sample_rate)


def make_voice(wrapper, speaker: str, target: SpeakerTargets, non_streaming: bool) -> Voice:
    """A ``custom_voice`` model speaks with its own speaker row; a ``base`` model clones the first reference clip
    from its x-vector (stock ``generate_voice_clone``, x_vector_only_mode). Raises EvaluationError otherwise."""
    model = wrapper.model
    if model.tts_model_type == "custom_voice":
        rows = model.config.talker_config.spk_id
        if speaker.lower() not in rows:
            raise EvaluationError(f"speaker {speaker!r} is not in this checkpoint; it has {sorted(rows)}")
        row = rows[speaker.lower()]
        embed = model.talker.get_input_embeddings().weight[row].detach()

        def speak(text, language, max_new_tokens):
            return wrapper.generate_custom_voice(
                text=text,
                speaker=speaker,
                language=language,
                non_streaming_mode=non_streaming,
                max_new_tokens=max_new_tokens,
            )

        return Voice(embed, f"generate_custom_voice(speaker={speaker!r}); codec row {row}", speak)
    if model.tts_model_type == "base":
        prompt = wrapper.create_voice_clone_prompt(
            ref_audio=(target.references[0], SAMPLE_RATE), x_vector_only_mode=True
        )

        def speak(text, language, max_new_tokens):
            return wrapper.generate_voice_clone(
                text=text,
                language=language,
                voice_clone_prompt=prompt,
                non_streaming_mode=non_streaming,
                max_new_tokens=max_new_tokens,
            )

        conditioning = f"generate_voice_clone(x_vector_only_mode=True) from reference {target.reference_ids[0]!r}"
        return Voice(prompt[0].ref_spk_embedding.detach(), conditioning, speak)
    raise EvaluationError(f"cannot evaluate a {model.tts_model_type!r} model; one of {', '.join(MODEL_TYPES)}")


def utterance_seed(seed: int, speaker: str, utterance_id: str) -> int:
    """Seed of one utterance's generation: stable across runs, processes and utterance order."""
    return zlib.crc32(f"{seed}:{speaker}:{utterance_id}".encode())


def generate_speech(voice: Voice, text: str, language: str, seed: int, max_new_tokens: int, device) -> np.ndarray:
    """One sampled clip (24 kHz float32). The caller's RNG state is restored afterwards, so calling this from a
    training loop does not change the training run."""
    import torch

    device = torch.device(device)
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        wavs, sample_rate = voice.speak(text, language, max_new_tokens)
    return resample(np.asarray(wavs[0], dtype=np.float32).reshape(-1), int(sample_rate), SAMPLE_RATE)


def _generation_language(model, language: str) -> str:
    """The language generation is given: the row's if the model has an id for it, else "auto" (as in training)."""
    return language if language.lower() in model.config.talker_config.codec_language_id else "auto"


def _layout(wrapper, checkpoint: str, settings: Settings, layout: str | None, source: str | None):
    if layout is not None:
        return layout, source or "given by the caller"
    trained = read_info(checkpoint).get("training_layout") if Path(checkpoint).is_dir() else None
    if trained and wrapper.model.tts_model_type == "custom_voice":
        return trained, "finetune_info.json"
    return settings.TRAINING_LAYOUT, "TRAINING_LAYOUT setting"


def _file_name(utterance_id: str) -> str:
    return re.sub(r"[^\w.-]", "_", utterance_id) + ".wav"


# ------------------------------------------------------------------------------------------------ runner --


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
) -> dict:
    """Generate and score every target speaker's held-out texts with ``wrapper`` (a loaded ``Qwen3TTSModel``).

    Generated clips are written under ``output_dir/audio_subdir/<speaker>/``; the returned report (JSON-safe,
    see ``render_markdown``) refers to them by relative path. ``layout`` None means the checkpoint's training
    layout (finetune_info.json), else TRAINING_LAYOUT. Raises EvaluationError for an unsupported model type or a
    speaker the checkpoint lacks.
    """
    model = wrapper.model
    if model.tts_model_type not in MODEL_TYPES:
        raise EvaluationError(f"cannot evaluate a {model.tts_model_type!r} model; one of {', '.join(MODEL_TYPES)}")
    model.eval()
    layout, layout_source = _layout(wrapper, str(checkpoint), settings, layout, layout_source)
    max_new_tokens = math.ceil(settings.EVAL_MAX_SECONDS * FRAME_RATE_HZ)
    output_dir = Path(output_dir)
    described = scorers.describe()
    started = time.perf_counter()
    speakers = {
        speaker: _evaluate_speaker(
            wrapper, speaker, target, scorers, settings, layout, max_new_tokens, output_dir, audio_subdir
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
        "speakers": speakers,
        "settings": settings.public_dict(),
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
    rows = [{"id": u.id, "text": u.text, "language": u.language, "audio_codes": u.codes} for u in target.utterances]
    examples, section["skipped_rows"] = build_examples(rows, 0, wrapper.processor.tokenizer, speaker, target.split)
    text_ids = {example.id: example.text_ids for example in examples}
    spoken = [u for u in target.utterances if u.id in text_ids]
    for utterance in tqdm(spoken, desc=f"{speaker}: generating and scoring", unit="utt", leave=False):
        language = _generation_language(model, utterance.language)
        seed = utterance_seed(settings.SEED, speaker, utterance.id)
        wav = generate_speech(voice, utterance.text, language, seed, max_new_tokens, wrapper.device)
        audio_path = Path(audio_subdir) / speaker / _file_name(utterance.id)  # relative to output_dir
        (output_dir / audio_path).parent.mkdir(parents=True, exist_ok=True)
        sf.write(output_dir / audio_path, wav, SAMPLE_RATE)
        perplexities, tokens = held_out_perplexity(
            model, text_ids[utterance.id], utterance.codes, voice.speaker_embed, utterance.language, layout
        )
        values, errors, transcript = _score_generated(wav, utterance, target, scorers)
        frames = round(wav.size / SAMPLE_RATE * FRAME_RATE_HZ)
        section["utterances"].append(
            {
                "id": utterance.id,
                "text": utterance.text,
                "generation_language": language,
                "seed": seed,
                "audio": audio_path.as_posix(),
                "generated_frames": frames,
                "generated_s": wav.size / SAMPLE_RATE,
                # stock generate returns at most max_new_tokens - 1 frames: the last sampled token's
                # codebooks 2-16 are never predicted
                "reached_length_cap": frames >= max_new_tokens - 1,
                "real_s": utterance.audio.size / SAMPLE_RATE,
                "values": {**_checked(perplexities, errors), **values},
                "tokens": tokens,
                "transcript": transcript,
                "errors": errors,
            }
        )
    described = scorers.describe()
    section["means"] = _means(section["utterances"], described)
    section["real_audio"] = _means(target.real, described)
    return section


def _means(utterances: list[dict], described: dict) -> dict:
    """{metric: {"value", "n", "of", "scorer", "aggregate"}}; perplexities are token-weighted (exp of the mean
    cross-entropy over all targets of all utterances), other metrics are plain means over utterances."""
    means = {}
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
        means[metric] = {
            "value": value,
            "n": len(present),
            "of": len(utterances),
            "scorer": described[info["group"]]["backend"],
            "aggregate": "token-weighted" if info["group"] == "perplexity" else "mean",
        }
    return means


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


# ------------------------------------------------------------------------------------------ entry points --


def load_model(checkpoint: str | Path, settings: Settings):
    """A checkpoint folder (or Hub id) through stock ``Qwen3TTSModel.from_pretrained`` on DEVICE.

    Raises EvaluationError for a local path that does not exist or a model that fails to load.
    """
    from finetuning.generate import load_checkpoint

    text = str(checkpoint)
    if not Path(text).is_dir() and (text.startswith(("/", ".", "~")) or text.count("/") != 1):
        raise EvaluationError(f"checkpoint {text!r} is not a folder (nor a Hub repo id)")
    try:
        return load_checkpoint(text, settings.DEVICE)
    except Exception as error:  # missing files, bad configs and hub errors come as many types
        raise EvaluationError(f"cannot load checkpoint {text!r}: {type(error).__name__}: {error}") from error


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
) -> dict:
    """Load ``checkpoint_dir``, evaluate it (``evaluate_model``), write evaluation.json + evaluation.md + audio to
    ``output_dir`` (default ``default_output_dir``) and return the report.

    For the training loop (main process only): pass ``scorers`` (``load_scorers``) and ``targets``
    (``load_targets``) made once so that each call only loads the checkpoint, generates and scores.
    Raises EvaluationError / DataError with the reason.
    """
    scorers = scorers if scorers is not None else load_scorers(settings)
    wrapper = load_model(checkpoint_dir, settings)
    if targets is None:
        targets = load_targets(settings, select_speakers(wrapper, settings, speakers), scorers)
    output_dir = Path(output_dir) if output_dir else default_output_dir(settings, step)
    report = evaluate_model(wrapper, settings, targets, scorers, checkpoint_dir, output_dir, step=step)
    del wrapper
    _free_memory()
    write_report(report, output_dir, settings)
    return report


def compare_checkpoints(
    checkpoint_dir: str | Path,
    baseline_dir: str | Path,
    settings: Settings,
    scorers: Scorers | None = None,
    output_dir: str | Path | None = None,
    speakers: list[str] | None = None,
) -> dict:
    """Evaluate ``checkpoint_dir`` (candidate) and ``baseline_dir`` (e.g. the Base model as a zero-shot clone)
    on the same utterances, seeds and scorers; write and return the comparison (``compare_reports``).

    A Base baseline is generated with the candidate's layout, so the two differ only in the weights and the
    speaker conditioning. Audio goes to ``audio/checkpoint`` and ``audio/compare``.
    """
    scorers = scorers if scorers is not None else load_scorers(settings)
    output_dir = Path(output_dir) if output_dir else default_output_dir(settings)
    wrapper = load_model(checkpoint_dir, settings)
    targets = load_targets(settings, select_speakers(wrapper, settings, speakers), scorers)
    candidate = evaluate_model(
        wrapper, settings, targets, scorers, checkpoint_dir, output_dir, audio_subdir=f"{AUDIO_DIR}/checkpoint"
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
    )
    del wrapper
    _free_memory()
    report = compare_reports(baseline, candidate)
    write_report(report, output_dir, settings)
    return report


def _free_memory() -> None:
    """Give a released model's memory back before the next one loads (two 1.7B models need not coexist)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
