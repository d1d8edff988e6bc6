"""One typed, frozen, validated settings object, loaded from ``.env`` (python-dotenv).

Precedence, highest first: explicit overrides (command-line flags) > process environment > the ``.env`` file >
the defaults below. Every field carries a default, a unit and a one-line help; ``.env.training.example`` is
generated from the same table (``python -m finetuning.settings --example``) so the two cannot drift, and so is the
Markdown settings reference ``finetuning/SETTINGS.md`` (``python -m finetuning.settings_reference``).

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
from pathlib import Path
from typing import Any

from dotenv import dotenv_values

from finetuning.settings_fields import BUNDLED_SPEAKERS, Settings
from finetuning.settings_rules import SettingsError, check_field, one_edit_apart, parse_value, require

__all__ = ["BUNDLED_SPEAKERS", "FIELDS", "Settings", "SettingsError", "load_settings", "settings_from_args"]

logger = logging.getLogger(__name__)

DEFAULT_ENV_FILE = ".env"
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
    segment_rule = f">= 2 x SEGMENT_MIN_S ({s.SEGMENT_MIN_S}): an over-long clip splits into two that fit"
    require(s.SEGMENT_MAX_S >= 2 * s.SEGMENT_MIN_S, "SEGMENT_MAX_S", s.SEGMENT_MAX_S, segment_rule)
    repeat = s.SPEAKER_MAX_REPEAT
    require(repeat == 0 or repeat >= 1, "SPEAKER_MAX_REPEAT", repeat, "0 (no cap) or >= 1")
    fused_rule = "false with USE_AUXILIARY_LOSSES=true (the auxiliary losses read the logits it never builds)"
    require(not (s.FUSED_CROSS_ENTROPY and s.USE_AUXILIARY_LOSSES), "FUSED_CROSS_ENTROPY", True, fused_rule)
    clone_rule = "false with TRAINING_MODE=voice_clone (references are drawn from every clip of a speaker in memory)"
    require(not (s.DATA_STREAMING and s.TRAINING_MODE == "voice_clone"), "DATA_STREAMING", True, clone_rule)
    replay_rule = (
        "0 with TRAINING_MODE=voice_clone or DATA_STREAMING=true (replay is mixed into in-memory custom voice data)"
    )
    replay_off = s.TRAINING_MODE == "custom_voice" and not s.DATA_STREAMING
    require(s.REPLAY_FRACTION == 0 or replay_off, "REPLAY_FRACTION", s.REPLAY_FRACTION, replay_rule)
    speech_rule = "eval_loss or none unless EVAL_GENERATE_STEPS > 0 (speech metrics come from generated speech)"
    speech = s.SELECT_BY not in ("eval_loss", "none")
    require(not speech or s.EVAL_GENERATE_STEPS > 0, "SELECT_BY", s.SELECT_BY, speech_rule)
    patience_rule = "0 with SELECT_BY=none (nothing is compared)"
    if s.AVERAGE_CHECKPOINTS:
        check_averaging(s)
    patience = s.EARLY_STOPPING_PATIENCE
    require(patience == 0 or s.SELECT_BY != "none", "EARLY_STOPPING_PATIENCE", patience, patience_rule)


def check_averaging(s: Settings) -> None:
    """AVERAGE_CHECKPOINTS needs a saved state at every step it may average."""
    k = s.AVERAGE_CHECKPOINTS
    require(s.SAVE_STEPS > 0, "AVERAGE_CHECKPOINTS", k, "0 unless SAVE_STEPS > 0 (it averages saved states)")
    loss_rule = "eval_loss or none with AVERAGE_CHECKPOINTS (the final export is the average, not the last step)"
    require(s.SELECT_BY in ("eval_loss", "none"), "SELECT_BY", s.SELECT_BY, loss_rule)
    if s.AVERAGE_BY == "last":
        require(s.SAVE_TOTAL_LIMIT >= k, "SAVE_TOTAL_LIMIT", s.SAVE_TOTAL_LIMIT, f">= AVERAGE_CHECKPOINTS ({k})")
        return
    require(s.SELECT_BY != "none", "AVERAGE_BY", "best", "last with SELECT_BY=none (no evaluation ranks the states)")
    every_rule = f"a multiple of SAVE_STEPS ({s.SAVE_STEPS}) with AVERAGE_BY=best: every evaluated step needs a state"
    require(s.EVAL_STEPS > 0 and s.EVAL_STEPS % s.SAVE_STEPS == 0, "EVAL_STEPS", s.EVAL_STEPS, every_rule)


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
