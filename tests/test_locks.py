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
