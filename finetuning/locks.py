"""One writer per folder: preparation writes DATASET_DIR, training writes OUTPUT_DIR and reads DATASET_DIR.

The writer's lock is a file ``<folder>/.lock`` created exclusively and holding the owner's process id; each reader
(a training run reading DATASET_DIR) holds a file ``<folder>/.lock.reader.<pid>``. Readers share a folder; a
writer and anyone else do not: the run that comes second stops with "another run is using DATASET_DIR=... (pid N)".
Each side creates its own file first and then looks for the other's, so of two runs starting together at least one
sees the other (both may stop; neither goes on unseen). A lock whose process is gone (the run was killed) is taken
over. The owner removes its file when it is done.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from finetuning import atomic

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"
READER_PREFIX = ".lock.reader."


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


def _busy(key: str, folder: str | os.PathLike, owner: int) -> FolderBusy:
    return FolderBusy(
        f"another run is using {key}={folder} (pid {owner}); wait for it to end, or give this run "
        f"another {key} (a lock left by a run that is gone is taken over by itself)"
    )


def _live_readers(folder: Path) -> list[int]:
    """Pids of the live readers of ``folder`` other than this process; files of readers that are gone are removed."""
    live = []
    for path in sorted(folder.glob(f"{READER_PREFIX}*")):
        owner = _owner(path)
        if owner is None or not _alive(owner):
            path.unlink(missing_ok=True)
        elif owner != os.getpid():
            live.append(owner)
    return live


def acquire(folder: str | os.PathLike, key: str) -> Path:
    """Take ``folder``'s writer lock for this process (the folder must exist); returns the lock file.

    Raises FolderBusy naming ``key`` (e.g. "OUTPUT_DIR"), the folder and the owner's pid while a live process
    other than this one holds it or reads it (``acquire_shared``). A lock left by a dead process is replaced.
    """
    path = _acquire_exclusive(folder, key)
    readers = _live_readers(Path(folder))
    if readers:
        release(path)
        raise _busy(key, folder, readers[0])
    return path


def acquire_shared(folder: str | os.PathLike, key: str) -> Path | None:
    """Take a reader's share of ``folder`` (the folder must exist); returns this reader's lock file, or None for a
    folder this process cannot write (read-only: nobody prepares into it from here either). Other readers are
    welcome; raises FolderBusy naming the writer's pid while a live writer holds ``folder``."""
    path = Path(folder) / f"{READER_PREFIX}{os.getpid()}"
    try:
        _write_pid(path)
    except OSError as error:
        logger.warning("%s=%s cannot hold a reader's lock file (%s); reading it without one", key, folder, error)
        return None
    writer = _owner(Path(folder) / LOCK_FILE)
    if writer is not None and writer != os.getpid() and _alive(writer):
        path.unlink(missing_ok=True)
        raise _busy(key, folder, writer)
    return path


def _write_pid(path: Path) -> None:
    """A file holding this process's pid, complete before it appears under ``path`` (a reader never sees it empty)."""
    atomic.write_text(path, str(os.getpid()))


def _acquire_exclusive(folder: str | os.PathLike, key: str) -> Path:
    path = Path(folder) / LOCK_FILE
    mine = str(os.getpid())
    offer = path.with_name(f"{LOCK_FILE}.{mine}.new")
    _write_pid(offer)
    try:
        while True:
            try:
                os.link(offer, path)  # appears complete, and only if no lock is there
            except FileExistsError:
                owner = _owner(path)
                if owner is not None and owner != os.getpid() and _alive(owner):
                    raise _busy(key, folder, owner) from None
                stale = path.with_name(f"{LOCK_FILE}.{mine}.stale")
                try:
                    os.rename(path, stale)  # only one of two racing runs moves it; the other tries again
                    os.unlink(stale)
                except FileNotFoundError:
                    pass
                continue
            atomic.fsync_dir(path.parent)
            return path
    finally:
        offer.unlink(missing_ok=True)


def release(path: Path) -> None:
    """Remove the lock file if this process still owns it."""
    if _owner(path) == os.getpid():
        path.unlink(missing_ok=True)


@contextmanager
def folder_lock(folder: str | os.PathLike, key: str, shared: bool = False) -> Iterator[Path | None]:
    """``acquire`` (``acquire_shared`` when ``shared``) for the duration of a ``with`` block."""
    path = (acquire_shared if shared else acquire)(folder, key)
    try:
        yield path
    finally:
        if path is not None:
            release(path)
