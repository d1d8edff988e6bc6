"""Export a trained model as a stock ``custom_voice`` checkpoint directory (or, voice-clone training, a ``base`` one).

The directory loads with ``qwen_tts.Qwen3TTSModel.from_pretrained(dir)``; every trained speaker is a key of
``talker_config.spk_id`` whose codec-embedding row holds that speaker's embedding (the mean x-vector used in
training), so ``generate_custom_voice(speaker=name)`` conditions exactly as training did. The speaker encoder is
not part of a custom-voice model and is left out. The resolved settings (no secrets) and a ``finetune_info.json``
(speakers, rows, languages) are saved beside the weights, local paths reduced to their last part
(``portable_path``). The directory is written to a temporary sibling and renamed into place
(``atomic.replace_folder``: flushed first, the earlier export removed last), so a crash never leaves a half-written
checkpoint or neither copy.

A voice-clone run (TRAINING_MODE=voice_clone) exports a ``base`` model instead: the Base config unchanged (no
speaker rows) and the frozen speaker encoder kept, so stock ``generate_voice_clone`` clones with it as it does
with the Base model. A voice-design run (TRAINING_MODE=voice_design) exports a ``voice_design`` model: empty
speaker maps and no speaker encoder, what stock ``generate_voice_design`` loads. The mode decides
(``training.modes``).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import save_file

from finetuning import atomic
from finetuning.constants import FIRST_SPEAKER_ROW
from finetuning.resources import is_hub_id
from finetuning.settings import Settings
from finetuning.training.lora import ADAPTER_DIR, LoraAdapter
from finetuning.training.modes import training_mode
from finetuning.training.presets import PresetSpeakers

# The base model's own weights (single or sharded, safetensors or bin, with their index): never copied, the export
# writes its own model.safetensors. Subfolders (the speech tokenizer's weights) are copied whole.
WEIGHT_FILE_PATTERNS = (
    "*.safetensors",
    "*.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model*.bin.index.json",
)
INFO_FILE = "finetune_info.json"
BEST_DIR = "best"  # OUTPUT_DIR/best: the export of the best evaluation (``selection``), beside OUTPUT_DIR/model
SETTINGS_FILE = "training_settings.json"
LOCAL_PATH_PREFIX = "<local>/"  # an absolute local path in an export keeps only its last part
# What every export writes itself: never taken from the base folder (an earlier export holds them), so a file of
# the base is never linked into the staging folder and then rewritten through the link.
WRITTEN_NAMES = ("config.json", INFO_FILE, SETTINGS_FILE, ADAPTER_DIR)


class ExportError(RuntimeError):
    """The model cannot be exported as asked; the message says why."""


def speaker_rows(speakers: list[str], vocab_size: int, presets: dict[str, int] | None = None) -> dict[str, int]:
    """Codec-embedding row of each speaker, keyed by the lower-case name that generation looks up: ``presets``
    (a CustomVoice init's name -> row) as they are, then ``speakers`` in the free rows from FIRST_SPEAKER_ROW on."""
    names = [s.lower() for s in speakers]
    if len(set(names)) != len(names):
        raise ExportError(f"speaker names must differ ignoring case: {speakers}")
    presets = dict(presets or {})
    if set(names) & set(presets):
        raise ExportError(f"new speakers {sorted(set(names) & set(presets))} are already preset speakers")
    taken = set(presets.values())
    free = [row for row in range(FIRST_SPEAKER_ROW, vocab_size) if row not in taken][: len(names)]
    if len(free) < len(names):
        last = FIRST_SPEAKER_ROW + len(names) + len(taken) - 1
        raise ExportError(
            f"{len(names)} speakers need codec rows up to {last}, but the talker vocabulary has {vocab_size} rows"
        )
    return {**presets, **dict(zip(names, free, strict=True))}


def custom_voice_config(base_config: dict, rows: dict[str, int]) -> dict:
    """The base model's config.json turned into a custom-voice config listing ``rows``' speakers (a CustomVoice
    base's presets keep their ``spk_is_dialect`` values; new speakers speak no dialect)."""
    config = json.loads(json.dumps(base_config))
    config["tts_model_type"] = "custom_voice"
    talker = config["talker_config"]
    dialects = {name.lower(): value for name, value in (talker.get("spk_is_dialect") or {}).items()}
    talker["spk_id"] = dict(rows)
    talker["spk_is_dialect"] = {name: dialects.get(name, False) for name in rows}
    return config


def voice_design_config(base_config: dict, rows: dict[str, int]) -> dict:
    """The base model's config.json turned into a voice-design config: what stock ``generate_voice_design`` needs
    (``tts_model_type: voice_design``, empty speaker maps; stock builds no speaker encoder for it)."""
    config = json.loads(json.dumps(base_config))
    config["tts_model_type"] = "voice_design"
    config["talker_config"]["spk_id"] = {}
    config["talker_config"]["spk_is_dialect"] = {}
    return config


# The exported config.json per ``tts_model_type`` (``TrainingMode.export_type``), from the base's and the rows.
EXPORT_CONFIGS = {
    "custom_voice": custom_voice_config,
    "base": lambda base_config, rows: base_config,
    "voice_design": voice_design_config,
}


def export_state_dict(
    model, speaker_embeds: torch.Tensor, rows: dict[str, int], dtype: torch.dtype, state_dict: dict | None = None
) -> dict:
    """Weights of ``model`` (or ``state_dict``, e.g. gathered from FSDP shards) without the speaker encoder,
    speaker rows set to ``speaker_embeds`` (S, D)."""
    state = {}
    for name, tensor in (state_dict if state_dict is not None else model.state_dict()).items():
        if name.startswith("speaker_encoder."):
            continue
        state[name] = tensor.detach().to("cpu", dtype if tensor.is_floating_point() else tensor.dtype).clone()
    key = "talker.model.codec_embedding.weight"
    for (_, row), embed in zip(rows.items(), speaker_embeds, strict=True):
        state[key][row] = embed.to(state[key].dtype)
    return {k: v.contiguous() for k, v in state.items()}


def _base_dtype(config: dict) -> torch.dtype:
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, str(name).replace("torch.", ""), torch.float32)


