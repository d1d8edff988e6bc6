"""Which evaluation's weights a run hands back: one selection value per evaluation, the best so far, patience.

Every evaluation of a run scores the same fixed probe set: the first EVAL_MAX_BATCHES validation batches in their
fixed seeded order (``validation``) and, with generated-speech evaluation, the same validation texts, seeds and
references every time (``finetuning.evaluation``, handed in as a callback). SELECT_BY names what decides:

| SELECT_BY            | value of one evaluation                                                   | better |
|----------------------|---------------------------------------------------------------------------|--------|
| eval_loss            | eval/codec0_loss + SUB_TALKER_LOSS_WEIGHT × eval/sub_talker_loss (probe)   | lower  |
| speaker_similarity   | mean over speakers of generated speech's similarity to the speaker        | higher |
| wer / cer            | mean over speakers of the recogniser's word / character error rate        | lower  |
| naturalness          | mean over speakers of the MOS predictor's score (1-5)                     | higher |
| eos_failure_rate     | share of generations that ran away or stopped far from the expected end   | lower  |
| score                | ``SCORE_TERMS`` summed (each where its scorer ran)                        | higher |
| none                 | nothing is selected; no ``best/`` export                                  |        |

The loop evaluates at every EVAL_STEPS step (SELECT_BY=eval_loss) or every EVAL_GENERATE_STEPS step (the speech
metrics and ``score``), and at the last step. ``Selection`` keeps every evaluation's value, the best one and how
many evaluations came since; it is saved with every training state (``state_dict``), so a resumed run keeps its
history. An improvement is a value better than the best by more than EARLY_STOPPING_MIN_DELTA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from finetuning.settings import Settings

LOSS = "eval_loss"
SCORE = "score"
NONE = "none"
DIRECTIONS = {  # SELECT_BY -> "lower" or "higher" is better
    LOSS: "lower",
    "speaker_similarity": "higher",
    "wer": "lower",
    "cer": "lower",
    "naturalness": "higher",
    "eos_failure_rate": "lower",
    SCORE: "higher",
}
SPEECH_METRICS = ("speaker_similarity", "wer", "cer", "naturalness", "eos_failure_rate")
# score = Σ weight × term, each term a speech metric's mean over speakers (or eval_loss), left out where its scorer
# did not run. Similarity, error rates and failure rates share a 0-1 scale; naturalness spans 4 MOS points; the
# loss (nats per token) only breaks ties between checkpoints that speak alike.
SCORE_TERMS = {
    "speaker_similarity": 1.0,
    "cer": -1.0,  # character error rate, capped at 1 (wer where no cer is reported)
    "naturalness": 0.25,
    "eos_failure_rate": -1.0,
    LOSS: -0.1,
}
ERROR_RATE_CAP = 1.0


def probe_loss(losses: dict[str, float], sub_talker_loss_weight: float) -> float:
    """The eval_loss of validation losses (``validation.validation_losses``' ``eval/`` keys)."""
    return losses["eval/codec0_loss"] + sub_talker_loss_weight * losses["eval/sub_talker_loss"]


def speaker_means(scalars: dict[str, float]) -> dict[str, float]:
    """{metric: mean over speakers} of ``eval/<speaker>/<metric>`` scalars (NaN values left out)."""
    values: dict[str, list[float]] = {}
    for key, value in scalars.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == "eval" and value is not None and math.isfinite(value):
            values.setdefault(parts[2], []).append(float(value))
    return {metric: sum(v) / len(v) for metric, v in values.items()}


def score(means: dict[str, float], loss: float | None) -> float:
    """``SCORE_TERMS`` of the speech metric means (``speaker_means``) and ``loss`` (None: left out)."""
    terms = dict(means)
    if "cer" not in terms and "wer" in terms:
        terms["cer"] = terms["wer"]
    if "cer" in terms:
        terms["cer"] = min(terms["cer"], ERROR_RATE_CAP)
    if loss is not None:
        terms[LOSS] = loss
    used = [name for name in SCORE_TERMS if name in terms]
    if not used:
        return float("nan")
    return sum(SCORE_TERMS[name] * terms[name] for name in used)


@dataclass
class Selection:
    """Selection values by step (``history``), the best evaluation and the evaluations since it.

    ``by`` is a SELECT_BY value; ``min_delta`` the margin an improvement must clear; ``patience`` the evaluations
    without improvement after which ``should_stop`` is true (0 = never).
    """

    by: str = LOSS
    min_delta: float = 0.0
    patience: int = 0
    history: list[tuple[int, float]] = field(default_factory=list)
    best_step: int | None = None
    best_value: float | None = None
    since_best: int = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> Selection:
        return cls(settings.SELECT_BY, settings.EARLY_STOPPING_MIN_DELTA, settings.EARLY_STOPPING_PATIENCE)

    @property
    def active(self) -> bool:
        return self.by != NONE

    @property
    def needs_speech(self) -> bool:
        return self.by in SPEECH_METRICS or self.by == SCORE

    @property
    def direction(self) -> str:
        return DIRECTIONS.get(self.by, "")

    def value(self, losses: dict[str, float] | None, speech: dict[str, float] | None, weight: float) -> float:
        """This evaluation's value from its validation ``losses`` (may be None) and speech scalars
        (``eval/<speaker>/<metric>``; None without speech evaluation); NaN where what SELECT_BY names is missing."""
        loss = probe_loss(losses, weight) if losses and "eval/codec0_loss" in losses else None
        if self.by == LOSS:
            return float("nan") if loss is None else loss
        means = speaker_means(speech or {})
        if self.by == SCORE:
            return score(means, loss)
        return means.get(self.by, float("nan"))

    def update(self, step: int, value: float) -> bool:
        """Record ``step``'s value; True when it is the new best (the first finite value always is). A NaN value
        (a metric that could not be computed) is recorded and counts as no improvement."""
        if any(s == step for s, _ in self.history):  # the last step evaluated twice (periodic and final)
            return False
        self.history.append((step, value))
        if math.isfinite(value) and (self.best_value is None or self._better(value, self.best_value)):
            self.best_step, self.best_value, self.since_best = step, value, 0
            return True
        self.since_best += 1
        return False

    def _better(self, value: float, best: float) -> bool:
        if self.direction == "lower":
            return value < best - self.min_delta
        return value > best + self.min_delta

    def should_stop(self) -> bool:
        """EARLY_STOPPING_PATIENCE evaluations in a row brought no improvement."""
        return self.patience > 0 and self.best_step is not None and self.since_best >= self.patience

    def stop_reason(self) -> str:
        return f"{self.since_best} evaluations without improvement of {self.by} since step {self.best_step}"

    def info(self) -> dict:
        """What ``finetune_info.json`` of the ``best/`` export records: which step and why."""
        return {
            "select_by": self.by,
            "better": self.direction,
            "step": self.best_step,
            "value": self.best_value,
            "evaluations": len(self.history),
            "history": [[s, v] for s, v in self.history],
        }

    def state_dict(self) -> dict:
        return {
            "by": self.by,
            "history": [[s, v] for s, v in self.history],
            "best_step": self.best_step,
            "best_value": self.best_value,
            "since_best": self.since_best,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("by", self.by) != self.by:
            raise ValueError(f"the saved state selected by {state['by']!r}, this run by SELECT_BY={self.by!r}")
        self.history = [(int(s), float(v)) for s, v in state["history"]]
        self.best_step, self.best_value = state["best_step"], state["best_value"]
        self.since_best = int(state["since_best"])
