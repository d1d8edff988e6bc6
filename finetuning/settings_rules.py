"""The rules single settings are checked against: the error type, parsing a raw value into a field's type, numeric
bounds, the value checks that ``finetuning.settings`` attaches to its fields (``check=``), and the one-edit test
behind the misspelt-variable warning. Each check raises ``SettingsError`` naming the key, the value and what is
allowed."""

from __future__ import annotations

import dataclasses
import math
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


def parse_value(key: str, raw: Any, kind: type) -> Any:
    """A value from the file, the environment or a flag (a string) as ``kind`` (the field's type: bool, tuple, str,
    int or float); other values as given."""
    if not isinstance(raw, str):
        return raw
    text = raw.strip()
    if kind is bool:
        return parse_bool(key, text)
    if kind is tuple:
        return tuple(part.strip() for part in text.split(",") if part.strip())
    try:
        return kind(text)  # str, int or float
    except ValueError:
        raise SettingsError(f"{key}={raw!r} is not {'an integer' if kind is int else 'a number'}") from None


def allowed_range(f: dataclasses.Field) -> str:
    """What a bounded field allows, e.g. "an integer >= 1 (utterances: ...)" or "0 <= x < 1 (fraction: ...)"."""
    bounds = [(BOUNDS[k][1], value) for k, value in f.metadata["bounds"].items()]
    if len(bounds) == 2:  # lower bound first: (">=", 0), ("<", 1) -> "0 <= x < 1"
        (low, low_value), (high, high_value) = bounds
        text = f"{low_value} {low.replace('>', '<')} x {high} {high_value}"
    else:
        text = f"{bounds[0][0]} {bounds[0][1]}"
    integer = "an integer " if type(f.default) is int else ""
    return f"{integer}{text} ({f.metadata['unit']}: {f.metadata['help']})"


def check_field(f: dataclasses.Field, value: Any) -> None:
    """A field's own rules (``choices``, finite floats, ``bounds``, ``check``); raises SettingsError."""
    meta = f.metadata
    if meta["choices"] is not None:
        require(value in meta["choices"], f.name, value, f"one of {', '.join(meta['choices'])}")
    require(not isinstance(value, float) or math.isfinite(value), f.name, value, "a finite number")
    if meta["bounds"]:
        within = all(BOUNDS[k][0](value, limit) for k, limit in meta["bounds"].items())
        require(within, f.name, value, allowed_range(f))
    if meta["check"] is not None:
        meta["check"](f.name, value)


def one_edit_apart(a: str, b: str) -> bool:
    """One character inserted, deleted or replaced, or two neighbours swapped (they share a one-deletion form)."""
    forms = [{word, *(word[:i] + word[i + 1 :] for i in range(len(word)))} for word in (a, b)]
    return a != b and bool(forms[0] & forms[1])
