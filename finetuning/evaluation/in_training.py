"""Generated-speech evaluation during training, as the callback the command hands to ``training.loop.train``.

The loop exports the model every EVAL_GENERATE_STEPS optimizer steps (and at the end) and calls the callback on the
main process with the exported folder; the loop knows nothing about metrics. ``SpeechEvaluation`` speaks and scores
the checkpoint (``runner.evaluate_checkpoint``), writes the report under ``OUTPUT_DIR/evaluation/step-N`` and logs
the means and one clip per speaker to TensorBoard (scalars only to other trackers). Scorers and real-audio targets
load once, at the first evaluation.
"""

from __future__ import annotations

import logging
from pathlib import Path

from finetuning.evaluation.report import log_report, write_report
from finetuning.evaluation.runner import default_output_dir, evaluate_checkpoint
from finetuning.evaluation.scorers import Scorers, load_scorers
from finetuning.evaluation.targets import SpeakerTargets, load_targets
from finetuning.settings import Settings
from finetuning.training.tracking import tensorboard_tracker

logger = logging.getLogger(__name__)


class SpeechEvaluation:
    """``callback(checkpoint, step, accelerator)`` for ``train(..., on_export=...)``; main process only."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.scorers: Scorers | None = None
        self.targets: dict[str, SpeakerTargets] | None = None

    def __call__(self, checkpoint: Path, step: int, accelerator) -> dict[str, float]:
        settings = self.settings
        if self.scorers is None:
            self.scorers = load_scorers(settings)
            self.targets = load_targets(settings, list(settings.TRAIN_SPEAKERS), self.scorers)
        report = evaluate_checkpoint(checkpoint, settings, scorers=self.scorers, targets=self.targets, step=step)
        write_report(report, default_output_dir(settings, step), settings)
        tracker = tensorboard_tracker(accelerator)
        scalars = log_report(tracker if tracker is not None else accelerator, report, step)
        logger.info("speech evaluation at step %d: %s", step, {k: round(v, 4) for k, v in scalars.items()})
        return scalars
