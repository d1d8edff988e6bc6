"""Starting from a CustomVoice checkpoint: its preset speakers are kept, the new speakers are added beside them.

A ``custom_voice`` checkpoint (``tts_model_type``) names its preset speakers in ``talker_config.spk_id``
(name -> codec-embedding row) and ``spk_is_dialect``; the row holds the speaker's embedding, which stock
``generate_custom_voice(speaker=name)`` puts in the speaker slot. Fine-tuning from it:

- each preset keeps its name, row and embedding (the row is written back unchanged at export: training never looks
  it up, so only the optimizer could move it);
- each new speaker (TRAIN_SPEAKERS) takes the first free row from ``FIRST_SPEAKER_ROW`` on, and its embedding is
  computed as for a Base init, by the speaker encoder of the Base model SPEAKER_ENCODER_PATH names (CustomVoice
  checkpoints ship none);
- during training a preset is speaker ``len(TRAIN_SPEAKERS) + p`` of the conditioning table (replay rows,
  ``training.replay``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from finetuning.resources import one_line, resolve_model_dir
from finetuning.settings import Settings

logger = logging.getLogger(__name__)

BASE, CUSTOM_VOICE = "base", "custom_voice"
ENCODER_PREFIX = "speaker_encoder."


class InitModelError(RuntimeError):
    """INIT_MODEL_PATH / SPEAKER_ENCODER_PATH cannot be used as asked; the message says what to fix."""


@dataclass(frozen=True)
class PresetSpeakers:
    """The init model's preset speakers: ``rows`` name -> codec row (lower-case, in the config's order),
    ``dialects`` the config's ``spk_is_dialect`` values, ``embeds`` (P, D) float32 their rows as loaded."""

    rows: dict[str, int]
    dialects: dict[str, object]
    embeds: torch.Tensor

    @property
    def names(self) -> list[str]:
        return list(self.rows)

    @classmethod
    def none(cls, width: int = 0) -> PresetSpeakers:
        return cls({}, {}, torch.zeros(0, width))

    @classmethod
    def from_model(cls, model) -> PresetSpeakers:
        """The presets of a loaded ``Qwen3TTSForConditionalGeneration`` (none for a Base model)."""
        talker = model.config.talker_config
        table = model.talker.get_input_embeddings().weight
        if model.tts_model_type != CUSTOM_VOICE or not talker.spk_id:
            return cls.none(table.shape[1])
        rows = {name.lower(): int(row) for name, row in talker.spk_id.items()}
        dialects = {name.lower(): value for name, value in (talker.spk_is_dialect or {}).items()}
        embeds = table.detach()[list(rows.values())].float().cpu().clone()  # (P, D)
        return cls(rows, dialects, embeds)


def init_model_type(model_dir: str | Path) -> str:
    """``tts_model_type`` of a model folder's config.json ("base" when it names none)."""
    return json.loads((Path(model_dir) / "config.json").read_text()).get("tts_model_type", BASE)


def check_init_model(settings: Settings, model_dir: Path) -> str:
    """The init model's type, once checked against the settings before any model loads: a ``custom_voice`` init
    needs TRAINING_MODE=custom_voice, SPEAKER_ENCODER_PATH and new speaker names that are not presets; REPLAY_FRACTION
    needs a ``custom_voice`` init. Raises InitModelError with one line naming the key and the fix."""
    kind = init_model_type(model_dir)
    where = f"INIT_MODEL_PATH={settings.INIT_MODEL_PATH}"
    if kind not in (BASE, CUSTOM_VOICE):
        raise InitModelError(f"{where} is a {kind!r} model; fine-tune a Base or a CustomVoice model")
    if kind == BASE:
        if settings.REPLAY_FRACTION > 0:
            raise InitModelError(
                f"REPLAY_FRACTION={settings.REPLAY_FRACTION} replays the preset speakers of a CustomVoice init, but "
                f"{where} is a Base model (no presets); set REPLAY_FRACTION=0"
            )
        if settings.SPEAKER_ENCODER_PATH:
            logger.warning("%s is a Base model: its own speaker encoder is used, SPEAKER_ENCODER_PATH is not", where)
        return kind
    if settings.TRAINING_MODE != CUSTOM_VOICE:
        raise InitModelError(
            f"TRAINING_MODE={settings.TRAINING_MODE} needs a Base model (it exports one), but {where} is a "
            "CustomVoice model; use TRAINING_MODE=custom_voice or a Base INIT_MODEL_PATH"
        )
    if not settings.SPEAKER_ENCODER_PATH:
        raise InitModelError(
            f"{where} is a CustomVoice model, which ships no speaker encoder: set SPEAKER_ENCODER_PATH to the Base "
            "model of the same size (e.g. Qwen/Qwen3-TTS-12Hz-1.7B-Base) to compute the new speakers' x-vectors"
        )
    config = json.loads((Path(model_dir) / "config.json").read_text())
    presets = {name.lower() for name in config["talker_config"].get("spk_id") or {}}
    taken = [name for name in settings.TRAIN_SPEAKERS if name.lower() in presets]
    if taken:
        raise InitModelError(
            f"TRAIN_SPEAKERS: {', '.join(taken)} is already a preset speaker of {where} "
            f"(presets: {', '.join(sorted(presets))}); give the new speaker another name"
        )
    return kind


def load_speaker_encoder(settings: Settings, width: int) -> torch.nn.Module:
    """The frozen speaker encoder of the Base model SPEAKER_ENCODER_PATH, in float32 (``clip_xvectors`` casts it),
    read from its safetensors without building the rest of the model. ``width`` is the init model's talker
    hidden size, which the x-vectors must match. Raises InitModelError (not a Base model, no encoder weights,
    another width) or ModelUnavailable (no such folder / repo)."""
    from qwen_tts.core.models.configuration_qwen3_tts import Qwen3TTSConfig
    from qwen_tts.core.models.modeling_qwen3_tts import Qwen3TTSSpeakerEncoder
    from safetensors import safe_open

    where = f"SPEAKER_ENCODER_PATH={settings.SPEAKER_ENCODER_PATH}"
    model_dir = resolve_model_dir(
        settings.SPEAKER_ENCODER_PATH,
        token=settings.HF_TOKEN or None,
        key="SPEAKER_ENCODER_PATH",
        required=("config.json",),
    )
    if init_model_type(model_dir) != BASE:
        raise InitModelError(f"{where} is a {init_model_type(model_dir)!r} model; give a Base model folder or Hub id")
    config = Qwen3TTSConfig.from_pretrained(str(model_dir))
    encoder = Qwen3TTSSpeakerEncoder(config.speaker_encoder_config)
    state = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), "pt") as weights:
            for key in weights.keys():
                if key.startswith(ENCODER_PREFIX):
                    state[key[len(ENCODER_PREFIX) :]] = weights.get_tensor(key).float()
    if not state:
        raise InitModelError(f"{where} holds no {ENCODER_PREFIX}* weights; give a Base model (it ships the encoder)")
    try:
        encoder.load_state_dict(state)
    except RuntimeError as error:
        raise InitModelError(f"{where}: its speaker encoder does not load ({one_line(error)})") from error
    if config.speaker_encoder_config.enc_dim != width:
        raise InitModelError(
            f"{where} makes {config.speaker_encoder_config.enc_dim}-wide x-vectors but INIT_MODEL_PATH's talker is "
            f"{width} wide; give the Base model of the same size"
        )
    return encoder.float().requires_grad_(False).eval()
