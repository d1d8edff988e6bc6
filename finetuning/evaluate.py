"""Score generated speech per speaker: ``uv run python finetuning/evaluate.py --checkpoint DIR [--compare DIR]
[--output_dir DIR] [--speaker a,b] [--language row|auto] [--set KEY=VALUE ...]``.

The checkpoint speaks each speaker's held-out texts (seeded sampling, at most EVAL_MAX_SECONDS each); the clips
are scored for perplexity, speaker similarity, pronunciation, tone and prosody against the speaker's real audio
(see ``finetuning/evaluation/runner.py``). A checkpoint trained with instructions (or for voice design) speaks each
row with its own instruction; means are also reported per instruction, with the prosody difference from the same
row generated without it. ``--compare`` evaluates a second model on the same texts, seeds and scorers,
e.g. the Base model as a zero-shot clone, and reports both side by side with the difference. Writes
``evaluation.json``, ``evaluation.md`` and the generated clips to ``--output_dir`` (default OUTPUT_DIR/evaluation).
Exit codes: 0 done, 1 data or model error, 2 bad settings.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as a file: import the package, never this folder's modules as top-level names.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import logging  # noqa: E402

from finetuning.settings import SettingsError, add_settings_arguments, settings_from_args  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="model to evaluate: exported checkpoint folder (or Hub id)")
    parser.add_argument("--compare", help="second model on the same texts, e.g. the Base model (zero-shot clone)")
    parser.add_argument("--output_dir", help="where the report and clips go (default: OUTPUT_DIR/evaluation)")
    parser.add_argument("--speaker", help="speaker name(s), comma-separated (default: the checkpoint's speakers)")
    parser.add_argument(
        "--language",
        choices=("row", "auto"),
        default="row",
        help="row: generate each utterance in its own language (default); auto: as stock does without language=",
    )
    parser.add_argument(
        "--lora-scales",
        help="comma-separated scales in (0, 1], e.g. 0.3,0.5,1.0: the export merged at each, scored side by side",
    )
    add_settings_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = settings_from_args(args)
    except (SettingsError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    # torch and qwen_tts load only now: --help and settings errors answer at once.
    from finetuning.evaluation.report import write_report
    from finetuning.evaluation.runner import compare_checkpoints, default_output_dir, evaluate_checkpoint
    from finetuning.evaluation.speech import EvaluationError
    from finetuning.training.data import DataError

    speakers = [s.strip() for s in args.speaker.split(",") if s.strip()] if args.speaker else None
    language = "auto" if args.language == "auto" else None
    output_dir = Path(args.output_dir) if args.output_dir else default_output_dir(settings)
    if args.lora_scales:
        return lora_scales(args, settings, output_dir, speakers, language)
    try:
        if args.compare:
            report = compare_checkpoints(
                args.checkpoint, args.compare, settings, output_dir=output_dir, speakers=speakers, language=language
            )
            evaluated = report["candidate"]
        else:
            report = evaluate_checkpoint(
                args.checkpoint, settings, output_dir=output_dir, speakers=speakers, language=language
            )
            evaluated = report
    except (EvaluationError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    json_path, markdown_path, html_path = write_report(report, output_dir, settings)
    print(f"report: {json_path}")
    print(f"        {markdown_path}")
    print(f"        {html_path}  (listening report: open in a browser)")
    counts = {speaker: len(section["utterances"]) for speaker, section in evaluated["speakers"].items()}
    print("utterances scored: " + ", ".join(f"{speaker}={count}" for speaker, count in counts.items()))
    if not any(counts.values()):
        notes = "; ".join(section["note"] for section in evaluated["speakers"].values())
        print(f"error: nothing was evaluated: {notes}", file=sys.stderr)
        return 1
    return 0


def lora_scales(args, settings, output_dir: Path, speakers, language) -> int:
    """``--lora-scales``: every scale's report under ``output_dir/lora_scales/scale-<s>/`` and the summary."""
    from finetuning.evaluation.lora_scales import SUMMARY_MARKDOWN, evaluate_scales, parse_scales
    from finetuning.evaluation.speech import EvaluationError
    from finetuning.resources import ModelUnavailable
    from finetuning.training.data import DataError

    try:
        scales = parse_scales(args.lora_scales)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.compare or not (Path(args.checkpoint) / "model.safetensors").is_file():
        print("error: --lora-scales takes one exported checkpoint folder (no --compare)", file=sys.stderr)
        return 2
    folder = output_dir / "lora_scales"
    try:
        evaluate_scales(args.checkpoint, scales, settings, folder, speakers=speakers, language=language)
    except (EvaluationError, DataError, ModelUnavailable) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"report: {folder / SUMMARY_MARKDOWN}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
