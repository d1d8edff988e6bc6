"""Upload-once logic, exercised against FolderRemote (a local stand-in with the Hub repo's layout)."""

import json
import shutil

import datasets
import pytest
from conftest import VOICES_DIR, make_settings

from finetuning.preparation import schema
from finetuning.preparation.encoder import SpeechEncoder
from finetuning.preparation.prepare import prepare_dataset
from finetuning.preparation.upload import FolderRemote, sync_dataset


@pytest.fixture()
def prepared(tmp_path, tiny_model_dir):
    voices = tmp_path / "voices"
    shutil.copytree(VOICES_DIR, voices)
    settings = make_settings(tmp_path, tiny_model_dir, VOICES_DIR=voices, MAX_SHARD_SIZE_MB=0.05)
    encoder = SpeechEncoder(settings.TOKENIZER_PATH, "cpu")
    prepare_dataset(settings, encoder=encoder, max_samples=4, report=lambda _: None)
    return settings, voices, encoder


def test_second_sync_uploads_nothing(prepared, tmp_path):
    settings, _, _ = prepared
    remote = FolderRemote(tmp_path / "remote")
    first = sync_dataset(settings.DATASET_DIR, remote)
    assert first.uploaded == ["english_speaker", "swahili_speaker"] and first.card_updated
    written = remote.files_written
    second = sync_dataset(settings.DATASET_DIR, remote)
    assert second.uploaded == [] and second.skipped == ["english_speaker", "swahili_speaker"]
    assert remote.files_written == written and not second.card_updated
    # the remote is a loadable dataset with one config per speaker
    rows = datasets.load_dataset(str(tmp_path / "remote"), name="swahili_speaker", split="train")
    assert len(rows) == 3


def test_changed_speaker_reuploads_only_its_config(prepared, tmp_path):
    settings, voices, _ = prepared
    remote = FolderRemote(tmp_path / "remote")
    sync_dataset(settings.DATASET_DIR, remote)
    metadata = voices / "english_speaker" / "metadata.jsonl"
    metadata.write_text(metadata.read_text().replace("Good morning, how are you?", "Good evening, how are you?"))
    prepare_dataset(settings, encoder=SpeechEncoder(settings.TOKENIZER_PATH, "cpu"), max_samples=4, report=print)
    report = sync_dataset(settings.DATASET_DIR, remote)
    assert report.uploaded == ["english_speaker"] and report.skipped == ["swahili_speaker"]


def test_interrupted_upload_resumes_without_redoing_files(prepared, tmp_path, monkeypatch):
    settings, _, _ = prepared
    remote = FolderRemote(tmp_path / "remote")
    import finetuning.preparation.upload as upload

    real_copy = shutil.copyfile
    calls = {"n": 0}

    def flaky_copy(src, dst):
        calls["n"] += 1
        if calls["n"] == 4:
            raise ConnectionError("network dropped")
        return real_copy(src, dst)

    monkeypatch.setattr(upload.shutil, "copyfile", flaky_copy)
    with pytest.raises(ConnectionError):
        sync_dataset(settings.DATASET_DIR, remote)
    done_before = remote.files_written
    assert done_before == 3 and remote.fingerprint("english_speaker") is None  # no marker for a partial config
    monkeypatch.setattr(upload.shutil, "copyfile", real_copy)
    local_files = sum(1 for p in (tmp_path / "dataset").glob("*/*") if p.suffix in (".parquet", ".json"))
    sync_dataset(settings.DATASET_DIR, remote)
    # only the files not yet sent were written on the second run, and with each config the card and summary
    assert remote.files_written - done_before == local_files - done_before + 2 * 2


def test_card_lists_configs_uploaded_by_earlier_runs(prepared, tmp_path):
    settings, _, _ = prepared
    remote = FolderRemote(tmp_path / "remote")
    sync_dataset(settings.DATASET_DIR, remote, speakers=["english_speaker"])
    assert "swahili_speaker" not in remote.read_text(schema.CARD_FILE)
    sync_dataset(settings.DATASET_DIR, remote, speakers=["swahili_speaker"])
    card = remote.read_text(schema.CARD_FILE)
    assert "config_name: english_speaker" in card and "config_name: swahili_speaker" in card
    summary = json.loads(remote.read_text(schema.SUMMARY_FILE))
    assert set(summary) == {"english_speaker", "swahili_speaker"}


def test_unprepared_speaker_is_a_clear_error(prepared, tmp_path):
    settings, _, _ = prepared
    with pytest.raises(FileNotFoundError, match="nobody"):
        sync_dataset(settings.DATASET_DIR, FolderRemote(tmp_path / "r"), speakers=["nobody"])
