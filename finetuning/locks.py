"""One run at a time per folder: preparation holds DATASET_DIR, training holds OUTPUT_DIR.

The lock is a file ``<folder>/.lock`` created exclusively and holding the owner's process id. A second run finds
it and stops with "another run is using DATASET_DIR=... (pid N)"; a lock whose process is gone (the run was
killed) is taken over. The owner removes the file when it is done.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_FILE = ".lock"


class FolderBusy(RuntimeError):
    """Another live process holds the folder; the message names the key, the folder and that process."""


def _owner(path: Path) -> int | None:
    """The pid in a lock file; None when it is gone, empty or unreadable (a lock cut short counts as stale)."""
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def acquire(folder: str | os.PathLike, key: str) -> Path:
    """Take ``folder``'s lock for this process (the folder must exist); returns the lock file.

    Raises FolderBusy naming ``key`` (e.g. "OUTPUT_DIR"), the folder and the owner's pid while a live process
    other than this one holds it. A lock left by a dead process is replaced.
    """
    path = Path(folder) / LOCK_FILE
    mine = str(os.getpid())
    while True:
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _owner(path)
            if owner is not None and owner != os.getpid() and _alive(owner):
                raise FolderBusy(
                    f"another run is using {key}={folder} (pid {owner}); wait for it to end, or give this run "
                    f"another {key} (a lock left by a run that is gone is taken over by itself)"
                ) from None
            stale = path.with_name(f"{LOCK_FILE}.{mine}.stale")
            try:
                os.rename(path, stale)  # only one of two racing runs moves it; the other tries again
                os.unlink(stale)
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(descriptor, "w") as file:
            file.write(mine)
            file.flush()
            os.fsync(file.fileno())
        return path


def release(path: Path) -> None:
    """Remove the lock file if this process still owns it."""
    if _owner(path) == os.getpid():
        path.unlink(missing_ok=True)


@contextmanager
def folder_lock(folder: str | os.PathLike, key: str) -> Iterator[Path]:
    """``acquire`` for the duration of a ``with`` block."""
    path = acquire(folder, key)
    try:
        yield path
    finally:
        release(path)
