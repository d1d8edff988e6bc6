"""Where models and computation live: a local folder for a model path or Hub id, a device for ``auto``.

One place for both, used by preparation (speech tokenizer), training (the Base model) and evaluation (the
checkpoint and the scorers' weights).
"""

from __future__ import annotations

from pathlib import Path


class ModelUnavailable(RuntimeError):
    """No local folder can be had for a model source; the message names the source and why."""


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; any other device name is returned as given."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def is_hub_id(source: str | Path) -> bool:
    """True when ``source`` has the form of a Hub repo id (``owner/name``), not of a path."""
    text = str(source)
    return not text.startswith(("/", ".", "~")) and text.count("/") == 1


def resolve_model_dir(source: str | Path, token: str | None = None, allow_download: bool = True) -> Path:
    """A local folder for ``source``: the folder itself, or the Hub repo's snapshot in the Hugging Face cache.

    With ``allow_download`` a repo missing from the cache is fetched (which may retry for a while on a machine
    without access); without it only the local cache is consulted, so a missing model fails at once. Raises
    ModelUnavailable naming the source when it is neither a folder nor a Hub repo id, or cannot be had.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    text = str(source)
    if not is_hub_id(text):
        raise ModelUnavailable(f"{text!r} is neither an existing folder nor a Hub repo id (owner/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text, local_files_only=not allow_download, token=token))
    except Exception as error:  # hub, network and cache failures come as several exception types
        where = "could not be downloaded" if allow_download else "is not in the local Hugging Face cache"
        hint = "" if allow_download else " and downloads are disabled (give a local folder or allow downloads)"
        raise ModelUnavailable(f"{text!r} {where}{hint}: {type(error).__name__}: {error}") from error
