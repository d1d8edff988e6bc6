"""The Hub dataset is read at one commit, resolved once at the start (a stand-in for ``huggingface_hub.HfApi``:
the Hub cannot be reached here), and a resume names the revision when the repo moved on."""

import dataclasses
import json
from types import SimpleNamespace

import datasets
import pytest
from conftest import make_settings

from finetuning.training.checkpointing import IDENTITY_FILE, ResumeError, check_run_identity, run_identity
from finetuning.training.data import DataError, load_split, pin_dataset_revision

FIRST, SECOND = "a" * 40, "b" * 40
ONE_PROCESS = SimpleNamespace(is_main_process=True, num_processes=1)


class RevisionsHfApi:
    """``dataset_info`` over a table of branches and tags; ``calls`` records (repo, revision)."""

    def __init__(self, refs: dict[str, str]):
        self.refs, self.calls = refs, []

    def dataset_info(self, repo_id, revision=None):
        self.calls.append((repo_id, revision))
        if (revision or "main") not in self.refs:
            raise ValueError(f"Invalid rev id: {revision}\nmore detail")
        return SimpleNamespace(sha=self.refs[revision or "main"])


def test_revision_resolved_once_read_by_the_loader_and_a_moved_repo_named_at_resume(
    tmp_path, tiny_model_dir, monkeypatch
):
    api = RevisionsHfApi({"main": FIRST})
    settings = make_settings(tmp_path, tiny_model_dir, HF_DATASET_REPO="me/voices")
    pinned = pin_dataset_revision(settings, ONE_PROCESS, api)
    assert pinned.HF_DATASET_REVISION == FIRST and api.calls == [("me/voices", None)]
    assert pin_dataset_revision(pinned, ONE_PROCESS, api) is pinned and len(api.calls) == 1  # a commit: no call
    local = make_settings(tmp_path, tiny_model_dir)
    assert pin_dataset_revision(local, ONE_PROCESS, api) is local and len(api.calls) == 1

    read = []
    monkeypatch.setattr(
        datasets, "load_dataset", lambda *args, **kwargs: read.append((args, kwargs)) or datasets.Dataset.from_dict({})
    )
    load_split(pinned, "english_speaker", "train")
    assert read[0][0] == ("me/voices",) and read[0][1]["revision"] == FIRST

    state = tmp_path / "state"
    state.mkdir()
    (state / IDENTITY_FILE).write_text(json.dumps(run_identity(pinned, 1, [3, 3])))
    api.refs["main"] = SECOND  # the repo moved on
    moved = pin_dataset_revision(settings, ONE_PROCESS, api)
    with pytest.raises(ResumeError, match=f"HF_DATASET_REVISION \\(saved '{FIRST}', now '{SECOND}'\\)") as error:
        check_run_identity(state, run_identity(moved, 1, [3, 3]))
    assert "\n" not in str(error.value)
    again = pin_dataset_revision(dataclasses.replace(settings, HF_DATASET_REVISION=FIRST), ONE_PROCESS, api)
    check_run_identity(state, run_identity(again, 1, [3, 3]))  # the saved commit given: resumes

    tagged = make_settings(tmp_path, tiny_model_dir, HF_DATASET_REPO="me/voices", HF_DATASET_REVISION="v2")
    with pytest.raises(
        DataError, match="HF_DATASET_REPO=me/voices: cannot resolve revision v2 .*Invalid rev id: v2\\)"
    ):
        pin_dataset_revision(tagged, ONE_PROCESS, api)
