"""Folder locks in-process (two real runs meeting on one folder: tests/test_bad_inputs.py)."""

import subprocess
import sys

import pytest

from finetuning.locks import LOCK_FILE, FolderBusy, acquire, folder_lock


def test_a_live_owner_refuses_a_dead_one_is_taken_over_and_the_lock_goes_at_the_end(tmp_path):
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK_FILE).write_text(str(owner.pid))
        with pytest.raises(FolderBusy, match=f"another run is using OUTPUT_DIR={tmp_path} \\(pid {owner.pid}\\)"):
            acquire(tmp_path, "OUTPUT_DIR")
    finally:
        owner.kill()
        owner.wait()
    with folder_lock(tmp_path, "OUTPUT_DIR") as lock:  # the owner is gone now
        assert lock.read_text().isdigit() and int(lock.read_text()) != owner.pid
    assert not (tmp_path / LOCK_FILE).exists()


def test_readers_share_a_folder_a_writer_and_a_reader_exclude_each_other(tmp_path):
    from finetuning.locks import READER_PREFIX, acquire_shared, release

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / f"{READER_PREFIX}{other.pid}").write_text(str(other.pid))  # another training run reads it
        mine = acquire_shared(tmp_path, "DATASET_DIR")  # readers share
        release(mine)
        with pytest.raises(FolderBusy, match=f"another run is using DATASET_DIR={tmp_path} \\(pid {other.pid}\\)"):
            acquire(tmp_path, "DATASET_DIR")  # a preparation while a training reads
        assert not (tmp_path / LOCK_FILE).exists()
        (tmp_path / f"{READER_PREFIX}{other.pid}").unlink()
        (tmp_path / LOCK_FILE).write_text(str(other.pid))  # a preparation writes it
        with pytest.raises(FolderBusy, match=f"another run is using DATASET_DIR={tmp_path} \\(pid {other.pid}\\)"):
            acquire_shared(tmp_path, "DATASET_DIR")
        assert not list(tmp_path.glob(f"{READER_PREFIX}*"))
    finally:
        other.kill()
        other.wait()
    (tmp_path / LOCK_FILE).unlink()
    (tmp_path / f"{READER_PREFIX}{other.pid}").write_text(str(other.pid))  # a reader that is gone
    with folder_lock(tmp_path, "DATASET_DIR"):
        assert not list(tmp_path.glob(f"{READER_PREFIX}*"))
