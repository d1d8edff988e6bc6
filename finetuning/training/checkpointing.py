"""Resumable training state: save every SAVE_STEPS, keep the newest SAVE_TOTAL_LIMIT, resume from the latest.

A state folder ``OUTPUT_DIR/states/step-<N>`` is ``accelerator.save_state`` output: model, optimizer, RNG states
and the objects the loop registers for checkpointing (the scheduler, the batch sampler, which owns the data
position, and the step counts). States are written only at optimizer-step boundaries, so a resumed run continues
with the next micro-batch of the same epoch plan and ends with the same weights as an uninterrupted run.
SIGTERM / SIGINT ask the loop to save a state and stop after the current step.

Rotation removes the states saved longest ago (by when their marker was written, not by step number). Resuming
from a state that is not the newest first moves the newer ones aside to ``OUTPUT_DIR/superseded_states/``: the
resumed run saves states under the same step names, and neither they nor the named state may be deleted or
overwritten by it. A state is complete once ``progress.done`` holds its step; the marker is written (atomically)
only after every file of the state is flushed to disk.

Every state also holds the run's identity (``run_identity.json``): the settings and facts that decide the epoch
plan and which embedding each utterance gets (seed, speaker order, batching, accumulation, process count, layout,
examples per speaker). Resuming with any of them changed would silently train on another plan, so it is refused
before anything loads, with a message naming each differing key.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path

from finetuning import atomic, locks
from finetuning.resources import one_line

logger = logging.getLogger(__name__)

STATES_DIR = "states"
STATE_PREFIX = "step-"
IDENTITY_FILE = "run_identity.json"
DONE_FILE = "progress.done"  # the completion marker: the state's step, written once its files are on disk
SUPERSEDED_DIR = "superseded_states"  # newer states moved aside when a run resumes from an older one
# Settings that decide the epoch plan, the micro-batch order or the speaker each embedding row belongs to.
IDENTITY_SETTINGS = (
    "SEED",
    "HF_DATASET_REVISION",  # the commit a Hub dataset was read at (``data.pin_dataset_revision``)
    "TRAIN_SPEAKERS",
    "SPEAKER_MIXING",
    "SPEAKER_MIXING_ALPHA",
    "SPEAKER_MAX_REPEAT",
    "MAX_BATCH_TOKENS",
    "NUM_BUCKETS",
    "BATCH_SIZE",
    "GRADIENT_ACCUMULATION_STEPS",
    "TRAINING_LAYOUT",
    "LANGUAGE_AUTO_FRACTION",  # each sample's conditioning draws, and with MAX_BATCH_TOKENS the batches
    "CLONE_ICL_FRACTION",
    "CLONE_REF_MAX_S",
    "OPTIMIZER",  # a state holds that optimizer's state dict
)
# What states saved before a key existed trained with (before the conditioning draws: languages as labelled,
# every ICL reference allowed).
IDENTITY_BEFORE_KEY = {
    "HF_DATASET_REVISION": "",
    "OPTIMIZER": "adamw",
    "LANGUAGE_AUTO_FRACTION": 0.0,
    "CLONE_ICL_FRACTION": 0.5,
    "CLONE_REF_MAX_S": float("inf"),
}


class ResumeError(RuntimeError):
    """RESUME_FROM names nothing that can be resumed; the message says what was looked for."""


def state_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / STATES_DIR / f"{STATE_PREFIX}{step:08d}"


def saved_states(output_dir: str | Path) -> list[Path]:
    """Complete saved states, oldest first (a state is complete once its ``progress.done`` marker holds its step)."""
    root = Path(output_dir) / STATES_DIR
    if not root.exists():
        return []
    states = [p for p in root.glob(f"{STATE_PREFIX}*") if is_complete(p)]
    return sorted(states, key=lambda p: int(p.name[len(STATE_PREFIX) :]))


def is_complete(path: Path) -> bool:
    """The marker exists and names the step in the folder's name (a marker cut short by a crash does not)."""
    try:
        return int((path / DONE_FILE).read_text()) == _step(path)
    except (OSError, ValueError):
        return False


def _step(path: Path) -> int:
    return int(path.name[len(STATE_PREFIX) :])


def set_aside_newer_states(output_dir: str | Path, resumed: Path) -> Path | None:
    """Move every state of ``output_dir`` with a higher step than the state ``resumed`` (complete or not; the
    resumed state may be another folder's) into ``OUTPUT_DIR/superseded_states/after-<resumed>-<time>/``; returns
    that folder, None when there were none."""
    root = Path(output_dir) / STATES_DIR
    step = int((resumed / DONE_FILE).read_text())
    newer = [p for p in root.glob(f"{STATE_PREFIX}*") if p.is_dir() and _step(p) > step]
    if not newer:
        return None
    aside = Path(output_dir) / SUPERSEDED_DIR / f"after-{resumed.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    aside.mkdir(parents=True)
    for path in newer:
        path.rename(aside / path.name)
    atomic.fsync_dir(root)
    atomic.fsync_dir(aside)
    logger.warning("resuming from %s: the newer states %s were moved to %s", resumed, [p.name for p in newer], aside)
    return aside


def resolve_resume(resume_from: str, output_dir: str | Path) -> Path | None:
    """The state folder RESUME_FROM names: "" → None, "latest" → the newest complete state in OUTPUT_DIR
    (None when there is none yet, so a first run with RESUME_FROM=latest just starts), else a folder path."""
    if not resume_from:
        return None
    if resume_from == "latest":
        states = saved_states(output_dir)
        return states[-1] if states else None
    path = Path(resume_from)
    if not (path / DONE_FILE).exists():
        raise ResumeError(f"RESUME_FROM={resume_from} is not a complete saved state (no progress.done in it)")
    return path


