"""Upload a prepared dataset once: only speaker configs whose fingerprint differs from the remote's are sent.

The decision logic (``sync_dataset``) is one code path for every remote. ``HubRemote`` talks to the Hugging
Face Hub with huggingface_hub; ``FolderRemote`` is a local folder with the same interface (tests, air-gapped
mirrors). On the Hub each config is one commit (its shards, the deletion of an older preparation's shards,
``prepare_info.json``, which holds the fingerprint, and the dataset card and summary that list it), so the repo never
shows a config pointing at deleted or missing shards, nor a card naming files another commit has not yet brought;
``FolderRemote`` writes data files first and ``prepare_info.json`` and the card last. An interrupted upload is
resumed by running again: the Hub skips LFS files it already has, ``FolderRemote`` skips files with equal content.
An existing public Hub repo is refused unless HF_DATASET_PUBLIC_OK (or HF_DATASET_PRIVATE=false) says so: voice
data is personal.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from finetuning.preparation import schema
from finetuning.preparation.writing import local_configs

logger = logging.getLogger(__name__)


class DatasetRemote(Protocol):
    def ensure_exists(self) -> None: ...

    def fingerprint(self, config: str) -> str | None: ...

    def upload_config(self, local_config_dir: Path, config: str, card_files: dict[str, str]) -> None: ...

    def read_text(self, path_in_repo: str) -> str | None: ...

    def write_files(self, files: dict[str, str], message: str) -> None: ...

    def configs(self) -> list[str]: ...


@dataclass
class UploadReport:
    uploaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    card_updated: bool = False


def _info_fingerprint(text: str | None) -> str | None:
    if not text:
        return None
    try:
        return json.loads(text).get("fingerprint")
    except json.JSONDecodeError:
        return None


class PublicRepoError(RuntimeError):
    """The Hub repo exists and is public while the settings ask for a private one."""


class HubRemote:
    """A Hub dataset repo. The token is passed to huggingface_hub only; it is never logged or written.

    ``private``: create the repo private; an existing public repo is then refused unless ``public_ok``."""

    def __init__(self, repo_id: str, token: str | None = None, private: bool = True, api=None, public_ok=False):
        from huggingface_hub import HfApi

        self.repo_id = repo_id
        self.private = private
        self.public_ok = public_ok
        self.api = api or HfApi(token=token or None)

    def ensure_exists(self) -> None:
        """Create the repo (private by default); raise PublicRepoError for an existing public one."""
        self.api.create_repo(self.repo_id, repo_type="dataset", private=self.private, exist_ok=True)
        if self.private and not self.public_ok and not self.api.repo_info(self.repo_id, repo_type="dataset").private:
            raise PublicRepoError(
                f"HF_DATASET_REPO={self.repo_id} is a public dataset repo: the voices would be published. Make it "
                "private on the Hub, choose another repo, or set HF_DATASET_PUBLIC_OK=true to publish them"
            )

    def read_text(self, path_in_repo: str) -> str | None:
        from huggingface_hub.utils import EntryNotFoundError

        try:
            local = self.api.hf_hub_download(self.repo_id, path_in_repo, repo_type="dataset")
        except EntryNotFoundError:
            return None
        return Path(local).read_text(encoding="utf-8")

    def fingerprint(self, config: str) -> str | None:
        return _info_fingerprint(self.read_text(f"{config}/{schema.INFO_FILE}"))

    def configs(self) -> list[str]:
        files = self.api.list_repo_files(self.repo_id, repo_type="dataset")
        return sorted({f.split("/")[0] for f in files if f.endswith(f"/{schema.INFO_FILE}")})

    def upload_config(self, local_config_dir: Path, config: str, card_files: dict[str, str]) -> None:
        """One commit: the config's shards, the deletion of remote shards it no longer has, its info file and the
        ``card_files`` ({path in the repo: text}: the card and summary listing it)."""
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        shards = sorted(local_config_dir.glob("*.parquet"))
        wanted = {f"{config}/{shard.name}" for shard in shards}
        remote = self.api.list_repo_files(self.repo_id, repo_type="dataset")
        stale = [f for f in remote if f.startswith(f"{config}/") and f.endswith(".parquet") and f not in wanted]
        operations = [CommitOperationAdd(f"{config}/{shard.name}", str(shard)) for shard in shards]
        operations += [CommitOperationDelete(path) for path in stale]
        info = local_config_dir / schema.INFO_FILE
        operations.append(CommitOperationAdd(f"{config}/{schema.INFO_FILE}", str(info)))
        operations += [CommitOperationAdd(path, text.encode("utf-8")) for path, text in card_files.items()]
        self.api.create_commit(
            repo_id=self.repo_id,
            repo_type="dataset",
            operations=operations,
            commit_message=f"Speaker config {config}",
        )

    def write_files(self, files: dict[str, str], message: str) -> None:
        """One commit of ``files`` ({path in the repo: text})."""
        from huggingface_hub import CommitOperationAdd

        operations = [CommitOperationAdd(path, text.encode("utf-8")) for path, text in files.items()]
        self.api.create_commit(repo_id=self.repo_id, repo_type="dataset", operations=operations, commit_message=message)


class FolderRemote:
    """A local folder laid out like the Hub repo; counts the files it writes (``files_written``)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.files_written = 0

    def ensure_exists(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def read_text(self, path_in_repo: str) -> str | None:
        path = self.root / path_in_repo
        return path.read_text(encoding="utf-8") if path.exists() else None

    def fingerprint(self, config: str) -> str | None:
        return _info_fingerprint(self.read_text(f"{config}/{schema.INFO_FILE}"))

    def configs(self) -> list[str]:
        return sorted(p.parent.name for p in self.root.glob(f"*/{schema.INFO_FILE}"))

    def _copy(self, source: Path, target: Path) -> None:
        if target.exists() and _sha(target) == _sha(source):
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        self.files_written += 1

    def upload_config(self, local_config_dir: Path, config: str, card_files: dict[str, str]) -> None:
        target_dir = self.root / config
        wanted = {p.name for p in local_config_dir.glob("*.parquet")}
        for stale in target_dir.glob("*.parquet") if target_dir.exists() else []:
            if stale.name not in wanted:
                stale.unlink()
        for shard in sorted(local_config_dir.glob("*.parquet")):
            self._copy(shard, target_dir / shard.name)
        self._copy(local_config_dir / schema.INFO_FILE, target_dir / schema.INFO_FILE)
        self.write_files(card_files, "")

    def write_files(self, files: dict[str, str], message: str) -> None:
        for path_in_repo, text in files.items():
            path = self.root / path_in_repo
            if path.exists() and path.read_text(encoding="utf-8") == text:
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            self.files_written += 1


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sync_dataset(dataset_dir: str | Path, remote: DatasetRemote, speakers: list[str] | None = None) -> UploadReport:
    """Upload every local config (or only ``speakers``) whose fingerprint the remote lacks; then the card.

    The remote card lists every config the remote holds, so configs uploaded earlier by other runs stay listed.
    Raises FileNotFoundError when a requested speaker has not been prepared locally.
    """
    dataset_dir = Path(dataset_dir)
    local = local_configs(dataset_dir)
    wanted = speakers or sorted(local)
    missing = [s for s in wanted if s not in local]
    if missing:
        raise FileNotFoundError(f"speaker config(s) {missing} are not prepared in {dataset_dir}; prepare them first")
    remote.ensure_exists()
    report = UploadReport()
    infos = {}  # what the remote's card lists: every config there (uploaded earlier, maybe by other runs)
    for config in remote.configs():
        info_text = remote.read_text(f"{config}/{schema.INFO_FILE}")
        infos[config] = json.loads(info_text) if info_text else {}
    for config in wanted:
        if infos.get(config, {}).get("fingerprint") == local[config]["fingerprint"]:
            report.skipped.append(config)
            logger.info("config %s: remote is up to date, nothing to upload", config)
            continue
        logger.info("config %s: uploading", config)
        infos[config] = local[config]
        remote.upload_config(dataset_dir / config, config, _card_files(infos))
        report.uploaded.append(config)
        report.card_updated = True
    files = _card_files({config: infos.get(config) or local[config] for config in sorted(set(infos) | set(wanted))})
    stale = {path: text for path, text in files.items() if remote.read_text(path) != text}
    if stale:  # nothing uploaded, but the card or summary is not the one the configs make
        remote.write_files(files, "Update dataset card")
        report.card_updated = True
    return report


def _card_files(infos: dict[str, dict]) -> dict[str, str]:
    """The dataset card and the preparation summary for the configs ``infos`` ({config: prepare_info content})."""
    infos = dict(sorted(infos.items()))
    summaries = json.dumps({c: i.get("summary", {}) for c, i in infos.items()}, indent=2, sort_keys=True)
    return {schema.CARD_FILE: schema.render_card(infos), schema.SUMMARY_FILE: summaries}
