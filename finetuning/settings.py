"""One typed, frozen, validated settings object, loaded from ``.env`` (python-dotenv).

Precedence, highest first: explicit overrides (command-line flags) > process environment > the ``.env`` file >
the defaults below. Every field carries a default, a unit and a one-line help; ``.env.training.example`` is
generated from the same table (``python -m finetuning.settings --example``) so the two cannot drift.

Unknown keys in ``.env``: a likely misspelling of a known key is an error naming that key; any other is ignored
with a warning (a ``.env`` may hold other tools' variables, e.g. ``WANDB_API_KEY``). An environment variable
one edit away from a key (``LEARNING_RAET``) is not read either; a warning names the key.

``HF_TOKEN`` is a secret: it is read, never printed (``repr`` masks it), never saved (``public_dict``).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dotenv import dotenv_values

from finetuning.settings_rules import (
    BOUNDS,
    SettingsError,
    check_device,
    check_field,
    check_repo_id,
    check_speakers,
    check_trackers,
    one_edit_apart,
    parse_value,
    require,
)

logger = logging.getLogger(__name__)

DEFAULT_ENV_FILE = ".env"
BUNDLED_SPEAKERS = ("english_speaker", "swahili_speaker")
LORA_DEFAULT_TARGETS = tuple("q_proj k_proj v_proj o_proj gate_proj up_proj down_proj linear_fc1 linear_fc2".split())
LORA_DEFAULT_FULLY_TRAINED = ("codec_head", "lm_head", "codec_embedding")  # the codec heads and embeddings


def _setting(default: Any, unit: str, help: str, choices=None, secret=False, check=None, **bounds: float):
    """A field with its default, unit and one-line help, and the values it allows, enforced by ``validate``:
    ``choices``, ``bounds`` (``ge`` >=, ``gt`` >, ``le`` <=, ``lt`` <; lower bound first) and ``check(key, value)``,
    which raises SettingsError."""
    if not set(bounds) <= set(BOUNDS):
        raise TypeError(f"unknown bounds {sorted(set(bounds) - set(BOUNDS))}; use {', '.join(BOUNDS)}")
    metadata = {"unit": unit, "help": help, "choices": choices, "secret": secret, "check": check, "bounds": bounds}
    return field(default=default, repr=not secret, metadata=metadata)


@dataclass(frozen=True)
class Settings:
    # --- data --------------------------------------------------------------------------------------------
    TRAIN_SPEAKERS: tuple[str, ...] = _setting(
        BUNDLED_SPEAKERS,
        "comma-separated names",
        "speakers to prepare and train; each is one dataset config",
        check=check_speakers,
    )
    VOICES_DIR: str = _setting(
        "voices", "path", "folder with <speaker>.wav reference clips and <speaker>/metadata.jsonl corpora"
    )
    DATASET_DIR: str = _setting("data/dataset", "path", "local prepared dataset (one config per speaker)")
    HF_DATASET_REPO: str = _setting(
        "",
        "Hub repo id",
        "dataset repo to upload to / train from, e.g. user/qwen3-tts-voices; empty = local only",
        check=check_repo_id,
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
        check=check_device,
    )
    # --- training ----------------------------------------------------------------------------------------
    OUTPUT_DIR: str = _setting("outputs/run", "path", "where checkpoints, logs and the exported model go")
    BATCH_SIZE: int = _setting(2, "utterances", "per-device batch size when MAX_BATCH_TOKENS is 0", ge=1)
    LEARNING_RATE: float = _setting(2e-5, "1/step", "AdamW peak learning rate", gt=0)
    NUM_EPOCHS: int = _setting(3, "epochs", "passes over the training data", ge=1)
    GRADIENT_ACCUMULATION_STEPS: int = _setting(4, "micro-batches", "micro-batches per optimizer step", ge=1)
    MIXED_PRECISION: str = _setting("bf16", "mode", "accelerate mixed precision", choices=("no", "fp16", "bf16"))
    GRADIENT_CHECKPOINTING: bool = _setting(
        False,
        "bool",
        "recompute talker and code-predictor layer activations in backward: less memory, one more forward",
    )
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
    EVAL_MAX_BATCHES: int = _setting(
        20, "batches", "batches per process scored every EVAL_STEPS (the final validation: all); 0 = all", ge=0
    )
    SPEAKER_EMBEDDING_CLIPS: int = _setting(
        0, "clips", "training clips averaged into each speaker embedding besides the reference clips", ge=0
    )
    EXPORT_DIR: str = _setting("", "path", "where the custom_voice checkpoint is written; empty = OUTPUT_DIR/model")
    # --- speed (GPU levers; defaults are safe on every machine) ---------------------------------------------
    TORCH_COMPILE: bool = _setting(False, "bool", "torch.compile the talker and code predictor (slow first steps)")
    ATTN_IMPLEMENTATION: str = _setting(
        "sdpa", "name", "attention kernels", choices=("sdpa", "eager", "flash_attention_2")
    )
    FUSED_CROSS_ENTROPY: bool = _setting(
        False, "bool", "fused linear + cross-entropy for the codec heads (liger-kernel, CUDA; no auxiliary losses)"
    )
    # --- LoRA ----------------------------------------------------------------------------------------------
    FINETUNE_METHOD: str = _setting(
        "full", "method", "full = every talker weight; lora = adapters", choices=("full", "lora")
    )
    LORA_RANK: int = _setting(16, "rank", "rank of each LoRA adapter", ge=1)
    LORA_ALPHA: float = _setting(32.0, "scale", "LoRA alpha; the update is scaled by LORA_ALPHA / LORA_RANK", gt=0)
    LORA_DROPOUT: float = _setting(0.0, "probability", "dropout on the LoRA branch's input", ge=0, lt=1)
    LORA_TARGETS: tuple[str, ...] = _setting(
        LORA_DEFAULT_TARGETS, "comma-separated names", "linear layers of the talker (its text MLP too) to adapt"
    )
    LORA_FULLY_TRAINED: tuple[str, ...] = _setting(
        LORA_DEFAULT_FULLY_TRAINED, "comma-separated names", "talker modules trained fully beside the adapters"
    )
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
        "balanced = small speakers repeat (SPEAKER_MIXING_ALPHA, SPEAKER_MAX_REPEAT), proportional = as in the data",
        choices=("balanced", "proportional"),
    )
    SPEAKER_MIXING_ALPHA: float = _setting(
        0.5, "exponent", "balanced mixing: a speaker's share is proportional to clips ** alpha (0 = equal)", ge=0, le=1
    )
    SPEAKER_MAX_REPEAT: float = _setting(
        8.0, "times", "balanced mixing: a speaker's clips repeat at most this often per epoch; 0 = no cap", ge=0
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
        ("tensorboard",), "comma-separated names", "trackers: tensorboard, wandb, or none", check=check_trackers
    )
    WANDB_MODE: str = _setting(
        "offline", "mode", "W&B mode when REPORT_TO has wandb; offline needs no network", choices=("offline", "online")
    )
    DISTRIBUTED_TIMEOUT_MINUTES: int = _setting(
        120,
        "minutes",
        "how long a process waits at a collective (rank 0 exporting or generating for evaluation) before failing",
        ge=1,
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
    NATURALNESS_BACKEND: str = _setting(
        "auto",
        "name",
        "naturalness (MOS) predictor: auto, dnsmos (speechmos DNSMOS P.835, offline) or none",
        choices=("auto", "dnsmos", "none"),
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


def validate(settings: Settings) -> None:
    """Check every field's choices, bounds and check, then the rules that span several fields; raise SettingsError
    naming the first bad key, its value and what is allowed."""
    for name, f in FIELDS.items():
        check_field(f, getattr(settings, name))
    s = settings
    split_rule = f"VALIDATION_FRACTION + TEST_FRACTION < 1 (VALIDATION_FRACTION is {s.VALIDATION_FRACTION})"
    require(s.VALIDATION_FRACTION + s.TEST_FRACTION < 1.0, "TEST_FRACTION", s.TEST_FRACTION, split_rule)
    for low, high in (("MIN_CHARS_PER_S", "MAX_CHARS_PER_S"), ("MIN_DURATION_S", "MAX_DURATION_S")):
        low_value, high_value = getattr(s, low), getattr(s, high)
        require(high_value > low_value, high, high_value, f"> {low} ({low_value})")
    repeat = s.SPEAKER_MAX_REPEAT
    require(repeat == 0 or repeat >= 1, "SPEAKER_MAX_REPEAT", repeat, "0 (no cap) or >= 1")
    fused_rule = "false with USE_AUXILIARY_LOSSES=true (the auxiliary losses read the logits it never builds)"
    require(not (s.FUSED_CROSS_ENTROPY and s.USE_AUXILIARY_LOSSES), "FUSED_CROSS_ENTROPY", True, fused_rule)


# Keys of earlier versions: naming one is an error that names its successor, never a silently ignored key.
RENAMED_KEYS = {"TARGET_LOUDNESS_DBFS": "TARGET_LOUDNESS_LUFS (ITU-R BS.1770 integrated loudness, EBU R128: -23)"}


def _check_unknown_keys(keys: list[str], source: str) -> None:
    for key in (k for k in keys if k not in FIELDS):
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
    for name, key in ((n, k) for n in env if n not in FIELDS for k in FIELDS if one_edit_apart(n, k)):
        logger.warning("environment variable %s is not a setting and is ignored: did you mean %s?", name, key)
    _check_unknown_keys([key for key in RENAMED_KEYS if key in env], "the environment")
    values.update({k: env[k] for k in FIELDS if k in env})
    for key, value in (overrides or {}).items():
        if key not in FIELDS:
            close = difflib.get_close_matches(key.upper(), FIELDS, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise SettingsError(f"unknown setting {key!r}{hint}")
        values[key] = value
    parsed = {k: parse_value(k, v, type(FIELDS[k].default)) for k, v in values.items()}
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


def main(argv: list[str] | None = None) -> int:
    """``python -m finetuning.settings [--example]``: a bad setting is one line on stderr and exit code 2."""
    cli = argparse.ArgumentParser(description="Show or document the settings.")
    cli.add_argument("--example", action="store_true", help="print .env.training.example")
    add_settings_arguments(cli)
    args = cli.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        text = render_env_example() if args.example else json.dumps(settings_from_args(args).public_dict(), indent=2)
    except (SettingsError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(text, end="" if args.example else "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
