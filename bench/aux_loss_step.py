"""Training-step cost of the auxiliary losses on the tiny model; prints JSON.

    uv run python bench/aux_loss_step.py

One step = TalkerStep forward + backward + AdamW step (``finetuning.training.optim``'s optimizer), on a batch of
four bundled-voice utterances (two per speaker) whose codes come from the tiny speech tokenizer. The step is
timed without auxiliary losses and with them at the default crop (AUX_CROP_FRAMES) for several cadences
(AUX_LOSS_EVERY_N_STEPS). The configurations take turns in blocks of whole cadence periods and each reports
the median block, so that load from other processes on a shared machine does not favour one of them.

The tiny random decoder outputs ~1e-9, so its activations are denormal floats, which CPUs process ~10x slower
than normal ones; denormals are flushed to zero so the timing reflects the arithmetic of a trained decoder.
On the tiny model the decoder (running at audio rate) costs far more than the 3.5 M-parameter talker; the ratio
measured here says nothing definite about the 0.6B/1.7B models on a GPU.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finetuning.settings import FIELDS, load_settings  # noqa: E402
from finetuning.tiny_model import build_tiny_model  # noqa: E402
from finetuning.training.losses import build_auxiliary_losses  # noqa: E402
from finetuning.training.optim import make_optimizer  # noqa: E402
from finetuning.training.speakers import freeze_speaker_encoder, speaker_embedding  # noqa: E402
from finetuning.training.step import TalkerStep, assistant_text  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
SPEAKERS = ("english_speaker", "swahili_speaker")
CLIPS_PER_SPEAKER = 2
WARMUP_STEPS = 3
CADENCES = (1, 2, 4, 8, 16)
BLOCK_STEPS = 16  # a whole number of periods of every cadence in CADENCES
ROUNDS = 5
TARGET_RATIO = 1.3


def bundled_batch(wrapper) -> tuple[dict, torch.Tensor]:
    """A collate-style batch of the first clips of each bundled speaker, and (S, D) speaker embeddings."""
    import soundfile as sf

    text_ids, codes, speakers, languages, paths = [], [], [], [], []
    for index, speaker in enumerate(SPEAKERS):
        rows = (REPO_ROOT / "voices" / speaker / "metadata.jsonl").read_text().splitlines()[:CLIPS_PER_SPEAKER]
        for row in map(json.loads, rows):
            paths.append(str(REPO_ROOT / "voices" / speaker / row["audio"]))
            text_ids.append(
                wrapper.processor.tokenizer(assistant_text(row["text"]), return_tensors="pt")["input_ids"][0]
            )
            speakers.append(index)
            languages.append(row["language"])
    encoded = wrapper.model.speech_tokenizer.encode(paths).audio_codes
    codes = [c.long().clone() for c in encoded]  # each (T, 16); clone: encode returns inference tensors
    references = [sf.read(REPO_ROOT / "voices" / f"{s}.wav", dtype="float32")[0] for s in SPEAKERS]
    embeds = torch.stack([speaker_embedding(wrapper.model, [clip]) for clip in references])
    batch = {"text_ids": text_ids, "codes": codes, "speaker": torch.tensor(speakers), "language": languages}
    return batch, embeds


def time_steps(step_module, optimizer, batch, steps: int) -> float:
    """Mean wall seconds of forward + backward + optimizer step over ``steps`` steps."""
    started = time.perf_counter()
    for _ in range(steps):
        loss, _ = step_module(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return (time.perf_counter() - started) / steps


def interleaved_medians(runs: dict, batch, rounds: int, block_steps: int = BLOCK_STEPS) -> dict:
    """{name: (step_module, optimizer)} -> {name: median over rounds of the mean step time of one block}.

    Configurations take turns block by block, so load from other processes on a shared machine hits all alike.
    """
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, (step_module, optimizer) in runs.items():
            times[name].append(time_steps(step_module, optimizer, batch, block_steps))
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    import qwen_tts

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model(Path(tmp) / "tiny", seed=0)
        wrapper = qwen_tts.Qwen3TTSModel.from_pretrained(str(model_dir), dtype=torch.float32)
        model = wrapper.model
        freeze_speaker_encoder(model)
        batch, speaker_embeds = bundled_batch(wrapper)

        def run_for(cadence: int | None):
            """(step module, AdamW) with auxiliary losses every ``cadence`` steps, or none for None."""
            overrides = {
                "VOICES_DIR": str(REPO_ROOT / "voices"),
                "DATASET_DIR": str(Path(tmp) / "dataset"),
                "INIT_MODEL_PATH": str(model_dir),
                "TOKENIZER_PATH": str(model_dir / "speech_tokenizer"),
                "DEVICE": "cpu",
                "USE_AUXILIARY_LOSSES": str(cadence is not None),
                "AUX_LOSS_EVERY_N_STEPS": str(cadence or default_cadence),
            }
            settings = load_settings(None, environ={}, overrides=overrides)
            aux = build_auxiliary_losses(settings, model, model_dir, torch.device("cpu"))
            step_module = TalkerStep(model, speaker_embeds, aux_losses=aux).train()
            optimizer = make_optimizer(model, settings)
            time_steps(step_module, optimizer, batch, WARMUP_STEPS)
            if aux is not None:
                aux.training_calls = 0  # blocks are whole cadence periods from here on
            return settings, aux, (step_module, optimizer)

        default_cadence = FIELDS["AUX_LOSS_EVERY_N_STEPS"].default
        settings, aux, off = run_for(None)
        runs = {"off": off}
        for cadence in CADENCES:
            settings, aux, runs[cadence] = run_for(cadence)
        medians = interleaved_medians(runs, batch, ROUNDS)
        off_s = medians.pop("off")
        aux_call_s = medians[1] - off_s  # extra seconds of a step that computes the auxiliary losses
        needed = max(1, math.ceil(aux_call_s / ((TARGET_RATIO - 1) * off_s)))
        if needed not in medians:  # check the prediction, against a fresh off measurement
            rerun = interleaved_medians({"off": off, needed: run_for(needed)[2]}, batch, ROUNDS, needed)
            medians[needed] = rerun[needed] * off_s / rerun["off"]

    frames = [int(c.shape[0]) for c in batch["codes"]]
    print(
        json.dumps(
            {
                "benchmark": "aux_loss_step",
                "device": "cpu",
                "torch_threads": torch.get_num_threads(),
                "batch_frames": frames,
                "crop_frames": min(settings.AUX_CROP_FRAMES, min(frames)),
                "aux_weights": aux.weights,
                "timing": f"median over {ROUNDS} interleaved rounds of {BLOCK_STEPS}-step blocks",
                "step_s_aux_off": round(off_s, 4),
                "step_s_aux_on_by_cadence": {str(k): round(v, 4) for k, v in sorted(medians.items())},
                "ratio_on_over_off_by_cadence": {str(k): round(v / off_s, 2) for k, v in sorted(medians.items())},
                "aux_extra_s_per_computed_step": round(aux_call_s, 4),
                "default_cadence": settings.AUX_LOSS_EVERY_N_STEPS,
                "default_cadence_ratio": round(medians[default_cadence] / off_s, 2),
                f"smallest_cadence_for_ratio_le_{TARGET_RATIO}": needed,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
