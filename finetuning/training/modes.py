"""Training modes: what a TRAINING_MODE conditions on, what it exports and which stock call answers it.

A mode is chosen once (``training_mode``) and asked everywhere else: the batch builder asks whether the prefix has
a speaker slot, the loop whether samples are conditioned on reference clips and which speaker table the step holds,
the export which ``tts_model_type`` it writes, whether it keeps the speaker encoder and what ``finetune_info.json``
says the export answers to (``trained_calls``).

=============  ============  ==========  ===================  ================  =======================
mode           speaker slot  references  export type          speaker encoder   stock call
=============  ============  ==========  ===================  ================  =======================
custom_voice   row per name  no          ``custom_voice``     dropped           generate_custom_voice
voice_clone    x-vector      yes         ``base``             kept              generate_voice_clone
voice_design   none          no          ``voice_design``     dropped           generate_voice_design
=============  ============  ==========  ===================  ================  =======================

Every mode may carry an instruction per clip (the dataset's ``instruct``): stock places it before the role tokens
(``training.layout``). Voice design needs one on every clip (the voice description).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TrainingMode:
    """One TRAINING_MODE's conditioning, export and stock call.

    name            the TRAINING_MODE value
    speaker_slot    the prefix holds a speaker embedding (custom voice: the speaker's row; cloning: an x-vector)
    speaker_rows    speakers get codec-embedding rows of their own (written into the export)
    references      each sample is conditioned on another clip of its speaker (``training.clone``)
    export_type     the exported config's ``tts_model_type``
    keeps_encoder   the export keeps the frozen speaker encoder (stock builds one only for ``base`` models)
    method          the stock ``Qwen3TTSModel`` method an export answers to
    needs_instruct  every clip must carry an instruction (a voice description)
    drops_instruct_for_size  the stock call drops ``instruct=`` for a ``tts_model_size`` it tests this way
                    (``generate_custom_voice``: ``size in "0b6"``, stock's own substring test)
    """

    name: str
    speaker_slot: bool
    speaker_rows: bool
    references: bool
    export_type: str
    keeps_encoder: bool
    method: str
    needs_instruct: bool = False
    drops_instruct_for_size: bool = False

    def instruction_problem(self, instructions: tuple[bool, ...], model_size: str) -> str | None:
        """Why training data with ``instructions`` (whether clips carry one: the distinct values) cannot train
        this mode on a model of ``model_size`` (its config's ``tts_model_size``); None when it can."""
        if self.needs_instruct and False in instructions:
            return (
                f"TRAINING_MODE={self.name} needs an instruct (voice description) on every training clip, and some "
                'have none: add them in the source or the manifest ("instruct" / "instructions")'
            )
        if self.drops_instruct_for_size and True in instructions and str(model_size) in "0b6":
            return (
                f"the training data has instructions, but stock {self.method} drops instruct= for this model "
                f"(tts_model_size {model_size!r}, a 0.6B model): use a 1.7B model or data without instructions"
            )
        return None

    def trained_calls(self, conditioning_calls: dict[str, list], instructions: list[bool], clone_icl_fraction: float):
        """``finetune_info.json``'s "trained_calls": the stock method, the conditioning draws' ``non_streaming_mode``
        and ``language`` values, ``instruct`` ([False] without instruction data, [True] when every clip has one,
        both when some do) and, voice cloning, ``x_vector_only_mode`` values."""
        calls = {"method": self.method, **conditioning_calls, "instruct": sorted(set(instructions)) or [False]}
        if self.references:
            fraction = clone_icl_fraction
            calls["x_vector_only_mode"] = [True] if fraction == 0 else [False] if fraction == 1 else [False, True]
        return calls


MODES = {
    mode.name: mode
    for mode in (
        TrainingMode("custom_voice", True, True, False, "custom_voice", False, "generate_custom_voice", False, True),
        TrainingMode("voice_clone", True, False, True, "base", True, "generate_voice_clone"),
        TrainingMode("voice_design", False, False, False, "voice_design", False, "generate_voice_design", True),
    )
}


def training_mode(settings) -> TrainingMode:
    """The mode TRAINING_MODE names (validated by the settings' choices)."""
    return MODES[settings.TRAINING_MODE]
