"""In-training evaluation without training knowing what is measured: exports handed to the caller's callback.

The command builds the callback (``finetuning.evaluation.in_training.SpeechEvaluation``) and passes it to
``train(settings, on_export=...)``. Every EVAL_GENERATE_STEPS optimizer steps the model is exported to
``OUTPUT_DIR/eval_checkpoint`` (replaced each time, base files hard-linked) and, after training, the final export
is used; the callback then gets ``(checkpoint_dir, step, accelerator)`` on the main process only and may return
``{"eval/<speaker>/<metric>": value}`` scalars, which every process gets back (what SELECT_BY may select by). A
failing export or callback is logged (no scalars) and the training run goes on; every process waits for the main
one afterwards.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from finetuning.training.export import RunExports

logger = logging.getLogger(__name__)

EVAL_CHECKPOINT_DIR = "eval_checkpoint"
# (checkpoint folder, optimizer step, accelerator) -> scalars or None
ExportCallback = Callable[[Path, int, Any], "dict[str, float] | None"]


class ExportHook:
    """Calls ``callback`` with an export every EVAL_GENERATE_STEPS steps (``due``) and with the final export."""

    def __init__(self, callback: ExportCallback | None, exports: RunExports):
        self.every = exports.settings.EVAL_GENERATE_STEPS
        self.callback = callback if self.every else None
        if callback is None and self.every:
            logger.warning("EVAL_GENERATE_STEPS is set but train() got no on_export callback: nothing is evaluated")
        self.exports = exports

    @property
    def active(self) -> bool:
        return self.callback is not None

    def due(self, step: int, total_steps: int) -> bool:
        """At every EVAL_GENERATE_STEPS-th step before the last one (the final export covers the last)."""
        return self.active and step % self.every == 0 and step != total_steps

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.exports.settings.OUTPUT_DIR) / EVAL_CHECKPOINT_DIR

    def export_and_call(self, accelerator, step_module, step: int) -> dict[str, float]:
        """At a due step, on every process: export to ``OUTPUT_DIR/eval_checkpoint``, then call back; the
        callback's scalars."""
        try:
            checkpoint = self.exports.export(accelerator, step_module, self.checkpoint_dir, step, link_base_files=True)
        except Exception as error:  # noqa: BLE001  (reported, never the end of a training run)
            logger.error("export for evaluation at step %d failed: %s", step, error, exc_info=True)
            checkpoint = None
        return self.call(accelerator, checkpoint, step)

    def call(self, accelerator, checkpoint: Path | None, step: int) -> dict[str, float]:
        """On every process: the main one calls back with ``checkpoint`` (the final export after training); every
        process gets the callback's scalars ({} when it returned none or failed)."""
        scalars: dict[str, float] = {}
        if accelerator.is_main_process and checkpoint is not None:
            try:
                scalars = dict(self.callback(checkpoint, step, accelerator) or {})
            except Exception as error:  # noqa: BLE001  (reported, never the end of a training run)
                logger.error("evaluation of the export at step %d failed: %s", step, error, exc_info=True)
        if accelerator.num_processes > 1:  # every process decides on the same values (selection, early stopping)
            from accelerate.utils import broadcast_object_list

            scalars = broadcast_object_list([scalars])[0]
        accelerator.wait_for_everyone()
        return scalars
