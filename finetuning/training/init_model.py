"""The model a run starts from: loaded, checked against the mode and the data, and its speaker table.

``load_base_model`` loads INIT_MODEL_PATH through stock ``Qwen3TTSModel`` (a Base model, or a CustomVoice one whose
presets are kept, ``training.presets``); ``check_instructions`` refuses instruction data the mode or the model's
stock call cannot use before anything loads; ``speaker_table`` gives the step its speaker rows.
"""

from __future__ import annotations

from pathlib import Path

import torch

from finetuning import atomic
from finetuning.resources import one_line
from finetuning.settings import Settings
from finetuning.training.export import speaker_rows
from finetuning.training.modes import training_mode
from finetuning.training.presets import CUSTOM_VOICE, PresetSpeakers, load_speaker_encoder
from finetuning.training.speakers import compute_speaker_embeddings, freeze_speaker_encoder
from finetuning.training.speed import compile_transformers

MODEL_FILES = ("config.json",)  # what a Base model folder must hold before from_pretrained is tried


class TrainingError(RuntimeError):
    """Training cannot start or continue; the message says what to fix."""


def load_base_model(model_dir: Path, device: torch.device, settings: Settings):
    """(model, text tokenizer, stock wrapper): the model to fine-tune, in float32 (master weights; autocast supplies
    mixed precision), with its speaker encoder frozen (a CustomVoice init's from SPEAKER_ENCODER_PATH,
    ``training.presets``), ATTN_IMPLEMENTATION's attention and (TORCH_COMPILE) compiled transformers; the stock
    ``Qwen3TTSModel`` around it generates replay rows. Fails before training (ExportError) when TRAIN_SPEAKERS do
    not fit the codec vocabulary beside a CustomVoice init's presets, TrainingError when the folder does not load
    as a Qwen3-TTS model."""
    import qwen_tts

    try:
        wrapper = qwen_tts.Qwen3TTSModel.from_pretrained(
            str(model_dir), dtype=torch.float32, attn_implementation=settings.ATTN_IMPLEMENTATION
        )
    except Exception as error:  # missing or corrupt weights, foreign configs: transformers raises many types
        raise TrainingError(
            f"INIT_MODEL_PATH={model_dir} does not load as a Qwen3-TTS model ({type(error).__name__}: "
            f"{one_line(error)}); give a 12 Hz Base model folder or Hub id"
        ) from error
    model = wrapper.model
    mode = training_mode(settings)
    if model.speaker_encoder is None and model.tts_model_type == CUSTOM_VOICE and mode.speaker_slot:
        model.speaker_encoder = load_speaker_encoder(settings, model.config.talker_config.hidden_size)
    if model.speaker_encoder is None and mode.speaker_slot:
        raise TrainingError(
            f"INIT_MODEL_PATH={model_dir} is a {model.tts_model_type!r} model without a speaker encoder; "
            "fine-tune a Base model (e.g. Qwen/Qwen3-TTS-12Hz-1.7B-Base)"
        )
    freeze_speaker_encoder(model)
    if mode.speaker_rows:  # only custom voice writes speaker rows into the export
        vocab_size = model.config.talker_config.vocab_size
        speaker_rows(list(settings.TRAIN_SPEAKERS), vocab_size, PresetSpeakers.from_model(model).rows)
    if settings.TORCH_COMPILE:
        compile_transformers(model)
    return model.to(device), wrapper.processor.tokenizer, wrapper


def check_instructions(settings: Settings, model_dir: Path, instructions: tuple[bool, ...]) -> None:
    """TrainingError before the model loads when the mode cannot train on the data's instructions with this model
    (``TrainingMode.instruction_problem``: voice design without descriptions, instructions for a 0.6B model whose
    stock call drops them; the size is read, never relabelled)."""
    size = (atomic.read_json(model_dir / "config.json") or {}).get("tts_model_size", "")
    problem = training_mode(settings).instruction_problem(instructions, size)
    if problem is not None:
        raise TrainingError(problem)


def speaker_table(model, settings: Settings, dtype: torch.dtype) -> torch.Tensor:
    """(S, D) speaker rows of a mode with speaker rows (custom voice); (0, D) for one without (voice design)."""
    if training_mode(settings).speaker_rows:
        return compute_speaker_embeddings(model, settings, dtype)
    return torch.zeros(0, model.config.talker_config.hidden_size)
