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

    # torch and qwen_tts load only now: --help answers at once
    from finetuning.evaluation.speech import EvaluationError, load_checkpoint, require_text, synthesize
    from finetuning.resources import one_line

    try:
        require_text(args.text)
        if args.max_new_tokens is not None and args.max_new_tokens < 1:
            raise ValueError("--max_new_tokens must be >= 1")
        model = load_checkpoint(args.checkpoint, args.device)
        wav, sample_rate = synthesize(model, args.speaker, args.text, args.language, args.greedy, args.max_new_tokens)
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
