"""Memory estimate vs measured peak of real training steps, and the preflight command."""

import pytest

from finetuning.finetune import main
from finetuning.published_models import MODEL_1_7B, model_config
from finetuning.training.memory_probe import measure_training_peak
from finetuning.training.sizing import TrainingPlan, estimate_memory, model_shape

TOLERANCE = 0.2  # the estimate is within 20 % of the measured peak


@pytest.mark.parametrize("precision", ["no", "bf16"])
@pytest.mark.parametrize("layout", ["equal", "wide_text"])
def test_estimate_is_within_tolerance_of_the_measured_peak(tiny_model_dirs, layout, precision):
    config = model_config(tiny_model_dirs[layout])
    measured = measure_training_peak(config, batch_size=2, frames=40, text_tokens=12, precision=precision)
    plan = TrainingPlan(precision=precision, positions=measured.positions, frames=measured.frames)
    estimate = estimate_memory(model_shape(config), plan)
    assert abs(estimate.total / measured.peak_bytes - 1) <= TOLERANCE, (estimate.parts(), measured)


def test_sharding_and_adapters_shrink_the_right_parts():
    shape = model_shape(model_config(MODEL_1_7B))
    plan = TrainingPlan(num_processes=4)
    ddp, zero2, zero3 = (estimate_memory(shape, TrainingPlan(num_processes=4, zero_stage=s)) for s in (0, 2, 3))
    assert zero2.optimizer == pytest.approx(ddp.optimizer / 4) and zero2.weights == ddp.weights
    assert zero3.weights < ddp.weights / 3 and zero3.gradients == zero2.gradients
    adapter = estimate_memory(shape, plan, trainable=1_000_000)
    assert adapter.optimizer == 8_000_000 and adapter.weights == ddp.weights
    checkpointed = estimate_memory(shape, TrainingPlan(gradient_checkpointing=True))
    assert checkpointed.activations < estimate_memory(shape, TrainingPlan()).activations / 4


def test_preflight_says_fits_or_what_to_change(capsys):
    common = ["--preflight", "--env-file", "/dev/null", "--set", f"INIT_MODEL_PATH={MODEL_1_7B}"]
    assert main([*common, "--gpu-memory-gb", "80"]) == 1
    out = capsys.readouterr().out
    assert "1,928,677,440 (published: 1,928,677,440)" in out and "does NOT fit" in out
    assert "--gradient-checkpointing" in out and "MAX_BATCH_TOKENS=" in out
    assert main([*common, "--gpu-memory-gb", "80", "--gradient-checkpointing"]) == 0
    assert ": fits" in capsys.readouterr().out
    assert main(["--preflight", "--env-file", "/dev/null", "--set", "INIT_MODEL_PATH=someone/unknown"]) == 2
    assert "INIT_MODEL_PATH" in capsys.readouterr().err


def test_preflight_counts_what_lora_trains(capsys):
    """FINETUNE_METHOD=lora: the trainable count is the adapters plus the fully trained copies (from the real 1.7B
    shapes), so gradients and AdamW states shrink and the run fits where the full fine-tune does not."""
    common = ["--preflight", "--env-file", "/dev/null", "--set", f"INIT_MODEL_PATH={MODEL_1_7B}", "--gpu-memory-gb"]
    assert main([*common, "80"]) == 1
    full = capsys.readouterr().out
    assert main([*common, "80", "--set", "FINETUNE_METHOD=lora"]) == 0
    lora = capsys.readouterr().out
    trainable = int(
        next(line for line in lora.splitlines() if line.startswith("trainable")).split()[1].replace(",", "")
    )
    assert 100_000_000 < trainable < 150_000_000 and "LoRA rank 16" in lora  # 6.6 % of 1.93 B with the defaults

    def optimizer_gib(text):
        return float(next(line for line in text.splitlines() if "optimizer states" in line).split()[-2])

    assert optimizer_gib(lora) < optimizer_gib(full) / 10


def _picks(text: str) -> list[dict]:
    """The rows of the preflight's table of configurations that fit."""
    rows = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) > 7 and fields[0].isdigit() and fields[6] == "GiB":
            names = ("rank", "method", "optimizer", "checkpointing", "offload", "peak")
            rows.append(dict(zip(names, fields[: len(names)], strict=True)))
    return rows


def _total_gib(text: str) -> float:
    return float(next(line for line in text.splitlines() if line.strip().startswith("total")).split()[-2])


def test_preflight_lists_the_configurations_that_fit_best_first(capsys):
    """1.7B at 16 GB: only gradient checkpointing with the optimizer offloaded fits (full fine-tune first, LoRA
    after); at 80 GB the 8-bit optimizer is what spares checkpointing. Each listed row, set as the run, is what
    the preflight then says fits, with the same peak."""
    common = ["--preflight", "--env-file", "/dev/null", "--set", f"INIT_MODEL_PATH={MODEL_1_7B}", "--gpu-memory-gb"]
    assert main([*common, "16"]) == 1
    small = _picks(capsys.readouterr().out)
    assert [r["rank"] for r in small] == [str(i) for i in range(1, len(small) + 1)] and len(small) >= 2
    assert (small[0]["method"], small[0]["optimizer"], small[0]["offload"]) == ("full", "adamw", "cpu")
    assert all(r["checkpointing"] == "on" and r["offload"] == "cpu" for r in small)
    assert all(float(r["peak"]) <= 0.9 * 16 for r in small)
    methods = [r["method"] for r in small]
    assert methods == sorted(methods)  # the chosen method (full) before the LoRA fallback
    assert main([*common, "16", "--gradient-checkpointing", "--offload-optimizer"]) == 0
    assert _total_gib(capsys.readouterr().out) == pytest.approx(float(small[0]["peak"]), abs=0.05)

    assert main([*common, "80"]) == 1  # AdamW without checkpointing does not fit
    large = _picks(capsys.readouterr().out)
    assert [(r["method"], r["optimizer"], r["checkpointing"], r["offload"]) for r in large[:2]] == [
        ("full", "adamw_8bit", "off", "no"),
        ("full", "adafactor", "off", "no"),
    ]
    assert main([*common, "80", "--set", "OPTIMIZER=adamw_8bit"]) == 0
    assert _total_gib(capsys.readouterr().out) == pytest.approx(float(large[0]["peak"]), abs=0.05)

    assert main([*common, "24", "--set", "FINETUNE_METHOD=lora"]) in (0, 1)
    assert {r["method"] for r in _picks(capsys.readouterr().out)} == {"lora"}  # a LoRA run stays LoRA
