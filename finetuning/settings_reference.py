"""The settings reference, ``finetuning/SETTINGS.md``: the settings table rendered as Markdown, grouped by stage.

Regenerate with ``uv run python -m finetuning.settings_reference > finetuning/SETTINGS.md``; a test checks that
the file matches the table (``tests/test_settings.py``).
"""

from __future__ import annotations

import dataclasses
import sys

from finetuning.settings import FIELDS, RENAMED_KEYS
from finetuning.settings_fields import SECTIONS
from finetuning.settings_rules import BOUNDS

REFERENCE_FILE = "finetuning/SETTINGS.md"
HEADER = """\
# Settings reference

<!-- Generated from finetuning/settings_fields.py; do not edit. Regenerate with:
     uv run python -m finetuning.settings_reference > finetuning/SETTINGS.md -->

Settings come from `.env` (copy `.env.training.example`, which lists every key with its default). Precedence:
command-line flags (`--set KEY=VALUE`) > environment variables > `.env` > these defaults. A bad value stops the
command before any model loads, naming the key, the value and what is allowed; `inf` and `nan` are refused for
every number. A key in `.env` that looks like a misspelling of a known key (e.g. `LEARNING_RAET`) is an error; any
other unknown key (e.g. `WANDB_API_KEY`) is ignored with a warning. An environment variable one edit away from a
key (`LEARNING_RAET=1e-4 uv run ...`) is not read either: a warning names the key it resembles. `HF_TOKEN` is
read but never printed, logged or saved. `uv run python -m finetuning.settings` prints the resolved settings.

Rules across settings: `VALIDATION_FRACTION + TEST_FRACTION < 1`; `MAX_DURATION_S > MIN_DURATION_S`;
`MAX_CHARS_PER_S > MIN_CHARS_PER_S`; `SEGMENT_MAX_S >= 2 x SEGMENT_MIN_S`; `FUSED_CROSS_ENTROPY` not with
`USE_AUXILIARY_LOSSES`; `DATA_STREAMING` not with `TRAINING_MODE=voice_clone`; `REPLAY_FRACTION` 0 with
`TRAINING_MODE=voice_clone` or `DATA_STREAMING`; `SELECT_BY` other than `eval_loss`
or `none` needs `EVAL_GENERATE_STEPS > 0`; `EARLY_STOPPING_PATIENCE` not with `SELECT_BY=none`;
`AVERAGE_CHECKPOINTS` needs `SAVE_STEPS > 0` and `SELECT_BY` `eval_loss` or `none`, with `AVERAGE_BY=last`
`SAVE_TOTAL_LIMIT >= AVERAGE_CHECKPOINTS`, with `AVERAGE_BY=best` `SELECT_BY=eval_loss` and `EVAL_STEPS` a
multiple of `SAVE_STEPS`.
"""


def format_default(value) -> str:
    """A default as written in ``.env``: tuples comma-joined, booleans lower-case, empty as (empty)."""
    if isinstance(value, tuple):
        value = ",".join(value)
    elif isinstance(value, bool):
        value = str(value).lower()
    return f"`{value}`" if str(value) != "" else "(empty)"


def allowed_values(f: dataclasses.Field) -> str:
    """The values a field allows: its choices, or its bounds (``>= 0, < 1``), or nothing."""
    meta = f.metadata
    if meta["choices"]:
        return ", ".join(f"`{choice}`" for choice in meta["choices"])
    return ", ".join(f"{BOUNDS[kind][1]} {limit}" for kind, limit in meta["bounds"].items())


def render_settings_reference() -> str:
    """The text of ``finetuning/SETTINGS.md``: one table per stage (key, default, unit, allowed, meaning), every
    field exactly once, then the renamed keys. Raises ValueError when ``SECTIONS`` names a key that is not a field
    or lists sections out of the table's order."""
    names = list(FIELDS)
    starts = [names.index(first) if first in FIELDS else -1 for _, first, _ in SECTIONS]
    if -1 in starts or starts[0] != 0 or starts != sorted(starts):
        raise ValueError("SECTIONS must name fields in the table's order, the first field first")
    lines = [HEADER]
    lines += [f"- [{title}](#{title.lower().replace(',', '').replace(' ', '-')})" for title, _, _ in SECTIONS]
    for (title, _, guide), start, end in zip(SECTIONS, starts, [*starts[1:], len(names)], strict=True):
        lines += ["", f"## {title}", "", f"Explained in [{guide.split('#')[0]}]({guide}).", ""]
        lines += ["| key | default | unit | allowed | meaning |", "|---|---|---|---|---|"]
        for name in names[start:end]:
            f = FIELDS[name]
            meaning = f.metadata["help"].replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")
            row = [f"`{name}`", format_default(f.default), f.metadata["unit"], allowed_values(f), meaning]
            lines.append("| " + " | ".join(row) + " |")
    lines += ["", "## Renamed keys", "", "A renamed key is refused with the name of its successor:", ""]
    lines += [f"- `{old}` → {new}" for old, new in RENAMED_KEYS.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render_settings_reference())