def run_identity(settings, num_processes: int, examples_per_speaker: list[int]) -> dict:
    """What must stay the same for a resumed run to continue the same plan: ``IDENTITY_SETTINGS``, the process
    count and the number of training examples of each speaker (a re-prepared dataset changes the plan)."""
    identity = {key: getattr(settings, key) for key in IDENTITY_SETTINGS}
    identity = {key: list(value) if isinstance(value, tuple) else value for key, value in identity.items()}
    return {**identity, "num_processes": num_processes, "examples_per_speaker": list(examples_per_speaker)}


def check_run_identity(path: Path, identity: dict) -> None:
    """Raise ResumeError naming every key whose value differs between the state at ``path`` and ``identity``."""
    file = path / IDENTITY_FILE
    if not file.exists():
        raise ResumeError(f"cannot resume from {path}: it has no {IDENTITY_FILE} (saved by an older version)")
    saved = atomic.read_json(file)
    if not isinstance(saved, dict):
        raise ResumeError(
            f"cannot resume from {path}: its {IDENTITY_FILE} is damaged (cut short by a crash?); {_older_hint(path)}"
        )
    saved = {**IDENTITY_BEFORE_KEY, **saved}
    differing = [
        f"{key} (saved {saved.get(key)!r}, now {identity.get(key)!r})"
        for key in sorted(set(saved) | set(identity))
        if saved.get(key) != identity.get(key)
    ]
    if differing:
        raise ResumeError(
            f"cannot resume from {path}: the run differs in {'; '.join(differing)}. Resume with the saved values, "
            "or start a new run in another OUTPUT_DIR"
        )


def load_training_state(accelerator, path: Path, identity: dict, output_dir: str | Path) -> None:
    """Restore every process from a saved state of the same run (``check_run_identity`` first), then set the
    states of ``output_dir`` newer than it aside (``set_aside_newer_states``). Raises
    ResumeError when the identity differs, a registered object refuses the state, or the state's files are
    truncated or corrupt; the latter names the newest older state to resume from instead."""
    check_run_identity(path, identity)
    try:
        accelerator.load_state(str(path))
    except ValueError as error:
        raise ResumeError(f"cannot resume from {path}: {error}") from error
    except Exception as error:  # safetensors, torch.load and pickle each raise their own types on a damaged file
        raise ResumeError(
            f"the training state {path} is truncated or corrupt ({type(error).__name__}: {one_line(error)}); "
            f"{_older_hint(path)}"
        ) from error
    if accelerator.is_main_process:
        set_aside_newer_states(output_dir, path)
    accelerator.wait_for_everyone()


def _older_hint(path: Path) -> str:
    """What to resume from instead of the damaged state at ``path``."""
    older = [p for p in saved_states(path.parent.parent) if p.name < path.name]
    return f"resume from the previous one with RESUME_FROM={older[-1]}" if older else "no older state is left"


def save_training_state(
    accelerator, output_dir: str | Path, step: int, keep: int, identity: dict, protect: Collection[int] = ()
) -> Path:
    """Save the state for ``step`` and the run's ``identity`` on every process, mark it complete, and prune to the
    ``keep`` saved last, besides the states of the ``protect`` steps (kept for averaging)."""
    path = state_dir(output_dir, step)
    if accelerator.is_main_process:  # a state being rewritten is incomplete until its marker is written again
        (path / DONE_FILE).unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(path))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:  # the marker goes to disk after everything it vouches for
        (path / IDENTITY_FILE).write_text(json.dumps(identity, indent=2, sort_keys=True))
        atomic.fsync_tree(path)
        atomic.write_text(path / DONE_FILE, str(step))
        rotated = [p for p in saved_states(output_dir) if _step(p) not in set(protect)]
        by_age = sorted(rotated, key=lambda p: (p / DONE_FILE).stat().st_mtime_ns)
        for old in by_age[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        logger.info("saved training state %s", path)
    accelerator.wait_for_everyone()
    return path


@contextmanager
def run_lock(accelerator, folder: str | Path, key: str, shared: bool = False) -> Iterator[None]:
    """Hold ``folder``'s lock (``finetuning.locks``; the main process takes it; a reader's share when ``shared``)
    for a ``with`` block. Raises FolderBusy on every process while another live run holds it."""
    path, busy = None, None
    if accelerator.is_main_process:
        try:
            path = (locks.acquire_shared if shared else locks.acquire)(folder, key)
        except locks.FolderBusy as error:
            busy = str(error)
    if accelerator.num_processes > 1:  # every process stops, not only the one that looked
        from accelerate.utils import broadcast_object_list

        busy = broadcast_object_list([busy])[0]
    if busy is not None:
        raise locks.FolderBusy(busy)
    try:
        yield
    finally:
        if path is not None:
            locks.release(path)


class StopRequest:
    """Set by SIGTERM / SIGINT; the loop saves a state and stops at the next optimizer-step boundary."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:  # a second signal: stop at once
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("signal %d: saving a training state at the end of this step, then stopping", signum)

    def on_any_process(self, accelerator) -> bool:
        """True on every process when any process was asked to stop (all must stop at the same step)."""
        if accelerator.num_processes == 1:
            return self.requested
        import torch

        value = torch.tensor([1.0 if self.requested else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(value, reduction="sum").item() > 0)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
