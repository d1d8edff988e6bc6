"""One typed, frozen, validated settings object, loaded from ``.env`` (python-dotenv).

Precedence, highest first: explicit overrides (command-line flags) > process environment > the ``.env`` file >
the defaults below. Every field carries a default, a unit and a one-line help; ``.env.training.example`` is
generated from the same table (``python -m finetuning.settings --example``) so the two cannot drift.

Unknown keys in the ``.env`` file: a key that looks like a misspelling of a known key (close match) is an
error naming the key it resembles; any other unknown key is reported once as a warning and ignored, so a
``.env`` may also hold variables for other tools (e.g. ``WANDB_API_KEY``).

``HF_TOKEN`` is a secret: it is read, never printed (``repr`` masks it) and never saved
(``public_dict`` leaves it out).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dotenv import dotenv_values

logger = logging.getLogger(__name__)

DEFAULT_ENV_FILE = ".env"
BUNDLED_SPEAKERS = ("english_speaker", "swahili_speaker")


class SettingsError(ValueError):
    """A setting has a value that is not allowed; the message names the key, the value and what is allowed."""


def _setting(default: Any, unit: str, help: str, choices: tuple[str, ...] | None = None, secret: bool = False):
    return field(
        default=default,
        repr=not secret,
        metadata={"unit": unit, "help": help, "choices": choices, "secret": secret},
    )


@dataclass(frozen=True)
class Settings:
    # --- data --------------------------------------------------------------------------------------------
    TRAIN_SPEAKERS: tuple[str, ...] = _setting(
        BUNDLED_SPEAKERS, "comma-separated names", "speakers to prepare and train; each is one dataset config"
    )
    VOICES_DIR: str = _setting(
        "voices", "path", "folder with <speaker>.wav reference clips and <speaker>/metadata.jsonl corpora"
    )
    DATASET_DIR: str = _setting("data/dataset", "path", "local prepared dataset (one config per speaker)")
    HF_DATASET_REPO: str = _setting(
        "",
        "Hub repo id",
        "dataset repo to upload to / train from, e.g. user/qwen3-tts-voices; empty = local only",
    )
    HF_DATASET_PRIVATE: bool = _setting(True, "bool", "create the Hub dataset repo as private")
    HF_TOKEN: str = _setting("", "secret", "Hugging Face token for upload and private repos", secret=True)
    VALIDATION_FRACTION: float = _setting(
        0.1, "fraction", "share of each speaker's clips held out for validation when no split is given"
    )
    SPEAKERS_MANIFEST: str = _setting(
        "", "path", "optional JSON naming each speaker's source, format, language and reference clips"
    )
    TEST_FRACTION: float = _setting(0.0, "fraction", "share of each speaker's clips held out as a test split")
    MIN_DURATION_S: float = _setting(0.5, "seconds", "clips shorter than this are rejected")
    MAX_DURATION_S: float = _setting(20.0, "seconds", "clips longer than this are rejected")
    MAX_SILENCE_FRACTION: float = _setting(
        0.7, "fraction", "clips whose share of silence (40 dB below their peak) exceeds this are rejected"
    )
    MAX_CLIPPED_FRACTION: float = _setting(
        0.001, "fraction", "clips with more samples at full scale than this share are rejected"
    )
    MIN_RMS_DBFS: float = _setting(-45.0, "dBFS", "clips quieter than this RMS level are rejected")
    MIN_CHARS_PER_S: float = _setting(
        1.0, "chars/second", "transcripts slower than this (non-space characters per second) are rejected"
    )
    MAX_CHARS_PER_S: float = _setting(
        35.0, "chars/second", "transcripts faster than this (non-space characters per second) are rejected"
    )
    NORMALIZE_LOUDNESS: bool = _setting(False, "bool", "scale every kept clip to TARGET_LOUDNESS_DBFS")
    TARGET_LOUDNESS_DBFS: float = _setting(-23.0, "dBFS", "RMS level of kept clips when NORMALIZE_LOUDNESS")
    ENCODE_BATCH_SIZE: int = _setting(8, "clips", "clips per speech-tokenizer batch during preparation")
    MAX_SHARD_SIZE_MB: float = _setting(256.0, "MB", "upper bound of one parquet shard of the dataset")
    # --- model -------------------------------------------------------------------------------------------
    INIT_MODEL_PATH: str = _setting(
        "Qwen/Qwen3-TTS-12Hz-1.7B-Base", "Hub id or path", "Base model to fine-tune (12 Hz, 0.6B or 1.7B)"
    )
    TOKENIZER_PATH: str = _setting(
        "Qwen/Qwen3-TTS-Tokenizer-12Hz", "Hub id or path", "12 Hz speech tokenizer used to precompute codes"
    )
    DEVICE: str = _setting(
        "auto",
        "device",
        "device for data preparation and evaluation (cpu also forces training onto the CPU): auto, cpu, cuda, cuda:N",
    )
    # --- training ----------------------------------------------------------------------------------------
    OUTPUT_DIR: str = _setting("outputs/run", "path", "where checkpoints, logs and the exported model go")
    BATCH_SIZE: int = _setting(2, "utterances", "per-device batch size when MAX_BATCH_TOKENS is 0")
    LEARNING_RATE: float = _setting(2e-5, "1/step", "AdamW peak learning rate")
    NUM_EPOCHS: int = _setting(3, "epochs", "passes over the training data")
    GRADIENT_ACCUMULATION_STEPS: int = _setting(4, "micro-batches", "micro-batches per optimizer step")
    MIXED_PRECISION: str = _setting("bf16", "mode", "accelerate mixed precision", choices=("no", "fp16", "bf16"))
    SEED: int = _setting(42, "int", "seed for splits, sampling and initialisation")
    TRAINING_LAYOUT: str = _setting(
        "non_streaming",
        "mode",
        "talker input layout trained; must match generation: non_streaming = generate_custom_voice's default, "
        "streaming = generate(non_streaming_mode=False)",
        choices=("non_streaming", "streaming"),
    )
    SUB_TALKER_LOSS_WEIGHT: float = _setting(0.3, "weight", "weight of the sub-talker (codebooks 2-16) loss")
    WEIGHT_DECAY: float = _setting(0.01, "coefficient", "AdamW weight decay")
    WARMUP_STEPS: int = _setting(10, "optimizer steps", "linear learning-rate warmup")
    LR_SCHEDULE: str = _setting("cosine", "name", "decay after warmup", choices=("cosine", "linear", "constant"))
    MAX_GRAD_NORM: float = _setting(1.0, "norm", "gradient clipping threshold; 0 disables clipping")
    MAX_STEPS: int = _setting(0, "optimizer steps", "stop after this many optimizer steps; 0 = NUM_EPOCHS decides")
    LOGGING_STEPS: int = _setting(10, "optimizer steps", "log the training loss every this many steps")
    EVAL_STEPS: int = _setting(
        100, "optimizer steps", "validation loss every this many steps (and at the end); 0 = only at the end"
    )
    SPEAKER_EMBEDDING_CLIPS: int = _setting(
        0, "clips", "training clips averaged into each speaker embedding besides the reference clips"
    )
    EXPORT_DIR: str = _setting("", "path", "where the custom_voice checkpoint is written; empty = OUTPUT_DIR/model")
    # --- data loading, resume, tracking --------------------------------------------------------------------
    MAX_BATCH_TOKENS: int = _setting(
        4096,
        "talker positions",
        "duration batching: padded positions (batch size x longest sequence) per batch; 0 = BATCH_SIZE batches",
    )
    NUM_BUCKETS: int = _setting(5, "buckets", "length buckets for duration batching")
    SPEAKER_MIXING: str = _setting(
        "balanced",
        "mode",
        "balanced = every speaker seen equally often (small speakers repeat), proportional = as in the data",
        choices=("balanced", "proportional"),
    )
    DATA_STREAMING: bool = _setting(
        False, "bool", "stream the configs (reads text and codes only, never caches the audio column)"
    )
    DATALOADER_WORKERS: int = _setting(2, "processes", "dataloader worker processes; 0 = load in the main process")
    SAVE_STEPS: int = _setting(500, "optimizer steps", "save a resumable training state every this many steps; 0 = off")
    SAVE_TOTAL_LIMIT: int = _setting(2, "states", "keep only the newest N saved training states")
    RESUME_FROM: str = _setting("", "latest or path", "resume from OUTPUT_DIR's latest state or a state folder")
    REPORT_TO: tuple[str, ...] = _setting(
        ("tensorboard",), "comma-separated names", "trackers: tensorboard, wandb, or none"
    )
    WANDB_MODE: str = _setting(
        "offline", "mode", "W&B mode when REPORT_TO has wandb; offline needs no network", choices=("offline", "online")
    )
    RECORD_SAMPLE_IDS: bool = _setting(
        False, "bool", "write the ids each process trained on to OUTPUT_DIR/samples_rank<N>.jsonl (audits)"
    )
    # --- auxiliary losses ----------------------------------------------------------------------------------
    USE_AUXILIARY_LOSSES: bool = _setting(
        False, "bool", "add the mel / voice / prosody losses through the frozen speech-tokenizer decoder"
    )
    MEL_RECONSTRUCTION_WEIGHT: float = _setting(0.05, "weight", "multi-resolution log-mel loss; 0 = off")
    VOICE_CONSISTENCY_WEIGHT: float = _setting(0.05, "weight", "1 - cosine to the speaker embedding; 0 = off")
    PROSODY_WEIGHT: float = _setting(0.05, "weight", "energy and pitch-feature contour loss; 0 = off")
    AUX_LOSS_EVERY_N_STEPS: int = _setting(
        16, "micro-batches", "compute the auxiliary losses every N micro-batches (they decode audio: costly)"
    )
    AUX_CROP_FRAMES: int = _setting(
        16, "frames", "length of the random crop decoded for the auxiliary losses (12.5 frames per second)"
    )
    # --- evaluation ----------------------------------------------------------------------------------------
    SPEAKER_SIM_BACKEND: str = _setting(
        "auto",
        "name",
        "speaker encoder for similarity: auto = ECAPA if it loads, else resemblyzer (reason recorded)",
        choices=("auto", "ecapa", "resemblyzer"),
    )
    ECAPA_SOURCE: str = _setting(
        "speechbrain/spkrec-ecapa-voxceleb", "Hub id or path", "speechbrain ECAPA model for speaker similarity"
    )
    ASR_BACKEND: str = _setting(
        "auto",
        "name",
        "recogniser for WER/CER: auto = transformers ASR_MODEL if it loads, else pocketsphinx (English)",
        choices=("auto", "transformers", "pocketsphinx"),
    )
    ASR_MODEL: str = _setting("openai/whisper-small", "Hub id or path", "transformers ASR model; empty = none")
    SCORER_ALLOW_DOWNLOAD: bool = _setting(
        False, "bool", "let evaluation scorers download weights; off = local folders and the HF cache only"
    )
    EVAL_MAX_UTTERANCES: int = _setting(
        8, "utterances", "validation utterances per speaker that evaluation generates and scores"
    )
    EVAL_MAX_SECONDS: float = _setting(20.0, "seconds", "cap on the length of each generated utterance")
    EVAL_GENERATE_STEPS: int = _setting(
        0, "optimizer steps", "generate and score speech during training every this many steps; 0 = never"
    )

    @property
    def speakers(self) -> tuple[str, ...]:
        return self.TRAIN_SPEAKERS

    @property
    def export_dir(self) -> Path:
        return Path(self.EXPORT_DIR) if self.EXPORT_DIR else Path(self.OUTPUT_DIR) / "model"

    def public_dict(self) -> dict[str, Any]:
        """The resolved settings with secrets removed: safe for logs, trackers, checkpoints and cards."""
        out = {}
        for f in dataclasses.fields(self):
            if f.metadata["secret"]:
                continue
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def save(self, path: str | os.PathLike) -> None:
        """Write the public (secret-free) settings as JSON."""
        Path(path).write_text(json.dumps(self.public_dict(), indent=2, sort_keys=True))


FIELDS = {f.name: f for f in dataclasses.fields(Settings)}


def _parse_bool(key: str, raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{key}={raw!r} is not a boolean; use true/false (or 1/0, yes/no)")


def _parse_value(key: str, raw: Any) -> Any:
    f = FIELDS[key]
    if not isinstance(raw, str):
        return raw
    kind = type(f.default)
    text = raw.strip()
    if kind is bool:
        return _parse_bool(key, text)
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise SettingsError(f"{key}={raw!r} is not an integer") from None
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise SettingsError(f"{key}={raw!r} is not a number") from None
    if kind is tuple:
        return tuple(part.strip() for part in text.split(",") if part.strip())
    return text


def _require(condition: bool, key: str, value: Any, allowed: str) -> None:
    if not condition:
        raise SettingsError(f"{key}={value!r} is not allowed: {allowed}")


def validate(settings: Settings) -> None:
    """Check every field and the cross-field rules; raise SettingsError naming the first bad key."""
    for name, f in FIELDS.items():
        choices = f.metadata["choices"]
        if choices is not None:
            value = getattr(settings, name)
            _require(value in choices, name, value, f"one of {', '.join(choices)}")
    s = settings
    _require(len(s.TRAIN_SPEAKERS) > 0, "TRAIN_SPEAKERS", ",".join(s.TRAIN_SPEAKERS), "at least one speaker name")
    for name in s.TRAIN_SPEAKERS:
        _require(
            name.replace("_", "").replace("-", "").isalnum() and name == name.lower(),
            "TRAIN_SPEAKERS",
            name,
            "lower-case names of letters, digits, '_' or '-' (each becomes a dataset config and a speaker id)",
        )
    _require(
        len(set(s.TRAIN_SPEAKERS)) == len(s.TRAIN_SPEAKERS),
        "TRAIN_SPEAKERS",
        s.TRAIN_SPEAKERS,
        "distinct names",
    )
    _require(0.0 <= s.VALIDATION_FRACTION < 1.0, "VALIDATION_FRACTION", s.VALIDATION_FRACTION, "0 <= x < 1")
    _require(0.0 <= s.TEST_FRACTION < 1.0, "TEST_FRACTION", s.TEST_FRACTION, "0 <= x < 1")
    _require(
        s.VALIDATION_FRACTION + s.TEST_FRACTION < 1.0,
        "TEST_FRACTION",
        s.TEST_FRACTION,
        f"VALIDATION_FRACTION + TEST_FRACTION < 1 (VALIDATION_FRACTION is {s.VALIDATION_FRACTION})",
    )
    _require(0.0 < s.MAX_SILENCE_FRACTION <= 1.0, "MAX_SILENCE_FRACTION", s.MAX_SILENCE_FRACTION, "0 < x <= 1")
    _require(0.0 <= s.MAX_CLIPPED_FRACTION <= 1.0, "MAX_CLIPPED_FRACTION", s.MAX_CLIPPED_FRACTION, "0 <= x <= 1")
    _require(s.MIN_RMS_DBFS < 0, "MIN_RMS_DBFS", s.MIN_RMS_DBFS, "a level below 0 dBFS")
    _require(s.TARGET_LOUDNESS_DBFS < 0, "TARGET_LOUDNESS_DBFS", s.TARGET_LOUDNESS_DBFS, "a level below 0 dBFS")
    _require(0 <= s.MIN_CHARS_PER_S, "MIN_CHARS_PER_S", s.MIN_CHARS_PER_S, ">= 0")
    _require(
        s.MAX_CHARS_PER_S > s.MIN_CHARS_PER_S,
        "MAX_CHARS_PER_S",
        s.MAX_CHARS_PER_S,
        f"> MIN_CHARS_PER_S ({s.MIN_CHARS_PER_S})",
    )
    _require(s.ENCODE_BATCH_SIZE >= 1, "ENCODE_BATCH_SIZE", s.ENCODE_BATCH_SIZE, "an integer >= 1")
    _require(s.MAX_SHARD_SIZE_MB > 0, "MAX_SHARD_SIZE_MB", s.MAX_SHARD_SIZE_MB, "> 0")
    _require(s.MIN_DURATION_S > 0, "MIN_DURATION_S", s.MIN_DURATION_S, "> 0 seconds")
    _require(
        s.MAX_DURATION_S > s.MIN_DURATION_S,
        "MAX_DURATION_S",
        s.MAX_DURATION_S,
        f"> MIN_DURATION_S ({s.MIN_DURATION_S})",
    )
    _require(s.BATCH_SIZE >= 1, "BATCH_SIZE", s.BATCH_SIZE, "an integer >= 1")
    _require(s.LEARNING_RATE > 0, "LEARNING_RATE", s.LEARNING_RATE, "> 0")
    _require(s.NUM_EPOCHS >= 1, "NUM_EPOCHS", s.NUM_EPOCHS, "an integer >= 1")
    _require(
        s.GRADIENT_ACCUMULATION_STEPS >= 1,
        "GRADIENT_ACCUMULATION_STEPS",
        s.GRADIENT_ACCUMULATION_STEPS,
        ">= 1",
    )
    _require(s.SUB_TALKER_LOSS_WEIGHT >= 0, "SUB_TALKER_LOSS_WEIGHT", s.SUB_TALKER_LOSS_WEIGHT, ">= 0")
    _require(s.WEIGHT_DECAY >= 0, "WEIGHT_DECAY", s.WEIGHT_DECAY, ">= 0")
    _require(s.WARMUP_STEPS >= 0, "WARMUP_STEPS", s.WARMUP_STEPS, "an integer >= 0")
    _require(s.MAX_GRAD_NORM >= 0, "MAX_GRAD_NORM", s.MAX_GRAD_NORM, ">= 0 (0 disables clipping)")
    _require(s.MAX_STEPS >= 0, "MAX_STEPS", s.MAX_STEPS, "an integer >= 0 (0 = run NUM_EPOCHS)")
    _require(s.LOGGING_STEPS >= 1, "LOGGING_STEPS", s.LOGGING_STEPS, "an integer >= 1")
    _require(s.EVAL_STEPS >= 0, "EVAL_STEPS", s.EVAL_STEPS, "an integer >= 0")
    _require(s.SPEAKER_EMBEDDING_CLIPS >= 0, "SPEAKER_EMBEDDING_CLIPS", s.SPEAKER_EMBEDDING_CLIPS, ">= 0")
    _require(s.MAX_BATCH_TOKENS >= 0, "MAX_BATCH_TOKENS", s.MAX_BATCH_TOKENS, "an integer >= 0 (0 = fixed batches)")
    _require(s.NUM_BUCKETS >= 1, "NUM_BUCKETS", s.NUM_BUCKETS, "an integer >= 1")
    _require(s.DATALOADER_WORKERS >= 0, "DATALOADER_WORKERS", s.DATALOADER_WORKERS, "an integer >= 0")
    _require(s.SAVE_STEPS >= 0, "SAVE_STEPS", s.SAVE_STEPS, "an integer >= 0 (0 = never)")
    _require(s.SAVE_TOTAL_LIMIT >= 1, "SAVE_TOTAL_LIMIT", s.SAVE_TOTAL_LIMIT, "an integer >= 1")
    trackers = ("tensorboard", "wandb", "none")
    _require(
        all(t in trackers for t in s.REPORT_TO) and ("none" not in s.REPORT_TO or len(s.REPORT_TO) == 1),
        "REPORT_TO",
        ",".join(s.REPORT_TO),
        "tensorboard and/or wandb, or none alone",
    )
    for key in ("MEL_RECONSTRUCTION_WEIGHT", "VOICE_CONSISTENCY_WEIGHT", "PROSODY_WEIGHT"):
        _require(getattr(s, key) >= 0, key, getattr(s, key), ">= 0 (0 turns the loss off)")
    _require(s.AUX_LOSS_EVERY_N_STEPS >= 1, "AUX_LOSS_EVERY_N_STEPS", s.AUX_LOSS_EVERY_N_STEPS, "an integer >= 1")
    _require(s.AUX_CROP_FRAMES >= 2, "AUX_CROP_FRAMES", s.AUX_CROP_FRAMES, "an integer >= 2")
    _require(s.EVAL_MAX_UTTERANCES >= 1, "EVAL_MAX_UTTERANCES", s.EVAL_MAX_UTTERANCES, "an integer >= 1")
    _require(s.EVAL_MAX_SECONDS > 0, "EVAL_MAX_SECONDS", s.EVAL_MAX_SECONDS, "> 0 seconds")
    _require(s.EVAL_GENERATE_STEPS >= 0, "EVAL_GENERATE_STEPS", s.EVAL_GENERATE_STEPS, "an integer >= 0")
    device = s.DEVICE
    _require(
        device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit()),
        "DEVICE",
        device,
        "auto, cpu, cuda or cuda:N",
    )
    if s.HF_DATASET_REPO:
        _require(
            s.HF_DATASET_REPO.count("/") == 1 and all(s.HF_DATASET_REPO.split("/")),
            "HF_DATASET_REPO",
            s.HF_DATASET_REPO,
            "a Hub repo id of the form owner/name",
        )


def _check_unknown_keys(keys: list[str], source: str) -> None:
    for key in keys:
        if key in FIELDS:
            continue
        close = difflib.get_close_matches(key.upper(), FIELDS, n=1, cutoff=0.8)
        if close:
            raise SettingsError(f"unknown key {key!r} in {source}: did you mean {close[0]}?")
        logger.warning("ignoring key %r in %s: not a setting of this package", key, source)


def load_settings(
    env_file: str | os.PathLike | None = DEFAULT_ENV_FILE,
    overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> Settings:
    """Load, parse and validate settings.

    Args:
        env_file: path of the ``.env`` file; a missing default ``.env`` is fine (defaults apply), a missing
            explicitly named file is an error. ``None`` skips the file.
        overrides: values from the command line (keys are setting names); they win over everything.
        environ: the process environment to consult (default ``os.environ``); only known keys are read.

    Raises:
        SettingsError: a value fails to parse or validate, an override names an unknown key, or a key in the
            file is a likely misspelling of a known key.
        FileNotFoundError: an explicitly named env file does not exist.
    """
    values: dict[str, Any] = {}
    if env_file is not None:
        path = Path(env_file)
        if path.exists():
            file_values = {k: v for k, v in dotenv_values(path).items() if v is not None}
            _check_unknown_keys(list(file_values), str(path))
            values.update({k: v for k, v in file_values.items() if k in FIELDS})
        elif str(env_file) != DEFAULT_ENV_FILE:
            raise FileNotFoundError(f"settings file {str(path)!r} does not exist")
    env = os.environ if environ is None else environ
    values.update({k: env[k] for k in FIELDS if k in env})
    for key, value in (overrides or {}).items():
        if key not in FIELDS:
            close = difflib.get_close_matches(key.upper(), FIELDS, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise SettingsError(f"unknown setting {key!r}{hint}")
        values[key] = value
    parsed = {k: _parse_value(k, v) for k, v in values.items()}
    settings = Settings(**parsed)
    validate(settings)
    return settings


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--env-file`` and repeatable ``--set KEY=VALUE`` to an entry point's parser."""
    parser.add_argument("--env-file", default=DEFAULT_ENV_FILE, help="settings file (default: .env)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting for this run (repeatable)",
    )


