"""``OUTPUT_DIR/best``: the export of the run's best evaluation, written whenever an evaluation improves.

No extra training state is kept for it: at an improvement the model being trained is exported there directly
(validation-loss selection), or the export just evaluated (``eval_checkpoint``, or the final export) is copied
there with its files hard-linked (speech-metric selection). Either way it is written to a staging folder and renamed
into place, so a crash leaves the previous best or the new one. Its ``finetune_info.json`` says which step and why
(``"selection"``: SELECT_BY, its direction, the step, its value and every evaluation's value so far).
"""

from __future__ import annotations

import logging
from pathlib import Path

from finetuning.settings import Settings
from finetuning.training.export import BEST_DIR, RunExports, copy_export
from finetuning.training.selection import LOSS, SCORE, Selection

logger = logging.getLogger(__name__)


class BestExport:
    """Feeds each evaluation to ``selection`` and keeps ``OUTPUT_DIR/best`` at its best step."""

    def __init__(self, selection: Selection, exports: RunExports, settings: Settings):
        self.selection = selection
        self.exports = exports
        self.settings = settings
        self.path = Path(settings.OUTPUT_DIR) / BEST_DIR

    @property
    def wants_losses(self) -> bool:
        return self.selection.by in (LOSS, SCORE)

    def evaluated(
        self,
        accelerator,
        step_module,
        step: int,
        losses: dict[str, float] | None = None,
        speech: dict[str, float] | None = None,
        checkpoint: Path | None = None,
    ) -> dict[str, float]:
        """Record the evaluation at ``step`` (``losses``: validation losses of the probe batches; ``speech``: the
        speech callback's scalars; each None when not measured here) if it is one SELECT_BY reads and ``step`` was
        not recorded yet; on improvement write ``best/`` from ``checkpoint`` (an export of this step) or, without
        one, from the model. Call on every process with the same arguments. Returns what to log with the evaluation:
        ``select/<SELECT_BY>`` and ``select/best_step`` ({} when nothing was recorded)."""
        selection = self.selection
        if not selection.active or (selection.needs_speech and speech is None):
            return {}
        if (selection.by == LOSS and losses is None) or any(s == step for s, _ in selection.history):
            return {}
        value = selection.value(losses, speech, self.settings.SUB_TALKER_LOSS_WEIGHT)
        improved = selection.update(step, value)
        record = {f"select/{selection.by}": value, "select/best_step": selection.best_step or 0}
        if not improved:
            return record
        info = {"selection": {**selection.info(), "reason": self.reason()}}
        if checkpoint is None:
            self.exports.export(accelerator, step_module, self.path, step, link_base_files=True, info=info)
        elif accelerator.is_main_process:
            copy_export(checkpoint, self.path, info)
        if accelerator.is_main_process:
            logger.info("best so far: step %d (%s = %.4g) exported to %s", step, selection.by, value, self.path)
        accelerator.wait_for_everyone()
        return record

    def reason(self) -> str:
        s = self.selection
        probe = f"the first {self.settings.EVAL_MAX_BATCHES or 'all'} validation batches"
        what = {
            LOSS: f"eval_loss (eval/codec0_loss + {self.settings.SUB_TALKER_LOSS_WEIGHT} x eval/sub_talker_loss on "
            f"{probe})",
            SCORE: f"score (finetuning.training.selection.SCORE_TERMS on the generated validation speech and {probe})",
        }.get(s.by, f"{s.by} (mean over speakers of the generated validation speech)")
        best = "lowest" if s.direction == "lower" else "highest"
        return f"{best} {what} of {len(s.history)} evaluations so far, at step {s.best_step}"
