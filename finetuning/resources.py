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


def one_line(error: BaseException) -> str:
    """An exception's message on one line (library messages often span several)."""
    return " ".join(str(error).split())


def resolve_model_dir(
    source: str | Path,
    token: str | None = None,
    allow_download: bool = True,
    key: str | None = None,
    required: tuple[str, ...] = (),
) -> Path:
    """A local folder for ``source``: the folder itself, or the Hub repo's snapshot in the Hugging Face cache.

    With ``allow_download`` a repo missing from the cache is fetched (which may retry for a while on a machine
    without access); without it only the local cache is consulted, so a missing model fails at once. ``key``
    (e.g. "INIT_MODEL_PATH") names the setting in messages; ``required`` lists files a local folder must hold.

    Raises ModelUnavailable with one line that tells a local folder that is missing (or lacks ``required`` files)
    apart from a Hub repo id that cannot be fetched (offline, not cached, unknown or private), and says the fix.
    """
    text = str(source)
    what = f"{key}={text}" if key else repr(text)
    path = Path(source).expanduser()
    if path.is_dir():
        missing = [name for name in required if not (path / name).exists()]
        if missing:
            raise ModelUnavailable(f"{what}: the folder has no {', '.join(missing)}; give the model's own folder")
        return path
    if path.exists():
        raise ModelUnavailable(f"{what} is a file; give the model's folder (with {', '.join(required) or 'its files'})")
    if not is_hub_id(text) or Path(text.split("/")[0]).is_dir():
        where = "" if path.is_absolute() else f" (relative to {Path.cwd()})"
        raise ModelUnavailable(f"{what}: no such folder{where}; check the path")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text, local_files_only=not allow_download, token=token))
    except Exception as error:  # hub, network and cache failures come as several exception types
        if not allow_download:
            raise ModelUnavailable(
                f"{what} is not a local folder, and as a Hub repo id it is not in the local Hugging Face cache and "
                "downloads are disabled: give a local folder, or allow downloads"
            ) from error
        if type(error).__name__ == "LocalEntryNotFoundError":  # offline (HF_HUB_OFFLINE) or the Hub unreachable
            raise ModelUnavailable(
                f"{what} is not a local folder, and as a Hub repo id it is not in the local Hugging Face cache and "
                "cannot be fetched offline: give a local folder, or download it once with network access"
            ) from error
        raise ModelUnavailable(
            f"{what}: the Hub repo could not be downloaded ({type(error).__name__}: {one_line(error)}); check the id, "
            "HF_TOKEN for a private or gated repo, and the network"
        ) from error
