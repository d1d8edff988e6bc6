"""Fine-tune on the prepared speakers: ``uv run accelerate launch finetuning/finetune.py [--set KEY=VALUE ...]``.

Settings come from ``.env`` (see ``.env.training.example``); flags override them for one run. The run writes
``OUTPUT_DIR/metrics.jsonl`` and exports a custom-voice checkpoint to EXPORT_DIR (default ``OUTPUT_DIR/model``)
that stock ``qwen_tts.Qwen3TTSModel.from_pretrained`` loads, every trained speaker selectable by name. With
EVAL_GENERATE_STEPS, generated speech is evaluated during training (``finetuning.evaluation.in_training``).
Exit codes: 0 done, 1 data or training error, 2 bad settings, 130 stopped by a signal (state saved).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as a file (accelerate launch does this): import the package, not this folder's modules.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import logging  # noqa: E402

from finetuning.evaluation.in_training import SpeechEvaluation  # noqa: E402
from finetuning.resources import ModelUnavailable  # noqa: E402
from finetuning.settings import SettingsError, add_settings_arguments, settings_from_args  # noqa: E402
from finetuning.training.checkpointing import ResumeError  # noqa: E402
from finetuning.training.data import DataError  # noqa: E402
from finetuning.training.export import ExportError  # noqa: E402
from finetuning.training.loop import TrainingError, train  # noqa: E402
from finetuning.training.lora import LoraError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", help="run folder (default: OUTPUT_DIR)")
    parser.add_argument("--max_steps", type=int, help="stop after N optimizer steps (default: MAX_STEPS)")
    add_settings_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = settings_from_args(args, {"OUTPUT_DIR": args.output_dir, "MAX_STEPS": args.max_steps})
    except (SettingsError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    speech_evaluation = SpeechEvaluation(settings) if settings.EVAL_GENERATE_STEPS else None
    try:
        result = train(settings, on_export=speech_evaluation)
    except (DataError, TrainingError, ResumeError, ExportError, LoraError, ModelUnavailable) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if result.interrupted:
        print(f"stopped at step {result.optimizer_steps}; state saved, resume with --set RESUME_FROM=latest")
        return 130
    if result.export_dir is not None:
        print(f"checkpoint: {result.export_dir} ({result.optimizer_steps} optimizer steps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
