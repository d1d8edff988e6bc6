"""Language labels checked at preparation against the Base model's own language list.

Stock generation (``Qwen3TTSModel.generate_custom_voice``) accepts ``auto`` and every key of the model config's
``talker_config.codec_language_id`` that is not a dialect key (keys holding ``dialect`` are chosen through a
speaker's ``spk_is_dialect`` entry, never as a language, and are rejected by stock validation). A label is
resolved to one canonical lower-case name:

* a model language or ``auto`` stays as it is (case-folded);
* an ISO 639-1/639-2/639-3 code or an ISO 639 language name (``en``, ``eng``, ``ha``, ``Hausa``) becomes its
  English name (``english``, ``hausa``);
* a real language the model has no id for (``hausa``, ``swahili``) is kept by name and trains with the ``auto``
  prefix: the summary counts these rows, and a warning names them, so nothing is silent;
* anything else (``xx``), and every dialect key, is refused with the list of allowed names.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

AUTO = "auto"
DIALECT_MARKER = "dialect"
MODEL_CONFIG_FILE = "config.json"


class LanguageError(ValueError):
    """A language label cannot be used; the message names the label, the allowed names and the fix."""


@functools.lru_cache(maxsize=1)
def _iso_names() -> dict[str, str]:
    """Every ISO 639 code (alpha-2, alpha-3, bibliographic) and case-folded name -> the language's English name,
    lower-case, without a parenthesised qualifier (``Swahili (macrolanguage)`` -> ``swahili``)."""
    import pycountry

    table: dict[str, str] = {}
    # Codes before names: some ISO 639-3 names are also codes of other languages ("En" vs en = English).
    for key in ("alpha_2", "bibliographic", "alpha_3", "name"):
        for language in pycountry.languages:
            name = language.name.split(" (")[0].strip().lower()
            label = getattr(language, key, None)
            if label:
                table.setdefault(label.lower(), name)
    for name in set(table.values()):
        table.setdefault(name, name)
    return table


@dataclass(frozen=True)
class ModelLanguages:
    """The languages one Base model knows: ``ids`` (language name -> codec id, dialect keys included)."""

    ids: dict[str, int]
    source: str

    @property
    def allowed(self) -> tuple[str, ...]:
        """What stock generation accepts as ``language``: auto and every non-dialect key, sorted."""
        return (AUTO, *sorted(name for name in self.ids if DIALECT_MARKER not in name))

    def resolve(self, label: str) -> str:
        """The canonical name of ``label`` (see the module docstring). Raises LanguageError for a dialect key or a
        label that is neither a model language nor an ISO 639 code or name."""
        key = str(label).strip().lower()
        allowed = ", ".join(self.allowed)
        if key in self.ids and DIALECT_MARKER in key:
            raise LanguageError(
                f"language {label!r} is a dialect key of {self.source}; stock generation accepts only {allowed} "
                "(a dialect is chosen by the speaker, not the language): label these rows with one of those"
            )
        if key == AUTO or key in self.ids:
            return key
        name = _iso_names().get(key)
        if name is None:
            raise LanguageError(
                f"language {label!r} is not a language of {self.source} ({allowed}) nor an ISO 639 code or name; "
                'fix the label in the source or set "language" for this speaker in SPEAKERS_MANIFEST'
            )
        if name in self.ids and DIALECT_MARKER in name:
            raise LanguageError(f"language {label!r} maps to the dialect key {name!r}; use one of {allowed}")
        return name

    def trains_with_auto(self, name: str) -> bool:
        """True for a resolved name the model has no language id for (its rows train with the auto prefix)."""
        return name != AUTO and name not in self.ids


def read_model_languages(model_source: str, token: str | None = None) -> ModelLanguages:
    """The language table of a Base model's ``config.json`` (local folder, or the one file from the Hub).

    Raises LanguageError naming the source when the config cannot be read or has no ``codec_language_id``.
    """
    folder = Path(model_source).expanduser()
    try:
        if folder.is_dir():
            path = folder / MODEL_CONFIG_FILE
        else:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(model_source, MODEL_CONFIG_FILE, token=token or None))
        config = json.loads(path.read_text(encoding="utf-8"))
    except Exception as error:  # missing file, hub and network failures come as several exception types
        raise LanguageError(
            f"cannot read the language list of INIT_MODEL_PATH={model_source} ({type(error).__name__}: {error}); "
            "set INIT_MODEL_PATH to a local Base model folder, or label the data with language auto"
        ) from error
    ids = (config.get("talker_config") or {}).get("codec_language_id")
    if not isinstance(ids, dict) or not ids:
        raise LanguageError(f"INIT_MODEL_PATH={model_source} has no talker_config.codec_language_id in its config")
    table = {str(name).lower(): int(codec_id) for name, codec_id in ids.items()}
    return ModelLanguages(ids=table, source=f"INIT_MODEL_PATH={model_source}")


def resolve_labels(
    labels: set[str], model_languages: Callable[[], ModelLanguages], speaker: str
) -> tuple[dict[str, str], list[str]]:
    """(label -> canonical language, the canonical languages that train with the auto prefix, logged as a warning
    naming ``speaker``). The model's table is read only when a label is other than auto. Raises LanguageError."""
    if not any(label.strip().lower() != AUTO for label in labels):
        return {label: AUTO for label in labels}, []
    table = model_languages()
    resolved = {label: table.resolve(label) for label in sorted(labels)}
    auto_prefix = sorted({name for name in resolved.values() if table.trains_with_auto(name)})
    if auto_prefix:
        logger.warning(
            "speaker %s: %s has no language id in the model; these rows train with the auto prefix",
            speaker,
            ", ".join(auto_prefix),
        )
    return resolved, auto_prefix
