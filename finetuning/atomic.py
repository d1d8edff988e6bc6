"""Writes that survive a crash or a power loss: every file and folder the package finishes goes through here.

The one pattern: write under a temporary name beside the target, fsync the files and their folder, rename into
place, fsync the parent, and only then remove the previous copy. A reader therefore sees the old complete copy or
the new complete copy, never a mixture, and a "complete" marker is never on disk before the data it vouches for.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any


def fsync_file(path: str | os.PathLike) -> None:
    """Flush one file's data to the disk."""
    with open(path, "rb") as file:
        os.fsync(file.fileno())


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (names created, renamed or removed in it); a no-op where folders cannot be opened."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows: folder entries are flushed with the files
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_tree(folder: str | os.PathLike) -> None:
    """Flush every file and folder under ``folder`` (the folder included)."""
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                fsync_file(path)
        fsync_dir(root)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically: a temporary sibling, fsync, rename, fsync of the folder."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    with open(partial, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(partial, path)
    fsync_dir(path.parent)


def write_text(path: str | os.PathLike, text: str) -> None:
    """``write_bytes`` of ``text`` in UTF-8."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, data: Any, **dumps: Any) -> None:
    """``write_text`` of ``json.dumps(data, **dumps)``."""
    write_text(path, json.dumps(data, **dumps))


def replace_folder(staging: str | os.PathLike, final: str | os.PathLike) -> None:
    """Put the finished folder ``staging`` in place of ``final`` (a sibling; absent or an earlier copy).

    The staging tree is flushed, the earlier copy waits aside as ``.<name>.previous`` until the new one is renamed
    in and the parent folder flushed, and only then is it removed. A crash at any point leaves either the earlier
    copy at ``final`` or aside, or the new one at ``final``; never neither. Callers look for a left-over
    ``.previous`` with ``restore_previous`` before writing again.
    """
    staging, final = Path(staging), Path(final)
    fsync_tree(staging)
    previous = final.with_name(f".{final.name}.previous")
    if final.exists():
        if previous.exists():  # a copy aside from a crash, while a complete one is in place: stale
            shutil.rmtree(previous)
        final.rename(previous)
    staging.rename(final)
    fsync_dir(final.parent)
    if previous.exists():
        shutil.rmtree(previous)
        fsync_dir(final.parent)


def restore_previous(final: str | os.PathLike) -> None:
    """After a crash inside ``replace_folder`` between moving the earlier copy aside and renaming the new one in,
    put the earlier copy back (a no-op otherwise)."""
    final = Path(final)
    previous = final.with_name(f".{final.name}.previous")
    if previous.exists() and not final.exists():
        previous.rename(final)
        fsync_dir(final.parent)


def read_json(path: str | os.PathLike) -> Any | None:
    """The JSON in ``path``, or None when the file is missing or not valid JSON (cut short by a crash, or
    damaged); the caller says what that means for its file."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (FileNotFoundError, UnicodeDecodeError, json.JSONDecodeError):
        return None
