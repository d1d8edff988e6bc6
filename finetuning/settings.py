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
import operator
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


BOUNDS = {"ge": (operator.ge, ">="), "gt": (operator.gt, ">"), "le": (operator.le, "<="), "lt": (operator.lt, "<")}


def _setting(default: Any, unit: str, help: str, choices=None, secret=False, check=None, **bounds: float):
    """A field with its default, unit and one-line help, and the values it allows, enforced by ``validate``:
    ``choices``, ``bounds`` (``ge`` >=, ``gt`` >, ``le`` <=, ``lt`` <; lower bound first) and ``check(key, value)``,
    which raises SettingsError."""
    if not set(bounds) <= set(BOUNDS):
        raise TypeError(f"unknown bounds {sorted(set(bounds) - set(BOUNDS))}; use {', '.join(BOUNDS)}")
    metadata = {"unit": unit, "help": help, "choices": choices, "secret": secret, "check": check, "bounds": bounds}
    return field(default=default, repr=not secret, metadata=metadata)


def _require(condition: bool, key: str, value: Any, allowed: str) -> None:
    if not condition:
        raise SettingsError(f"{key}={value!r} is not allowed: {allowed}")


def _check_speakers(key: str, names: tuple[str, ...]) -> None:
    _require(len(names) > 0, key, ",".join(names), "at least one speaker name")
    names_rule = "lower-case names of letters, digits, '_' or '-' (each becomes a dataset config and a speaker id)"
    for name in names:
        _require(name.replace("_", "").replace("-", "").isalnum() and name == name.lower(), key, name, names_rule)
    _require(len(set(names)) == len(names), key, names, "distinct names")


def _check_device(key: str, device: str) -> None:
    cuda_n = device.startswith("cuda:") and device[5:].isdigit()
    _require(device in ("auto", "cpu", "cuda") or cuda_n, key, device, "auto, cpu, cuda or cuda:N")


def _check_repo_id(key: str, repo: str) -> None:
    _require(not repo or (repo.count("/") == 1 and all(repo.split("/"))), key, repo, "a Hub repo id: owner/name")


def _check_trackers(key: str, names: tuple[str, ...]) -> None:
    known = all(t in ("tensorboard", "wandb", "none") for t in names) and ("none" not in names or len(names) == 1)
    _require(known, key, ",".join(names), "tensorboard and/or wandb, or none alone")


