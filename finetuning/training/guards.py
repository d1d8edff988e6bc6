"""Paths a training run refuses before it starts: an EXPORT_DIR whose replacement would delete the run, its data,
its base model, or files the package did not write.

The export replaces EXPORT_DIR as a whole (``atomic.replace_folder``), so EXPORT_DIR must be a folder of its own:
not OUTPUT_DIR, DATASET_DIR or the Base model folder, not a folder holding one of them, not inside DATASET_DIR or
the Base model, not inside the run's states, in-training evaluation export or best export (``best/``), and not
an existing folder holding anything but an earlier export (one with ``finetune_info.json``).
"""

from __future__ import annotations

import os
from pathlib import Path

from finetuning.settings import Settings, SettingsError
from finetuning.training.callbacks import EVAL_CHECKPOINT_DIR
from finetuning.training.checkpointing import STATES_DIR
from finetuning.training.export import BEST_DIR, INFO_FILE

FIX = "set EXPORT_DIR to a new folder of its own (or leave it empty for OUTPUT_DIR/model)"


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(Path(path).expanduser()))


def check_export_dir(settings: Settings, model_dir: Path) -> None:
    """Raise SettingsError (one line naming both keys and the fix) when exporting to EXPORT_DIR could delete
    OUTPUT_DIR, DATASET_DIR, the Base model folder ``model_dir`` (INIT_MODEL_PATH resolved) or unrelated files.
    Paths are compared after resolving symlinks, so a link to a protected folder is caught too."""
    export = _real(settings.export_dir)
    what = f"EXPORT_DIR={settings.export_dir}"
    protected = {
        "OUTPUT_DIR": _real(settings.OUTPUT_DIR),
        "DATASET_DIR": _real(settings.DATASET_DIR),
        "INIT_MODEL_PATH": _real(model_dir),
    }
    for key, path in protected.items():
        named = f"{key}={path}"
        if export == path:
            raise SettingsError(f"{what} is {named}: the export would replace it; {FIX}")
        if export in path.parents:
            raise SettingsError(f"{what} contains {named}: the export would delete it; {FIX}")
        if key != "OUTPUT_DIR" and path in export.parents:
            raise SettingsError(f"{what} is inside {named}; {FIX}")
    for own in (STATES_DIR, EVAL_CHECKPOINT_DIR, BEST_DIR):
        folder = protected["OUTPUT_DIR"] / own
        if export == folder or folder in export.parents:
            raise SettingsError(f"{what} is the run's {own} folder ({folder}) or inside it; {FIX}")
    if export.is_file():
        raise SettingsError(f"{what} is a file; {FIX}")
    if export.is_dir() and not (export / INFO_FILE).exists() and any(export.iterdir()):
        raise SettingsError(
            f"{what} holds files this package did not write (no {INFO_FILE}): the export would delete them; "
            f"empty it or {FIX}"
        )