def settings_from_args(args: argparse.Namespace, extra: dict[str, Any] | None = None) -> Settings:
    """Build settings from parsed ``add_settings_arguments`` flags plus entry-point specific overrides."""
    overrides: dict[str, Any] = {}
    for item in args.overrides:
        if "=" not in item:
            raise SettingsError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        overrides[key.strip()] = value
    overrides.update({k: v for k, v in (extra or {}).items() if v is not None})
    return load_settings(args.env_file, overrides=overrides)


def render_env_example() -> str:
    """The text of ``.env.training.example``: every key with its default, unit and meaning."""
    lines = [
        "# Settings for qwen3-tts multi-speaker fine-tuning. Copy to .env and edit.",
        "# Precedence: command-line flags > environment variables > .env > these defaults.",
        "# Regenerate with: uv run python -m finetuning.settings --example > .env.training.example",
        "",
    ]
    for name, f in FIELDS.items():
        default = f.default
        if isinstance(default, tuple):
            default = ",".join(default)
        elif isinstance(default, bool):
            default = str(default).lower()
        choices = f.metadata["choices"]
        allowed = f" One of: {', '.join(choices)}." if choices else ""
        lines.append(f"# {f.metadata['help']} [{f.metadata['unit']}].{allowed}")
        lines.append(f"{name}={default}")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    cli = argparse.ArgumentParser(description="Show or document the settings.")
    cli.add_argument("--example", action="store_true", help="print .env.training.example")
    add_settings_arguments(cli)
    cli_args = cli.parse_args()
    if cli_args.example:
        print(render_env_example(), end="")
    else:
        print(json.dumps(settings_from_args(cli_args).public_dict(), indent=2))
