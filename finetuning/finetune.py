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

from finetuning.settings import SettingsError, add_settings_arguments, settings_from_args  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", help="run folder (default: OUTPUT_DIR)")
    parser.add_argument("--max_steps", type=int, help="stop after N optimizer steps (default: MAX_STEPS)")
    parser.add_argument("--preflight", action="store_true", help="size the run (no weights, no training) and exit")
    parser.add_argument("--gpu-memory-gb", type=float, help="preflight: GPU memory (default: the visible GPU's)")
    parser.add_argument("--num-gpus", type=int, default=1, help="preflight: processes sharing the run (default 1)")
    parser.add_argument("--zero-stage", type=int, default=0, choices=(0, 1, 2, 3), help="preflight: 3 = FSDP")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="preflight: recompute activations")
    parser.add_argument(
        "--offload-optimizer", action="store_true", help="preflight: DeepSpeed ZeRO-2 with the optimizer on the CPU"
    )
    add_settings_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = settings_from_args(args, {"OUTPUT_DIR": args.output_dir, "MAX_STEPS": args.max_steps})
    except (SettingsError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.preflight:
        return preflight(settings, args)
    # torch, accelerate and qwen_tts load only now: --help and settings errors answer at once.
    from finetuning.evaluation.in_training import SpeechEvaluation
    from finetuning.locks import FolderBusy
    from finetuning.resources import ModelUnavailable
    from finetuning.training.averaging import AveragingError
    from finetuning.training.checkpointing import ResumeError
    from finetuning.training.data import DataError
    from finetuning.training.engines import EngineError, exit_launched
    from finetuning.training.export import ExportError
    from finetuning.training.loop import TrainingError, train
    from finetuning.training.lora import LoraError
    from finetuning.training.presets import InitModelError
    from finetuning.training.replay import ReplayError

    speech_evaluation = None
    if settings.EVAL_GENERATE_STEPS:  # the evaluation stack (scorers, reports) loads only for a run that uses it
        from finetuning.evaluation.in_training import SpeechEvaluation

        speech_evaluation = SpeechEvaluation(settings)
    try:
        result = train(settings, on_export=speech_evaluation)
    except (
        DataError,
        TrainingError,
        EngineError,
        ResumeError,
        ExportError,
        LoraError,
        InitModelError,
        ReplayError,
        ModelUnavailable,
        SettingsError,
        FolderBusy,
        AveragingError,
    ) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if result.interrupted:
        print(f"stopped at step {result.optimizer_steps}; state saved, resume with --set RESUME_FROM=latest")
        code = 130
    else:
        code = 0
        if result.export_dir is not None:
            print(f"checkpoint: {result.export_dir} ({result.optimizer_steps} optimizer steps)")
    exit_launched(code)  # a process of `accelerate launch` ends here, without interpreter teardown
    return code


def preflight(settings, args: argparse.Namespace) -> int:
    """Print the memory estimate and the configurations that fit; 0 when the run as set fits (or no GPU is known),
    1 when it does not, 2 for a bad model."""
    from finetuning.training.preflight import run_preflight

    try:
        report = run_preflight(
            settings,
            args.gpu_memory_gb,
            args.num_gpus,
            args.zero_stage,
            args.gradient_checkpointing,
            args.offload_optimizer,
        )
    except FileNotFoundError as error:
        print(f"error: INIT_MODEL_PATH: {error}", file=sys.stderr)
        return 2
    print(report.text)
    return 1 if report.fits is False else 0


if __name__ == "__main__":
    sys.exit(main())
