"""Speak with an exported checkpoint: ``uv run python finetuning/generate.py --checkpoint DIR --speaker NAME
--text "..." [--language L] [--output out.wav]``.

Uses stock ``qwen_tts.Qwen3TTSModel.generate_custom_voice``. The language defaults to the one the speaker was
trained with (recorded in the checkpoint's ``finetune_info.json``); ``--greedy`` decodes deterministically.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402

import numpy as np  # noqa: E402

from finetuning.training.export import read_info  # noqa: E402


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_checkpoint(checkpoint: str | Path, device: str = "auto"):
    """The exported model through the stock API (``Qwen3TTSModel``) on ``device``."""
    import qwen_tts

    return qwen_tts.Qwen3TTSModel.from_pretrained(str(checkpoint), device_map=resolve_device(device))


def synthesize(
    model,
    speaker: str,
    text: str,
    language: str | None = None,
    greedy: bool = False,
    max_new_tokens: int | None = None,
    non_streaming: bool | None = None,
) -> tuple[np.ndarray, int]:
    """(waveform float32, sample_rate) for ``text`` in ``speaker``'s voice.

    ``language`` None means the speaker's training language from the checkpoint (``finetune_info.json``), "auto"
    where the model has no id for it. ``non_streaming`` None means the layout the checkpoint was trained with.
    Raises ValueError for a speaker the checkpoint does not have (listing the ones it has).
    """
    supported = model.get_supported_speakers() or []
    if speaker.lower() not in [s.lower() for s in supported]:
        raise ValueError(f"speaker {speaker!r} is not in this checkpoint; choose one of {sorted(supported)}")
    info = read_info(model.model.name_or_path)
    if language is None:
        language = info.get("speakers", {}).get(speaker, {}).get("language", "auto")
        if language.lower() not in model.model.config.talker_config.codec_language_id:
            language = "auto"
    if non_streaming is None:
        non_streaming = info.get("training_layout", "non_streaming") == "non_streaming"
    kwargs = {"do_sample": False, "subtalker_dosample": False} if greedy else {}
    if max_new_tokens is not None:
        kwargs["max_new_tokens"] = max_new_tokens
    wavs, sample_rate = model.generate_custom_voice(
        text=text, speaker=speaker, language=language, non_streaming_mode=non_streaming, **kwargs
    )
    return np.asarray(wavs[0], dtype=np.float32), sample_rate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="exported checkpoint folder (or Hub id)")
    parser.add_argument("--speaker", required=True, help="trained speaker name")
    parser.add_argument("--text", required=True, help="text to speak")
    parser.add_argument("--language", help="language name, or 'auto' (default: the speaker's training language)")
    parser.add_argument("--output", default="generated.wav", help="wav file to write (default: generated.wav)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    parser.add_argument("--max_new_tokens", type=int, help="cap on generated frames (12.5 per second)")
    args = parser.parse_args(argv)
    import soundfile as sf

    model = load_checkpoint(args.checkpoint, args.device)
    try:
        wav, sample_rate = synthesize(model, args.speaker, args.text, args.language, args.greedy, args.max_new_tokens)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    sf.write(args.output, wav, sample_rate)
    print(f"{args.output}: {wav.size / sample_rate:.2f} s at {sample_rate} Hz")
    return 0


if __name__ == "__main__":
    sys.exit(main())
