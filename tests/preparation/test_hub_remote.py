"""HubRemote against a recording stand-in for ``huggingface_hub.HfApi`` (the Hub cannot be reached here): the
stand-in keeps the repo's files and the list of commits, so the tests assert what was sent, in which commits."""

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import VOICES_DIR, make_settings
from huggingface_hub import CommitOperationAdd, CommitOperationDelete
from huggingface_hub.utils import EntryNotFoundError

from finetuning.preparation import schema
from finetuning.preparation.encoder import SpeechEncoder
from finetuning.preparation.prepare import prepare_dataset
from finetuning.preparation.upload import HubRemote, PublicRepoError, sync_dataset

TOKEN = "hf_secret_token_value"


@dataclass
class RepoInfo:
    private: bool


class RecordingHfApi:
    """The HfApi calls HubRemote makes, on a dict of files; ``commits`` lists (message, [(op, path)])."""

    def __init__(self, download_dir: Path, exists: bool = False, private: bool = True):
        self.files: dict[str, bytes] = {}
        self.commits: list[tuple[str, list[tuple[str, str]]]] = []
        self.exists, self.private_flag, self.download_dir = exists, private, download_dir
        self.created_private: list[bool] = []

    def create_repo(self, repo_id, repo_type, private, exist_ok):
        assert repo_type == "dataset" and exist_ok
        if not self.exists:
            self.exists, self.private_flag = True, private
            self.created_private.append(private)

    def repo_info(self, repo_id, repo_type):
        return RepoInfo(private=self.private_flag)

    def list_repo_files(self, repo_id, repo_type):
        return sorted(self.files)

    def hf_hub_download(self, repo_id, filename, repo_type):
        if filename not in self.files:
            raise EntryNotFoundError(f"{filename} not found")
        path = self.download_dir / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.files[filename])
        return str(path)

    def create_commit(self, repo_id, repo_type, operations, commit_message):
        recorded = []
        for op in operations:
            if isinstance(op, CommitOperationAdd):
                data = op.path_or_fileobj
                self.files[op.path_in_repo] = data if isinstance(data, bytes) else Path(data).read_bytes()
                recorded.append(("add", op.path_in_repo))
            else:
                assert isinstance(op, CommitOperationDelete)
                del self.files[op.path_in_repo]
                recorded.append(("delete", op.path_in_repo))
        self.commits.append((commit_message, recorded))


@pytest.fixture()
def prepared(tmp_path, tiny_model_dir):
    voices = tmp_path / "voices"
    shutil.copytree(VOICES_DIR, voices)
    settings = make_settings(tmp_path, tiny_model_dir, VOICES_DIR=voices, MAX_SHARD_SIZE_MB=0.05)
    prepare_dataset(
        settings, encoder=SpeechEncoder(settings.TOKENIZER_PATH, "cpu"), max_samples=4, report=lambda _: None
    )
    return settings, voices


def _config_files(dataset: Path, config: str) -> list[tuple[str, str]]:
    shards = sorted(p.name for p in (dataset / config).glob("*.parquet"))
    return [("add", f"{config}/{name}") for name in shards] + [("add", f"{config}/{schema.INFO_FILE}")]


def test_one_commit_per_config_private_nothing_resent_and_no_path_or_token(prepared, tmp_path):
    settings, voices = prepared
    dataset = Path(settings.DATASET_DIR)
    api = RecordingHfApi(tmp_path / "downloads")
    remote = HubRemote("me/voices", token=TOKEN, api=api)
    sync_dataset(dataset, remote)
    assert api.created_private == [True]
    card = [("add", schema.CARD_FILE), ("add", schema.SUMMARY_FILE)]
    assert api.commits == [
        ("Speaker config english_speaker", _config_files(dataset, "english_speaker") + card),
        ("Speaker config swahili_speaker", _config_files(dataset, "swahili_speaker") + card),
    ]
    assert api.files[schema.CARD_FILE] == (dataset / schema.CARD_FILE).read_bytes()
    for path, data in api.files.items():
        local = (dataset / path).read_bytes() if (dataset / path).exists() else None
        assert local is None or data == local, path
        assert TOKEN.encode() not in data and str(tmp_path).encode() not in data, path
    committed = len(api.commits)
    sync_dataset(dataset, remote)
    assert len(api.commits) == committed  # a re-run sends nothing

    # english re-prepared with other shards: one commit adds the new ones, deletes the old ones, then the info
    old_shards = {p for p in api.files if p.startswith("english_speaker/") and p.endswith(".parquet")}
    assert len(old_shards) > 1
    metadata = voices / "english_speaker" / "metadata.jsonl"
    metadata.write_text(metadata.read_text().replace("Good morning, how are you?", "Good evening, how are you?"))
    prepare_dataset(
        settings, encoder=SpeechEncoder(settings.TOKENIZER_PATH, "cpu"), max_samples=4, report=lambda _: None
    )
    sync_dataset(dataset, remote)
    message, operations = api.commits[committed]
    new_files = _config_files(dataset, "english_speaker")
    assert message == "Speaker config english_speaker"
    assert operations == new_files[:-1] + [("delete", p) for p in sorted(old_shards)] + new_files[-1:] + card
    assert len(api.commits) == committed + 1  # the card and summary came with the config
    assert json.loads(api.files["english_speaker/prepare_info.json"]) == json.loads(
        (dataset / "english_speaker" / schema.INFO_FILE).read_text()
    )


def test_an_existing_public_repo_is_refused_unless_allowed(prepared, tmp_path):
    settings, _ = prepared
    api = RecordingHfApi(tmp_path / "downloads", exists=True, private=False)
    with pytest.raises(PublicRepoError, match="HF_DATASET_REPO=me/voices is a public.*HF_DATASET_PUBLIC_OK=true"):
        sync_dataset(settings.DATASET_DIR, HubRemote("me/voices", api=api))
    assert api.commits == []
    sync_dataset(settings.DATASET_DIR, HubRemote("me/voices", api=api, public_ok=True))
    assert len(api.commits) == 2
