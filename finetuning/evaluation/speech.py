"""Speech from a model: load a checkpoint through the stock API and let it speak as one speaker.

``synthesize`` speaks with an exported custom-voice checkpoint as a user would (``finetuning/generate.py``), and
``clone`` clones a reference clip with a voice-clone (base) checkpoint.
For evaluation, ``make_voice`` decides how a model speaks as a speaker: a ``custom_voice`` checkpoint (exported by
this package) through stock ``generate_custom_voice(speaker=...)`` with its own speaker row; a ``voice_design``
checkpoint through stock ``generate_voice_design`` (no speaker slot: each row's instruction is the voice
description); a ``base`` model as a zero-shot clone through stock ``generate_voice_clone`` in x-vector-only mode
from the speaker's first reference clip. Whether a voice takes the row's instruction comes from the export's
``finetune_info.json`` (``trained_calls.instruct``), never from the model type alone. ``generate_speech`` samples
one seeded clip without touching the caller's random state.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from finetuning.constants import SAMPLE_RATE
from finetuning.evaluation.targets import SpeakerTargets
from finetuning.preparation.audio import resample
from finetuning.resources import ModelUnavailable, one_line, resolve_device, resolve_model_dir
from finetuning.settings import Settings
from finetuning.training.export import WEIGHT_FILE_PATTERNS, read_info

MODEL_TYPES = ("base", "custom_voice", "voice_design")
# Stock non_streaming_mode defaults, as layouts: generate_custom_voice and generate_voice_design True,
# generate_voice_clone False.
STOCK_DEFAULT_LAYOUT = {"custom_voice": "non_streaming", "voice_design": "non_streaming", "base": "streaming"}
PRECISION_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # MIXED_PRECISION -> dtype
CHECKPOINT_FILES = ("config.json",)


class EvaluationError(RuntimeError):
    """The evaluation cannot run as asked (model type, missing speaker, unloadable checkpoint); says why."""


def load_checkpoint(checkpoint: str | Path, device: str = "auto", dtype: torch.dtype | None = None):
    """The exported model through the stock API (``Qwen3TTSModel``) on ``device``, in ``dtype`` (None: the
    library's default, float32).

    Raises EvaluationError (one line) for a folder that does not exist or lacks config.json or weights, a Hub id
    that cannot be fetched, or a model that fails to load.
    """
    try:
        folder = resolve_model_dir(checkpoint, key="checkpoint", required=CHECKPOINT_FILES)
    except ModelUnavailable as error:
        raise EvaluationError(str(error)) from error
    if not any(any(folder.glob(pattern)) for pattern in WEIGHT_FILE_PATTERNS):
        raise EvaluationError(f"checkpoint {checkpoint} has no weights (model.safetensors or shards); export again")
    import qwen_tts

    kwargs = {} if dtype is None else {"dtype": dtype}
    try:
        return qwen_tts.Qwen3TTSModel.from_pretrained(str(folder), device_map=resolve_device(device), **kwargs)
    except Exception as error:  # bad configs, corrupt weights, devices: transformers raises many types
        raise EvaluationError(
            f"cannot load checkpoint {checkpoint}: {type(error).__name__}: {one_line(error)}"
        ) from error


def load_model(checkpoint: str | Path, settings: Settings):
    """``load_checkpoint`` on DEVICE, in the dtype training computes in (MIXED_PRECISION: bf16 / fp16 / float32),
    so in-training evaluation does not add a float32 copy of the model beside the one being trained."""
    return load_checkpoint(checkpoint, settings.DEVICE, PRECISION_DTYPES[settings.MIXED_PRECISION])


def require_text(text: str) -> None:
    """Raises ValueError for a text with nothing to speak (generation would still write a second of noise)."""
    if not text.strip():
        raise ValueError("the text to speak is empty (or only spaces): give --text the words to say")


def check_instruct(info: dict, instruct: str | None) -> None:
    """ValueError for an instruction to a checkpoint this package trained without any (its ``finetune_info.json``
    "trained_calls" lists ``instruct: [false]``): stock would prepend a segment the fine-tune never saw."""
    claimed = info.get("trained_calls", {}).get("instruct")
    if instruct and claimed is not None and True not in claimed:
        raise ValueError("this checkpoint was trained without instructions (trained_calls.instruct); drop --instruct")


def synthesize(
    model,
    speaker: str,
    text: str,
    language: str | None = None,
    greedy: bool = False,
    max_new_tokens: int | None = None,
    non_streaming: bool | None = None,
    instruct: str | None = None,
) -> tuple[np.ndarray, int]:
    """(waveform float32, sample_rate) for ``text`` in ``speaker``'s voice.

    ``language`` None means the speaker's training language from the checkpoint (``finetune_info.json``), "auto"
    where the model has no id for it; "auto" is stock's ``language=None``. ``non_streaming`` None means the layout
    the checkpoint was trained with (``speaking_layout``: stock's default when it was trained with both).
    ``instruct``: a style instruction (stock ``instruct=``), refused by ``check_instruct`` for a checkpoint trained
    without any. Raises ValueError for an empty text or a speaker the checkpoint does not have (listing the ones
    it has).
    """
    require_text(text)
    if model.model.tts_model_type == "base":
        raise ValueError("this checkpoint is a base (voice-clone) model: clone a voice with --ref_audio F.wav")
    if model.model.tts_model_type == "voice_design":
        raise ValueError("this checkpoint is a voice-design model: describe the voice with --instruct, no --speaker")
    supported = model.get_supported_speakers() or []
    if speaker.lower() not in [s.lower() for s in supported]:
        raise ValueError(f"speaker {speaker!r} is not in this checkpoint; choose one of {sorted(supported)}")
    info = read_info(model.model.name_or_path)
    check_instruct(info, instruct)
    if language is None:
        language = generation_language(model.model, info.get("speakers", {}).get(speaker, {}).get("language", "auto"))
    if non_streaming is None:
        non_streaming = speaking_layout(info.get("training_layout"), "custom_voice") == "non_streaming"
    kwargs = {"do_sample": False, "subtalker_dosample": False} if greedy else {}
    if max_new_tokens is not None:
        kwargs["max_new_tokens"] = max_new_tokens
    wavs, sample_rate = model.generate_custom_voice(
        text=text, speaker=speaker, language=language, non_streaming_mode=non_streaming, instruct=instruct, **kwargs
    )
    return np.asarray(wavs[0], dtype=np.float32), sample_rate


def design(
    model,
    instruct: str,
    text: str,
    language: str | None = None,
    greedy: bool = False,
    max_new_tokens: int | None = None,
    non_streaming: bool | None = None,
) -> tuple[np.ndarray, int]:
    """(waveform float32, sample_rate) for ``text`` in the voice ``instruct`` describes, through stock
    ``generate_voice_design`` of a ``voice_design`` checkpoint. ``language`` None: the one language its run was
    trained on ("auto" when several); ``non_streaming`` None: the trained layout (stock's default, True, when
    both). Raises ValueError for an empty text or description, or another kind of checkpoint."""
    require_text(text)
    if model.model.tts_model_type != "voice_design":
        raise ValueError(f"this checkpoint is {model.model.tts_model_type!r}, not a voice-design model: use --speaker")
    if not (instruct or "").strip():
        raise ValueError("a voice-design checkpoint speaks in the voice --instruct describes: give one")
    info = read_info(model.model.name_or_path)
    if language is None:
        trained = {entry["language"] for entry in info.get("trained_speakers", {}).values()}
        language = generation_language(model.model, trained.pop() if len(trained) == 1 else "auto")
    if non_streaming is None:
        non_streaming = speaking_layout(info.get("training_layout"), "custom_voice") == "non_streaming"
    kwargs = {"do_sample": False, "subtalker_dosample": False} if greedy else {}
    if max_new_tokens is not None:
        kwargs["max_new_tokens"] = max_new_tokens
    wavs, sample_rate = model.generate_voice_design(
        text=text, instruct=instruct, language=language, non_streaming_mode=non_streaming, **kwargs
    )
    return np.asarray(wavs[0], dtype=np.float32), sample_rate


def clone(
    model,
    ref_audio: str | Path,
    ref_text: str | None,
    text: str,
    language: str | None = None,
    greedy: bool = False,
    max_new_tokens: int | None = None,
    non_streaming: bool | None = None,
) -> tuple[np.ndarray, int]:
    """(waveform float32, sample_rate) for ``text`` in the voice of the clip ``ref_audio`` through stock
    ``generate_voice_clone``: ICL mode with ``ref_text`` (the clip's transcript), x-vector mode without it.
    ``non_streaming`` None: the trained layout, or stock's default (False) for a checkpoint trained with both.

    ``model`` must be a ``base`` model (a voice-clone export or a Base checkpoint). ``language`` None means the one
    language a voice-clone export was trained on ("auto" when it saw several or the model has no id for it); the
    layout is the one the checkpoint was trained with (``generate_voice_clone``'s streaming default otherwise).
    Raises ValueError for an empty text, a custom-voice model or a reference file that does not exist.
    """
    require_text(text)
    if model.model.tts_model_type != "base":
        raise ValueError(
            f"--ref_audio clones with a base model; this checkpoint is {model.model.tts_model_type!r}: use --speaker"
        )
    if not Path(ref_audio).is_file():
        raise ValueError(f"--ref_audio {ref_audio} does not exist")
    info = read_info(model.model.name_or_path)
    if language is None:
        trained = {entry["language"] for entry in info.get("trained_speakers", {}).values()}
        language = generation_language(model.model, trained.pop() if len(trained) == 1 else "auto")
    kwargs = {"do_sample": False, "subtalker_dosample": False} if greedy else {}
    if max_new_tokens is not None:
        kwargs["max_new_tokens"] = max_new_tokens
    if non_streaming is None:
        non_streaming = speaking_layout(info.get("training_layout"), "base") == "non_streaming"
    wavs, sample_rate = model.generate_voice_clone(
        text=text,
        language=language,
        ref_audio=str(ref_audio),
        ref_text=ref_text or None,
        x_vector_only_mode=not ref_text,
        non_streaming_mode=non_streaming,
        **kwargs,
    )
    return np.asarray(wavs[0], dtype=np.float32), sample_rate


@dataclass
class Voice:
    """How one model speaks as one speaker: the generation call and the speaker embedding (D,) it conditions on
    (None: voice design has no speaker slot).

    takes_instruct  the row's instruction is passed on (stock ``instruct=``): a custom-voice export trained with
                    instructions, or voice design (the description); otherwise every row is spoken without one
    without         an instruction may also be left out (custom voice); voice design has no voice without one
    """

    speaker_embed: object
    conditioning: str
    # (text, language, max_new_tokens, instruct or None) -> (wavs, sample_rate)
    speak: Callable[[str, str, int, str | None], tuple[list, int]]
    takes_instruct: bool = False
    without: bool = True


def trained_with_instructions(model) -> bool:
    """Whether ``model``'s ``finetune_info.json`` says it was trained with instructions (``trained_calls.instruct``
    holds true); a checkpoint this package did not export (no such entry) is not given any."""
    return True in read_info(model.name_or_path).get("trained_calls", {}).get("instruct", [False])


def make_voice(wrapper, speaker: str, target: SpeakerTargets, non_streaming: bool) -> Voice:
    """A ``custom_voice`` model speaks with its own speaker row (and the row's instruction when it was trained
    with instructions); a ``voice_design`` model speaks the voice each row's instruction describes; a ``base``
    model clones the first reference clip from its x-vector (stock ``generate_voice_clone``, x_vector_only_mode).
    Raises EvaluationError otherwise."""
    model = wrapper.model
    if model.tts_model_type == "custom_voice":
        rows = model.config.talker_config.spk_id
        if speaker.lower() not in rows:
            raise EvaluationError(f"speaker {speaker!r} is not in this checkpoint; it has {sorted(rows)}")
        row = rows[speaker.lower()]
        embed = model.talker.get_input_embeddings().weight[row].detach()

        def speak(text, language, max_new_tokens, instruct=None):
            return wrapper.generate_custom_voice(
                text=text,
                speaker=speaker,
                language=language,
                instruct=instruct,
                non_streaming_mode=non_streaming,
                max_new_tokens=max_new_tokens,
            )

        takes = trained_with_instructions(model)
        conditioning = f"generate_custom_voice(speaker={speaker!r}{', instruct=<row>' if takes else ''})"
        return Voice(embed, f"{conditioning}; codec row {row}", speak, takes_instruct=takes)
    if model.tts_model_type == "voice_design":

        def speak(text, language, max_new_tokens, instruct=None):
            return wrapper.generate_voice_design(
                text=text,
                instruct=instruct or "",
                language=language,
                non_streaming_mode=non_streaming,
                max_new_tokens=max_new_tokens,
            )

        conditioning = "generate_voice_design(instruct=<row>): no speaker slot, the row's description"
        return Voice(None, conditioning, speak, takes_instruct=True, without=False)
    if model.tts_model_type == "base":
        prompt = wrapper.create_voice_clone_prompt(
            ref_audio=(target.references[0], SAMPLE_RATE), x_vector_only_mode=True
        )

        def speak(text, language, max_new_tokens, instruct=None):  # stock cloning takes no instruction
            return wrapper.generate_voice_clone(
                text=text,
                language=language,
                voice_clone_prompt=prompt,
                non_streaming_mode=non_streaming,
                max_new_tokens=max_new_tokens,
            )

        conditioning = f"generate_voice_clone(x_vector_only_mode=True) from reference {target.reference_ids[0]!r}"
        return Voice(prompt[0].ref_spk_embedding.detach(), conditioning, speak)
    raise EvaluationError(f"cannot evaluate a {model.tts_model_type!r} model; one of {', '.join(MODEL_TYPES)}")


def utterance_seed(seed: int, speaker: str, utterance_id: str) -> int:
    """Seed of one utterance's generation: stable across runs, processes and utterance order."""
    return zlib.crc32(f"{seed}:{speaker}:{utterance_id}".encode())


def generate_speech(
    voice: Voice, text: str, language: str, seed: int, max_new_tokens: int, device, instruct: str | None = None
) -> np.ndarray:
    """One sampled clip (24 kHz float32), with ``instruct`` (None or "": none). The caller's RNG state is restored
    afterwards, so calling this from a training loop does not change the training run."""
    import torch

    device = torch.device(device)
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        wavs, sample_rate = voice.speak(text, language, max_new_tokens, instruct or None)
    return resample(np.asarray(wavs[0], dtype=np.float32).reshape(-1), int(sample_rate), SAMPLE_RATE)


def speaking_layout(trained_layout: str | None, model_type: str) -> str:
    """The text layout a checkpoint speaks in when the caller names none: the one it was trained in, or, trained in
    both (TRAINING_LAYOUT=mixed) or not by this package, the default of the stock call for ``model_type``."""
    if trained_layout in ("non_streaming", "streaming"):
        return trained_layout
    return STOCK_DEFAULT_LAYOUT.get(model_type, "non_streaming")


def generation_language(model, language: str) -> str:
    """The language generation is given: the row's if the model has an id for it, else "auto" (as in training)."""
    return language if language.lower() in model.config.talker_config.codec_language_id else "auto"