@dataclass(frozen=True)
class Settings:
    # --- data --------------------------------------------------------------------------------------------
    TRAIN_SPEAKERS: tuple[str, ...] = _setting(
        BUNDLED_SPEAKERS,
        "comma-separated names",
        "speakers to prepare and train; each is one dataset config",
        check=_check_speakers,
    )
    VOICES_DIR: str = _setting(
        "voices", "path", "folder with <speaker>.wav reference clips and <speaker>/metadata.jsonl corpora"
    )
    DATASET_DIR: str = _setting("data/dataset", "path", "local prepared dataset (one config per speaker)")
    HF_DATASET_REPO: str = _setting(
        "",
        "Hub repo id",
        "dataset repo to upload to / train from, e.g. user/qwen3-tts-voices; empty = local only",
        check=_check_repo_id,
    )
    HF_DATASET_PRIVATE: bool = _setting(True, "bool", "create the Hub dataset repo as private")
    HF_TOKEN: str = _setting("", "secret", "Hugging Face token for upload and private repos", secret=True)
    VALIDATION_FRACTION: float = _setting(
        0.1, "fraction", "share of each speaker's clips held out for validation when no split is given", ge=0, lt=1
    )
    SPEAKERS_MANIFEST: str = _setting(
        "", "path", "optional JSON naming each speaker's source, format, language and reference clips"
    )
    TEST_FRACTION: float = _setting(
        0.0, "fraction", "share of each speaker's clips held out as a test split", ge=0, lt=1
    )
    MIN_DURATION_S: float = _setting(0.5, "seconds", "clips shorter than this are rejected", gt=0)
    MAX_DURATION_S: float = _setting(20.0, "seconds", "clips longer than this are rejected")
    MAX_SILENCE_FRACTION: float = _setting(
        0.7, "fraction", "clips whose share of silence (40 dB below their peak) exceeds this are rejected", gt=0, le=1
    )
    MAX_CLIPPED_FRACTION: float = _setting(
        0.001, "fraction", "clips with more samples at full scale than this share are rejected", ge=0, le=1
    )
    MIN_RMS_DBFS: float = _setting(-45.0, "dBFS", "clips quieter than this RMS level are rejected", lt=0)
    MIN_CHARS_PER_S: float = _setting(
        1.0, "chars/second", "transcripts slower than this (non-space characters per second) are rejected", ge=0
    )
    MAX_CHARS_PER_S: float = _setting(
        35.0, "chars/second", "transcripts faster than this (non-space characters per second) are rejected"
    )
    NORMALIZE_LOUDNESS: bool = _setting(False, "bool", "scale kept clips to TARGET_LOUDNESS_LUFS (ITU-R BS.1770)")
    TARGET_LOUDNESS_LUFS: float = _setting(-23.0, "LUFS", "integrated loudness when NORMALIZE_LOUDNESS", lt=0)
    TRUE_PEAK_CEILING_DBTP: float = _setting(-1.0, "dBTP", "normalisation keeps true peaks under this", le=0)
    ENCODE_BATCH_SIZE: int = _setting(8, "clips", "clips per speech-tokenizer batch during preparation", ge=1)
    PREPARATION_WORKERS: int = _setting(1, "processes", "parallel clip processes (CUDA: 1 per GPU); same output", ge=1)
    MAX_SHARD_SIZE_MB: float = _setting(256.0, "MB", "upper bound of one parquet shard of the dataset", gt=0)
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
        check=_check_device,
    )
    # --- training ----------------------------------------------------------------------------------------
    OUTPUT_DIR: str = _setting("outputs/run", "path", "where checkpoints, logs and the exported model go")
    BATCH_SIZE: int = _setting(2, "utterances", "per-device batch size when MAX_BATCH_TOKENS is 0", ge=1)
    LEARNING_RATE: float = _setting(2e-5, "1/step", "AdamW peak learning rate", gt=0)
    NUM_EPOCHS: int = _setting(3, "epochs", "passes over the training data", ge=1)
    GRADIENT_ACCUMULATION_STEPS: int = _setting(4, "micro-batches", "micro-batches per optimizer step", ge=1)
    MIXED_PRECISION: str = _setting("bf16", "mode", "accelerate mixed precision", choices=("no", "fp16", "bf16"))
    SEED: int = _setting(42, "int", "seed for splits, sampling and initialisation")
    TRAINING_LAYOUT: str = _setting(
        "non_streaming",
        "mode",
        "talker input layout trained; must match generation: non_streaming = generate_custom_voice's default, "
        "streaming = generate(non_streaming_mode=False)",
        choices=("non_streaming", "streaming"),
    )
    SUB_TALKER_LOSS_WEIGHT: float = _setting(0.3, "weight", "weight of the sub-talker (codebooks 2-16) loss", ge=0)
    WEIGHT_DECAY: float = _setting(0.01, "coefficient", "AdamW weight decay", ge=0)
    WARMUP_STEPS: int = _setting(10, "optimizer steps", "linear learning-rate warmup", ge=0)
    LR_SCHEDULE: str = _setting("cosine", "name", "decay after warmup", choices=("cosine", "linear", "constant"))
    MAX_GRAD_NORM: float = _setting(1.0, "norm", "gradient clipping threshold; 0 disables clipping", ge=0)
    MAX_STEPS: int = _setting(
        0, "optimizer steps", "stop after this many optimizer steps; 0 = NUM_EPOCHS decides", ge=0
    )
    LOGGING_STEPS: int = _setting(10, "optimizer steps", "log the training loss every this many steps", ge=1)
    EVAL_STEPS: int = _setting(
        100, "optimizer steps", "validation loss every this many steps (and at the end); 0 = only at the end", ge=0
    )
    SPEAKER_EMBEDDING_CLIPS: int = _setting(
        0, "clips", "training clips averaged into each speaker embedding besides the reference clips", ge=0
    )
    EXPORT_DIR: str = _setting("", "path", "where the custom_voice checkpoint is written; empty = OUTPUT_DIR/model")
    # --- data loading, resume, tracking --------------------------------------------------------------------
    MAX_BATCH_TOKENS: int = _setting(
        4096,
        "talker positions",
        "duration batching: padded positions (batch size x longest sequence) per batch; 0 = BATCH_SIZE batches",
        ge=0,
    )
    NUM_BUCKETS: int = _setting(5, "buckets", "length buckets for duration batching", ge=1)
    SPEAKER_MIXING: str = _setting(
        "balanced",
        "mode",
        "balanced = every speaker seen equally often (small speakers repeat), proportional = as in the data",
        choices=("balanced", "proportional"),
    )
    DATA_STREAMING: bool = _setting(
        False, "bool", "stream the configs (reads text and codes only, never caches the audio column)"
    )
    STREAM_SHUFFLE_BUFFER: int = _setting(1000, "examples", "shuffle buffer of DATA_STREAMING (bounds memory)", ge=1)
    DATALOADER_WORKERS: int = _setting(
        2, "processes", "dataloader worker processes; 0 = load in the main process", ge=0
    )
    SAVE_STEPS: int = _setting(
        500, "optimizer steps", "save a resumable training state every this many steps; 0 = off", ge=0
    )
    SAVE_TOTAL_LIMIT: int = _setting(2, "states", "keep only the newest N saved training states", ge=1)
    RESUME_FROM: str = _setting("", "latest or path", "resume from OUTPUT_DIR's latest state or a state folder")
    REPORT_TO: tuple[str, ...] = _setting(
        ("tensorboard",), "comma-separated names", "trackers: tensorboard, wandb, or none", check=_check_trackers
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
    MEL_RECONSTRUCTION_WEIGHT: float = _setting(0.05, "weight", "multi-resolution log-mel loss; 0 = off", ge=0)
    VOICE_CONSISTENCY_WEIGHT: float = _setting(0.05, "weight", "1 - cosine to the speaker embedding; 0 = off", ge=0)
    PROSODY_WEIGHT: float = _setting(0.05, "weight", "energy and pitch-feature contour loss; 0 = off", ge=0)
    AUX_LOSS_EVERY_N_STEPS: int = _setting(
        16, "micro-batches", "compute the auxiliary losses every N micro-batches (they decode audio: costly)", ge=1
    )
    AUX_CROP_FRAMES: int = _setting(
        16, "frames", "length of the random crop decoded for the auxiliary losses (12.5 frames per second)", ge=2
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
        8, "utterances", "validation utterances per speaker that evaluation generates and scores", ge=1
    )
    EVAL_MAX_SECONDS: float = _setting(20.0, "seconds", "cap on the length of each generated utterance", gt=0)
    EVAL_GENERATE_STEPS: int = _setting(
        0, "optimizer steps", "generate and score speech during training every this many steps; 0 = never", ge=0
    )

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
    """A value from the file, the environment or a flag (a string) as the field's type; other values as given."""
    kind = type(FIELDS[key].default)
    if not isinstance(raw, str):
        return raw
    text = raw.strip()
    if kind is bool:
        return _parse_bool(key, text)
    if kind is tuple:
        return tuple(part.strip() for part in text.split(",") if part.strip())
    try:
        return kind(text)  # str, int or float
    except ValueError:
        raise SettingsError(f"{key}={raw!r} is not {'an integer' if kind is int else 'a number'}") from None


def _allowed_range(f: dataclasses.Field) -> str:
    """What a bounded field allows, e.g. "an integer >= 1 (utterances: ...)" or "0 <= x < 1 (fraction: ...)"."""
    bounds = [(BOUNDS[k][1], value) for k, value in f.metadata["bounds"].items()]
    if len(bounds) == 2:  # lower bound first: (">=", 0), ("<", 1) -> "0 <= x < 1"
        (low, low_value), (high, high_value) = bounds
        text = f"{low_value} {low.replace('>', '<')} x {high} {high_value}"
    else:
        text = f"{bounds[0][0]} {bounds[0][1]}"
    integer = "an integer " if type(f.default) is int else ""
    return f"{integer}{text} ({f.metadata['unit']}: {f.metadata['help']})"


def validate(settings: Settings) -> None:
    """Check every field's choices, bounds and check, then the rules that span several fields; raise SettingsError
    naming the first bad key, its value and what is allowed."""
    for name, f in FIELDS.items():
        value, choices, bounds, check = (
            getattr(settings, name),
            *(f.metadata[k] for k in ("choices", "bounds", "check")),
        )
        if choices is not None:
            _require(value in choices, name, value, f"one of {', '.join(choices)}")
        if bounds:
            _require(all(BOUNDS[k][0](value, limit) for k, limit in bounds.items()), name, value, _allowed_range(f))
        if check is not None:
            check(name, value)
    s = settings
    split_rule = f"VALIDATION_FRACTION + TEST_FRACTION < 1 (VALIDATION_FRACTION is {s.VALIDATION_FRACTION})"
    _require(s.VALIDATION_FRACTION + s.TEST_FRACTION < 1.0, "TEST_FRACTION", s.TEST_FRACTION, split_rule)
    for low, high in (("MIN_CHARS_PER_S", "MAX_CHARS_PER_S"), ("MIN_DURATION_S", "MAX_DURATION_S")):
        low_value, high_value = getattr(s, low), getattr(s, high)
        _require(high_value > low_value, high, high_value, f"> {low} ({low_value})")


# Keys of earlier versions: naming one is an error that names its successor, never a silently ignored key.
RENAMED_KEYS = {"TARGET_LOUDNESS_DBFS": "TARGET_LOUDNESS_LUFS (ITU-R BS.1770 integrated loudness, EBU R128: -23)"}


def _check_unknown_keys(keys: list[str], source: str) -> None:
    for key in keys:
        if key in FIELDS:
            continue
        if key in RENAMED_KEYS:
            raise SettingsError(f"{key} in {source} was renamed: set {RENAMED_KEYS[key]} instead")
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
    _check_unknown_keys([key for key in RENAMED_KEYS if key in env], "the environment")
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