def checkpoint_dtype(model_dir: str | Path) -> torch.dtype:
    """The dtype a checkpoint folder's config.json names (float32 when it names none): what it is exported in,
    and what stock inference computes x-vectors in when the model is loaded as published."""
    return _base_dtype(json.loads((Path(model_dir) / "config.json").read_text()))


def export_checkpoint(
    model,
    base_model_dir: str | Path,
    speakers: list[str],
    speaker_embeds: torch.Tensor,
    languages: dict[str, str],
    output_dir: str | Path,
    settings: Settings | None = None,
    extra_info: dict | None = None,
    link_base_files: bool = False,
    state_dict: dict | None = None,
    write_extra: Callable[[Path], None] | None = None,
    speaker_encoder: torch.nn.Module | None = None,
    presets: PresetSpeakers | None = None,
    export_type: str | None = None,
) -> Path:
    """Write a custom-voice checkpoint of ``model`` (a ``Qwen3TTSForConditionalGeneration``) to ``output_dir``.

    ``base_model_dir`` provides config, tokenizer files and the speech tokenizer; ``speaker_embeds`` is (S, D) in
    ``speakers`` order; ``languages`` maps speaker -> the language it was trained with (for ``generate.py``'s
    default). An existing ``output_dir`` is replaced only once the new one is complete. ``link_base_files``
    hard-links the base folder's unchanged files (tokenizers, speech tokenizer) instead of copying them where the
    filesystem allows, for the repeated exports of in-training evaluation; the files an export writes
    (``WRITTEN_NAMES``) are never taken from the base, so nothing is written through a link into it.
    ``state_dict`` replaces ``model.state_dict()`` (a full state gathered from sharded training).
    ``write_extra(folder)`` adds files to the checkpoint before it is renamed into place (the LoRA adapter). With
    ``speaker_encoder`` (voice-clone training) the checkpoint is a ``base`` model holding that encoder, with no
    speaker rows; ``speakers`` and ``languages`` are then only recorded as the speakers trained on. ``presets`` (a
    CustomVoice init's speakers) keep their names, rows and embeddings beside the new ``speakers``.

    Raises ExportError when the speakers do not fit the vocabulary, the base folder lacks config.json, or a weight
    is NaN or infinite (a diverged run: nothing is written and an earlier export stays in place).
    """
    base = Path(base_model_dir)
    output_dir = Path(output_dir)
    if not (base / "config.json").exists():
        raise ExportError(f"{base} has no config.json; INIT_MODEL_PATH must be a Qwen3-TTS model folder or Hub id")
    base_config = json.loads((base / "config.json").read_text())
    export_type = export_type or ("base" if speaker_encoder is not None else "custom_voice")
    named = export_type == "custom_voice"  # speakers are rows of the export, called by name
    presets = presets or PresetSpeakers.none()
    rows = speaker_rows(speakers, base_config["talker_config"]["vocab_size"], presets.rows) if named else {}
    if not named:
        speaker_embeds = speaker_embeds[:0]
    elif speaker_embeds.shape[0] != len(speakers):
        raise ExportError(f"{len(speakers)} speakers but {speaker_embeds.shape[0]} embeddings")
    elif presets.rows:  # in ``rows`` order: the presets' own rows first
        speaker_embeds = torch.cat([presets.embeds.to(speaker_embeds), speaker_embeds])

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    atomic.restore_previous(output_dir)  # an earlier export a crash left aside
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}-", dir=output_dir.parent))
    try:
        for item in base.iterdir():
            if _is_weight_file(item) or item.name in WRITTEN_NAMES or item.name.startswith("."):
                continue
            copy = _link_or_copy if link_base_files else shutil.copy2
            if item.is_dir():
                shutil.copytree(item, staging / item.name, copy_function=copy)
            else:
                copy(item, staging / item.name)
        config = EXPORT_CONFIGS[export_type](base_config, rows)
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        dtype = _base_dtype(base_config)
        state = export_state_dict(model, speaker_embeds, rows, dtype, state_dict)
        if speaker_encoder is not None:
            encoder = {
                f"speaker_encoder.{k}": v.detach().to("cpu", dtype) for k, v in speaker_encoder.state_dict().items()
            }
            state.update({k: v.contiguous() for k, v in encoder.items()})
        _refuse_non_finite(state)
        save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt"})
        trained = {name: {"language": languages.get(name, "auto")} for name in speakers}
        info = {
            **({"speakers": {n: {"row": rows[n.lower()], **trained[n]} for n in speakers}} if named else {}),
            **({} if named else {"trained_speakers": trained}),
            **({"preset_speakers": {name: {"row": row} for name, row in presets.rows.items()}} if presets.rows else {}),
            "base_model": portable_path(settings.INIT_MODEL_PATH if settings else str(base)),
            **(extra_info or {}),
        }
        (staging / INFO_FILE).write_text(json.dumps(info, indent=2))
        if settings is not None:
            atomic.write_json(staging / SETTINGS_FILE, portable_settings(settings), indent=2, sort_keys=True)
        if write_extra is not None:
            write_extra(staging)
        atomic.replace_folder(staging, output_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return output_dir


def portable_path(value: str) -> str:
    """A path as an export carries it: a Hub id or a relative path as given; any other local path reduced to
    ``<local>/<last part>``, so user names and folder layouts stay on this machine."""
    text = str(value)
    path = Path(text).expanduser()
    if not text or (is_hub_id(text) and not path.exists()):
        return text
    if not path.is_absolute() and ".." not in path.parts and not text.startswith("~"):
        return text
    return f"{LOCAL_PATH_PREFIX}{path.name}"


def portable_settings(settings: Settings) -> dict:
    """``settings.public_dict()`` with every path setting passed through ``portable_path`` (what exports save)."""
    values = settings.public_dict()
    for f in dataclasses.fields(settings):
        if "path" in f.metadata["unit"] and f.name in values:
            values[f.name] = portable_path(values[f.name])
    return values


def _refuse_non_finite(state: dict[str, torch.Tensor]) -> None:
    bad = [name for name, tensor in state.items() if tensor.is_floating_point() and not tensor.isfinite().all()]
    if bad:
        raise ExportError(
            f"{len(bad)} of {len(state)} weight tensors hold NaN or infinite values (first: {bad[0]}): training "
            "diverged, nothing was exported; lower LEARNING_RATE or resume from an earlier state"
        )


def gathered_state_dict(accelerator, step_module) -> dict:
    """The talker model's full state dict (keys as in the model) from the prepared ``TalkerStep``, gathered from
    every process (FSDP shards): every process must call it."""
    prefix = "model."
    full = accelerator.get_state_dict(step_module) or {}  # ZeRO-3 consolidates on the main process only
    return {k[len(prefix) :]: v for k, v in full.items() if k.startswith(prefix)}


@dataclass(frozen=True)
class RunExports:
    """What every export of one training run shares: the Base model folder (config, tokenizers, speech tokenizer),
    the (S, D) speaker embeddings in TRAIN_SPEAKERS order, each speaker's training language, the settings, and
    the LoRA adapter when FINETUNE_METHOD=lora (exports are then merged, with the adapter in ``adapter/``)."""

    base_model_dir: Path
    speaker_embeds: torch.Tensor
    languages: dict[str, str]
    settings: Settings
    lora: LoraAdapter | None = None
    speaker_encoder: torch.nn.Module | None = None  # kept when the mode exports it (voice_clone)
    presets: PresetSpeakers | None = None  # a CustomVoice init's speakers, kept beside the new ones
    instructions: tuple[bool, ...] = (False,)  # whether training clips carried an instruction (both: some did)

    def export(
        self,
        accelerator,
        step_module,
        output_dir: str | Path,
        step: int,
        link_base_files: bool = False,
        info: dict | None = None,
        state_dict: dict | None = None,
    ):
        """``export_checkpoint`` of the model being trained, with the run's settings, ``step`` and ``info``
        (more ``finetune_info.json`` keys) recorded. ``state_dict`` (on the main process; any non-None value on the
        others) replaces the model's weights (averaged states): nothing is then gathered.

        Every process must call it (the state is gathered from all); the main process writes ``output_dir`` and
        gets its path, the others None.
        """
        state = gathered_state_dict(accelerator, step_module) if state_dict is None else state_dict
        if not accelerator.is_main_process:
            return None
        settings = self.settings
        mode = training_mode(settings)
        write_adapter = None
        if self.lora is not None:  # the adapter from the trained state, the checkpoint from the merged one
            write_adapter = partial(self.lora.save_adapter, state, base_model=portable_path(settings.INIT_MODEL_PATH))
            state = self.lora.merged_state_dict(state, settings.LORA_MERGE_SCALE)
        return export_checkpoint(
            accelerator.unwrap_model(step_module).model,
            self.base_model_dir,
            list(settings.TRAIN_SPEAKERS),
            self.speaker_embeds[: len(settings.TRAIN_SPEAKERS)],  # the presets' rows after them: replay only
            self.languages,
            output_dir,
            settings=settings,
            extra_info={
                "optimizer_steps": step,
                "training_layout": settings.TRAINING_LAYOUT,
                "finetune_method": settings.FINETUNE_METHOD,
                **({"lora_merge_scale": settings.LORA_MERGE_SCALE} if self.lora is not None else {}),
                "training_mode": settings.TRAINING_MODE,
                "trained_calls": trained_calls(settings, self.instructions),
                **(info or {}),
            },
            link_base_files=link_base_files,
            state_dict=state,
            write_extra=write_adapter,
            speaker_encoder=self.speaker_encoder if mode.keeps_encoder else None,
            presets=self.presets,
            export_type=mode.export_type,
        )


def copy_export(source: str | Path, output_dir: str | Path, info: dict) -> Path:
    """A copy of the export ``source`` at ``output_dir`` (files hard-linked where the filesystem allows: exports
    are never written in place) with ``info`` merged into its ``finetune_info.json``; written to a staging folder
    and renamed into place like every export."""
    source, output_dir = Path(source), Path(output_dir)
    atomic.restore_previous(output_dir)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}-", dir=output_dir.parent))
    try:
        for item in source.iterdir():
            if item.name == INFO_FILE:
                continue
            if item.is_dir():
                shutil.copytree(item, staging / item.name, copy_function=_link_or_copy)
            else:
                _link_or_copy(item, staging / item.name)
        atomic.write_json(staging / INFO_FILE, {**read_info(source), **info}, indent=2)
        atomic.replace_folder(staging, output_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return output_dir


def trained_calls(settings: Settings, instructions: tuple[bool, ...] = (False,)) -> dict[str, list]:
    """The stock calls an export of ``settings``' run was trained for (``finetune_info.json`` "trained_calls"):
    the stock method, ``non_streaming_mode`` values, ``language`` ("given" / "auto" = left out), ``instruct``
    (``instructions``: whether training clips carried an instruction, [False] = never, so the export does not
    claim ``instruct=``) and, voice cloning, ``x_vector_only_mode`` values. ``generate.py``, ``evaluate.py`` and
    the tests read it."""
    from finetuning.training.conditioning import Conditioning

    conditioning = Conditioning.from_settings(settings).trained_calls()
    return training_mode(settings).trained_calls(conditioning, list(instructions), settings.CLONE_ICL_FRACTION)


def _is_weight_file(path: Path) -> bool:
    return path.is_file() and any(fnmatch.fnmatch(path.name, pattern) for pattern in WEIGHT_FILE_PATTERNS)


def _link_or_copy(source, destination) -> None:
    try:
        os.link(Path(source).resolve(), destination)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(source, destination)


def read_info(checkpoint_dir: str | Path) -> dict:
    """``finetune_info.json`` of an exported checkpoint ({} for checkpoints not made by this package)."""
    path = Path(checkpoint_dir) / INFO_FILE
    return json.loads(path.read_text()) if path.exists() else {}
