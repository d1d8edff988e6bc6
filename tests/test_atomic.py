"""Crash-safe writes: the new copy is on disk before it replaces the old one, and the old one goes last."""

import os

import pytest

from finetuning import atomic


class Killed(BaseException):
    """The process dying at that point (not an error anything catches)."""


def _record(monkeypatch, fail_rename_to=None):
    """Record fsyncs (by path) and renames in order; a rename onto ``fail_rename_to`` dies like a crash."""
    events = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(descriptor):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{descriptor}")))
        real_fsync(descriptor)

    def rename(source, target):
        if fail_rename_to is not None and str(target) == str(fail_rename_to):
            raise Killed
        events.append(("rename", str(source), str(target)))
        real_rename(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    return events


def _folder(path, text):
    (path / "sub").mkdir(parents=True)
    (path / "a.bin").write_text(text)
    (path / "sub" / "b.bin").write_text(text)
    return path


def test_replace_folder_flushes_the_new_copy_before_the_swap_and_removes_the_old_one_last(tmp_path, monkeypatch):
    final, staging = _folder(tmp_path / "model", "old"), _folder(tmp_path / ".model-staging", "new")
    events = _record(monkeypatch)
    atomic.replace_folder(staging, final)
    swap = events.index(("rename", str(staging), str(final)))
    flushed = {path for kind, path, *_ in events[:swap] if kind == "fsync"}
    assert {str(staging / "a.bin"), str(staging / "sub" / "b.bin"), str(staging), str(staging / "sub")} <= flushed
    assert ("rename", str(final), str(tmp_path / ".model.previous")) in events[:swap]  # aside, not deleted
    assert ("fsync", str(tmp_path)) in events[swap:]  # the swap itself is flushed
    assert (final / "a.bin").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_crash_during_the_swap_leaves_the_earlier_copy_which_is_restored(tmp_path, monkeypatch):
    final, staging = _folder(tmp_path / "model", "old"), _folder(tmp_path / ".model-staging", "new")
    _record(monkeypatch, fail_rename_to=final)
    with pytest.raises(Killed):
        atomic.replace_folder(staging, final)
    assert not final.exists() and (tmp_path / ".model.previous" / "a.bin").read_text() == "old"
    monkeypatch.undo()  # the next run
    atomic.restore_previous(final)
    assert (final / "a.bin").read_text() == "old" and (final / "sub" / "b.bin").read_text() == "old"


def test_write_text_is_flushed_before_it_replaces_and_a_crash_keeps_the_old_text(tmp_path, monkeypatch):
    path = tmp_path / "info.json"
    path.write_text('{"old": 1}')
    events = _record(monkeypatch)
    atomic.write_json(path, {"new": 2})
    assert atomic.read_json(path) == {"new": 2}
    assert events[0] == ("fsync", str(tmp_path / ".info.json.partial"))
    monkeypatch.setattr(os, "replace", lambda *_: (_ for _ in ()).throw(Killed()))
    with pytest.raises(Killed):
        atomic.write_json(path, {"newer": 3})
    assert atomic.read_json(path) == {"new": 2}


def test_read_json_tells_a_torn_file_apart_by_returning_none(tmp_path):
    path = tmp_path / "prepare_info.json"
    path.write_text('{"fingerprint": "ab')
    assert atomic.read_json(path) is None and atomic.read_json(tmp_path / "missing.json") is None
