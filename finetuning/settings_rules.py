"""The rules single settings are checked against: the error type, numeric bounds, and the value checks that
``finetuning.settings`` attaches to its fields (``check=``). Each raises ``SettingsError`` naming the key, the
value and what is allowed."""

from __future__ import annotations

import operator
from typing import Any


class SettingsError(ValueError):
    """A setting has a value that is not allowed; the message names the key, the value and what is allowed."""


BOUNDS = {"ge": (operator.ge, ">="), "gt": (operator.gt, ">"), "le": (operator.le, "<="), "lt": (operator.lt, "<")}


def require(condition: bool, key: str, value: Any, allowed: str) -> None:
    if not condition:
        raise SettingsError(f"{key}={value!r} is not allowed: {allowed}")


def check_speakers(key: str, names: tuple[str, ...]) -> None:
    require(len(names) > 0, key, ",".join(names), "at least one speaker name")
    names_rule = "lower-case names of letters, digits, '_' or '-' (each becomes a dataset config and a speaker id)"
    for name in names:
        require(name.replace("_", "").replace("-", "").isalnum() and name == name.lower(), key, name, names_rule)
    require(len(set(names)) == len(names), key, names, "distinct names")


def check_device(key: str, device: str) -> None:
    cuda_n = device.startswith("cuda:") and device[5:].isdigit()
    require(device in ("auto", "cpu", "cuda") or cuda_n, key, device, "auto, cpu, cuda or cuda:N")


def check_repo_id(key: str, repo: str) -> None:
    require(not repo or (repo.count("/") == 1 and all(repo.split("/"))), key, repo, "a Hub repo id: owner/name")


def check_trackers(key: str, names: tuple[str, ...]) -> None:
    known = all(t in ("tensorboard", "wandb", "none") for t in names) and ("none" not in names or len(names) == 1)
    require(known, key, ",".join(names), "tensorboard and/or wandb, or none alone")


def parse_bool(key: str, raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{key}={raw!r} is not a boolean; use true/false (or 1/0, yes/no)")
