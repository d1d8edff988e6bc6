"""Speak with an exported checkpoint: ``uv run python finetuning/generate.py --checkpoint DIR --speaker NAME
--text "..." [--instruct "Speak angrily."] [--language L] [--output out.wav]``, clone a voice with a voice-clone
(base) checkpoint: ``--checkpoint DIR --ref_audio F.wav [--ref_text "its transcript"] --text "..."``, or design
one with a voice-design checkpoint: ``--checkpoint DIR --instruct "A deep, calm voice." --text "..."``.

Uses stock ``qwen_tts.Qwen3TTSModel.generate_custom_voice`` (``--speaker``, with ``--instruct`` when the checkpoint
was trained with instructions), ``generate_voice_clone`` (``--ref_audio``: ICL mode with ``--ref_text``, x-vector
mode without) or ``generate_voice_design`` (``--instruct`` alone). The language defaults to the one the
speaker (or the voice-clone run) was trained with (recorded in the checkpoint's ``finetune_info.json``);
``--greedy`` decodes deterministically.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="exported checkpoint folder (or Hub id)")
    voice = parser.add_mutually_exclusive_group()
    voice.add_argument("--speaker", help="trained speaker name (custom-voice checkpoint)")
    voice.add_argument("--ref_audio", help="reference clip to clone (voice-clone or Base checkpoint)")
    parser.add_argument("--ref_text", help="transcript of --ref_audio (ICL cloning); without it: x-vector only")
    parser.add_argument("--text", required=True, help="text to speak")
    parser.add_argument(
        "--instruct", help="style instruction (custom voice trained with instructions) or voice description (design)"
    )
    parser.add_argument("--language", help="language name, or 'auto' (default: the speaker's training language)")
    parser.add_argument("--output", default="generated.wav", help="wav file to write (default: generated.wav)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    parser.add_argument("--max_new_tokens", type=int, help="cap on generated frames (12.5 per second)")
    args = parser.parse_args(argv)
    import soundfile as sf

    # torch and qwen_tts load only now: --help answers at once
    from finetuning.evaluation.speech import (
        EvaluationError,
        clone,
        design,
        load_checkpoint,
        require_text,
        synthesize,
    )
    from finetuning.resources import one_line

    try:
        require_text(args.text)
        if args.max_new_tokens is not None and args.max_new_tokens < 1:
            raise ValueError("--max_new_tokens must be >= 1")
        if args.ref_text is not None and args.ref_audio is None:
            raise ValueError("--ref_text goes with --ref_audio (the clip it transcribes)")
        if args.speaker is None and args.ref_audio is None and args.instruct is None:
            raise ValueError("give --speaker NAME, --ref_audio F.wav, or --instruct for a voice-design checkpoint")
        if args.ref_audio is not None and args.instruct is not None:
            raise ValueError("--instruct does not go with --ref_audio: stock voice cloning takes no instruction")
        model = load_checkpoint(args.checkpoint, args.device)
        if args.ref_audio is not None:
            wav, sample_rate = clone(
                model, args.ref_audio, args.ref_text, args.text, args.language, args.greedy, args.max_new_tokens
            )
        elif args.speaker is None:
            wav, sample_rate = design(model, args.instruct, args.text, args.language, args.greedy, args.max_new_tokens)
        else:
            wav, sample_rate = synthesize(
                model, args.speaker, args.text, args.language, args.greedy, args.max_new_tokens, instruct=args.instruct
            )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except EvaluationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    try:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        sf.write(args.output, wav, sample_rate)
    except (OSError, sf.LibsndfileError) as error:
        print(f"error: cannot write --output {args.output}: {one_line(error)}", file=sys.stderr)
        return 1
    print(f"{args.output}: {wav.size / sample_rate:.2f} s at {sample_rate} Hz")
    return 0


if __name__ == "__main__":
    sys.exit(main())
