"""GPU acceptance check: does the package train the real model sizes on this GPU, how fast, and was the memory
preflight right? One command, a few minutes on one datacenter GPU; writes JSON and a Markdown table.

    uv run python bench/gpu_check.py [--out gpu_check] [--steps 25] [--max-batch-tokens 2048]
    uv run python bench/gpu_check.py --smoke      # the same code on the CPU at tiny widths (tests run it)

1. Environment: Python, torch and CUDA versions, the GPU's name and memory, which optional packages import
   (flash-attn, liger-kernel) and the installed bitsandbytes and deepspeed.
2. Training: the published 0.6B and 1.7B configs (``finetuning.published_models``), randomly initialised on the
   GPU (no download: the shapes are what matter), on one synthetic micro-batch of real shape (12 s utterances,
   MAX_BATCH_TOKENS padded positions), ``--steps`` optimizer steps per case through the package's own engine,
   step, optimizer and optimizer step (``engines.make_accelerator``/``prepare_engine``, ``TalkerStep``,
   ``make_optimizer``, ``optimizer_step``) in bf16: full fine-tune, LoRA, gradient checkpointing, OPTIMIZER
   adamw_8bit and adafactor, ATTN_IMPLEMENTATION=flash_attention_2 (skipped with its reason when flash-attn is
   missing) and TORCH_COMPILE. Per case: tokens/s and ``train/mfu`` over the steps after the first
   ``WARMUP_STEPS``, the peak allocated GPU memory against the preflight's estimate (``sizing.estimate_memory``)
   and its error in %. A case that fails (out of memory included) is recorded with its one-line error and the
   check goes on.
3. Pipeline: the tiny kit end to end on this device (prepare -> train with DataLoader workers and pinned memory
   -> export -> stock ``generate_custom_voice``), which exercises every ``.to(device)``, ``non_blocking`` and
   pinned-memory path.
4. Generation: stock ``generate_custom_voice`` of the random 1.7B (bf16, a speaker row added) for ``--frames``
   frames; real-time factor = generation seconds / seconds of audio generated. The speech-tokenizer decoder is the
   tiny kit's, so the figure is the talker and code predictor's.

Exit code 0 when every case ran or was skipped for a stated reason, 1 when one failed.

Status: written and run with ``--smoke`` on the CPU only; it has not run on a GPU yet, so its time budget (a few
minutes; TORCH_COMPILE's inductor compilation is the least known part) is not measured either. Its results go in
``finetuning/training/README_GPU.md`` with the GPU's name and the exact command once it has.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from finetuning.constants import FRAME_RATE_HZ, NUM_CODEBOOKS  # noqa: E402
from finetuning.published_models import MODEL_0_6B, MODEL_1_7B, model_config, published_config  # noqa: E402
from finetuning.settings import SettingsError, load_settings  # noqa: E402
from finetuning.training.sizing import GIB, TrainingPlan, estimate_memory, model_shape, trained_shapes  # noqa: E402

CASES = {  # case -> settings it changes from the defaults
    "full": {},
    "lora": {"FINETUNE_METHOD": "lora"},
    "checkpointing": {"GRADIENT_CHECKPOINTING": "true"},
    "adamw_8bit": {"OPTIMIZER": "adamw_8bit"},
    "adafactor": {"OPTIMIZER": "adafactor"},
    "flash_attention_2": {"ATTN_IMPLEMENTATION": "flash_attention_2"},
    "torch_compile": {"TORCH_COMPILE": "true"},
}
KERNEL_PACKAGES = ("flash_attn", "liger_kernel")  # imported: a wheel built for another torch or CUDA fails here
INSTALLED_PACKAGES = ("bitsandbytes", "deepspeed")  # versions only (importing deepspeed alone takes seconds)
UTTERANCE_FRAMES = 150  # 12 s of speech
UTTERANCE_TEXT_TOKENS = 40
LEARNING_RATE = 1e-4  # high enough that the loss of a random model visibly falls in a few steps
WARMUP_STEPS = 5  # not timed (allocator growth, kernel selection, compilation)
SMOKE = {"steps": 3, "warmup": 1, "max_batch_tokens": 256, "frames": 8, "utterance_frames": 40}
RTF_TEXT = "The quick brown fox jumps over the lazy dog."


def environment(device: torch.device) -> dict:
    """Versions, the device, whether each optional kernel package imports (its version, or why not), and the
    installed version of each optional engine or optimizer package."""
    from importlib.metadata import PackageNotFoundError, version

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    env["device"] = str(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / GIB, 1))
    for name in KERNEL_PACKAGES:
        try:
            env[name] = getattr(importlib.import_module(name), "__version__", "installed")
        except Exception as error:  # not installed, or built against another torch / CUDA
            env[name] = f"does not import ({type(error).__name__}: {str(error).splitlines()[0][:120]})"
    for name in INSTALLED_PACKAGES:
        try:
            env[name] = version(name)
        except PackageNotFoundError:
            env[name] = "not installed"
    return env


def synthetic_batch(config: dict, max_batch_tokens: int, frames: int, device: torch.device) -> dict:
    """As many utterances of ``frames`` frames and UTTERANCE_TEXT_TOKENS text tokens as fit MAX_BATCH_TOKENS
    talker positions (at least one), random text ids below the special ids and random codes, two speakers."""
    generator = torch.Generator().manual_seed(0)
    count = max(1, max_batch_tokens // (frames + UTTERANCE_TEXT_TOKENS))
    special = min(config[k] for k in ("im_start_token_id", "tts_pad_token_id"))
    return {
        "text_ids": [torch.randint(0, special, (UTTERANCE_TEXT_TOKENS,), generator=generator) for _ in range(count)],
        "codes": [torch.randint(0, 2048, (frames, NUM_CODEBOOKS), generator=generator) for _ in range(count)],
        "speaker": torch.arange(count) % 2,
        "language": ["english"] * count,
    }


def _set_attention(qwen_config, implementation: str) -> None:
    """ATTN_IMPLEMENTATION on the model config and its talker and code-predictor configs (what
    ``from_pretrained(attn_implementation=...)`` does for a folder)."""
    talker = qwen_config.talker_config
    for sub in (qwen_config, talker, talker.code_predictor_config):
        sub._attn_implementation = implementation


def train_case(name: str, config: dict, device: torch.device, args, workdir: Path) -> dict:
    """``args.steps`` optimizer steps of case ``name`` on a random model of ``config``: the figures of one row."""
    from accelerate.utils import send_to_device
    from qwen_tts.core.models.modeling_qwen3_tts import Qwen3TTSForConditionalGeneration

    from finetuning.published_models import qwen3_tts_config
    from finetuning.training import engines
    from finetuning.training.lora import apply_lora
    from finetuning.training.optim import check_optimizer, make_optimizer, make_scheduler, optimizer_step
    from finetuning.training.speed import ModelFlops, check_speed_options, compile_transformers, peak_flops
    from finetuning.training.step import TalkerStep

    overrides = {"OUTPUT_DIR": str(workdir / name), "DEVICE": device.type, "MIXED_PRECISION": "bf16"}
    overrides.update(LEARNING_RATE=LEARNING_RATE, WARMUP_STEPS=0, LR_SCHEDULE="constant", **CASES[name])
    settings = load_settings(None, environ={}, overrides=overrides)
    try:
        check_speed_options(settings, device)
        check_optimizer(settings, "NO")
    except SettingsError as error:
        return {"skipped": str(error)}
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        left_over = torch.cuda.memory_allocated(device)  # anything an earlier case left is not this case's
    forget_accelerator_state()
    accelerator = engines.make_accelerator(settings, [])
    qwen_config = qwen3_tts_config(config)
    _set_attention(qwen_config, settings.ATTN_IMPLEMENTATION)
    with torch.device(device):
        model = Qwen3TTSForConditionalGeneration(qwen_config)
    model.speaker_encoder.requires_grad_(False)
    apply_lora(model, settings)
    if settings.TORCH_COMPILE:
        compile_transformers(model, backend="eager" if args.smoke else "inductor")  # inductor needs a compiler
    if settings.GRADIENT_CHECKPOINTING:
        engines.enable_gradient_checkpointing(model)
    speakers = torch.randn(2, qwen_config.talker_config.hidden_size, device=device)
    step = TalkerStep(model, speakers)
    engines.detach_speaker_encoder(model)
    shapes = trained_shapes(model)
    optimizer = make_optimizer(model, settings)
    scheduler = make_scheduler(optimizer, settings, args.steps)
    step, optimizer = engines.prepare_engine(accelerator, step, optimizer)
    parameters = list(step.parameters())
    batch = send_to_device(synthetic_batch(config, args.max_batch_tokens, args.utterance_frames, device), device)
    losses, seconds = [], []
    for number in range(args.steps):
        start = time.perf_counter()
        with accelerator.autocast():
            loss, out = step(batch)
        accelerator.backward(loss)
        optimizer_step(accelerator, parameters, optimizer, scheduler, settings.MAX_GRAD_NORM, number + 1)
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())  # synchronises, so the time below is the step's
        seconds.append(time.perf_counter() - start)
    positions, frames = int(out.attention_mask.numel()), int(out.frame_codes.shape[0])
    timed = sum(seconds[args.warmup :])
    flops = ModelFlops(model).of(int(out.attention_mask.sum()), frames) * (args.steps - args.warmup)
    peak = peak_flops(device)
    plan = TrainingPlan(
        "bf16",
        gradient_checkpointing=settings.GRADIENT_CHECKPOINTING,
        positions=positions,
        frames=frames,
        optimizer=settings.OPTIMIZER,
    )
    estimate = estimate_memory(model_shape(config), plan, shapes=shapes).total
    measured = torch.cuda.max_memory_allocated(device) - left_over if device.type == "cuda" else None
    row = {
        "positions": positions,
        "tokens_per_s": round(int(out.attention_mask.sum()) * (args.steps - args.warmup) / timed, 1),
        "step_s": round(timed / (args.steps - args.warmup), 4),
        "mfu": round(flops / timed / peak, 4) if peak else None,
        "loss_first_last": [round(losses[0], 3), round(losses[-1], 3)],
        "peak_gib": round(measured / GIB, 2) if measured else None,
        "estimate_gib": round(estimate / GIB, 2),
        "estimate_error_pct": round(100 * (estimate - measured) / measured, 1) if measured else None,
    }
    release(accelerator)
    return row


def release(accelerator) -> None:
    """End a case's accelerator and forget its state (``forget_accelerator_state``)."""
    from finetuning.training import engines

    engines.finish(accelerator)
    forget_accelerator_state()


def forget_accelerator_state() -> None:
    """Each case (and a caller in the same process, such as the test suite) creates its accelerator with its own
    settings (mixed precision), which accelerate refuses while an earlier one's state lives in the process."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def pipeline(device: torch.device, workdir: Path, steps: int) -> dict:
    """The tiny kit end to end on ``device``: prepare, train (2 DataLoader workers; pinned memory on CUDA),
    export, stock generation of a trained speaker."""
    import qwen_tts

    from finetuning.preparation.prepare import prepare_dataset
    from finetuning.tiny_model import build_tiny_model
    from finetuning.training.loop import train

    start = time.perf_counter()
    model_dir = build_tiny_model(workdir / "tiny_model")
    settings = load_settings(
        None,
        environ={},
        overrides={
            "VOICES_DIR": str(REPO_ROOT / "voices"),
            "DATASET_DIR": str(workdir / "dataset"),
            "TOKENIZER_PATH": str(model_dir / "speech_tokenizer"),
            "INIT_MODEL_PATH": str(model_dir),
            "OUTPUT_DIR": str(workdir / "run"),
            "DEVICE": device.type,
            "MIXED_PRECISION": "bf16",
            "DATALOADER_WORKERS": 2,
            "MAX_STEPS": steps,
            "MAX_BATCH_TOKENS": 160,
            "VALIDATION_FRACTION": 0.0,
            "EVAL_STEPS": 0,
            "SAVE_STEPS": 0,
            "REPORT_TO": "none",
        },
    )
    prepare_dataset(settings, max_samples=4, report=lambda _: None)
    forget_accelerator_state()
    result = train(settings)
    forget_accelerator_state()
    wrapper = qwen_tts.Qwen3TTSModel.from_pretrained(
        str(result.export_dir), dtype=torch.float32, device_map=str(device)
    )
    wavs, sample_rate = wrapper.generate_custom_voice(
        text=RTF_TEXT, speaker="english_speaker", language="english", max_new_tokens=24
    )
    return {
        "optimizer_steps": result.optimizer_steps,
        "generated_s": round(len(wavs[0]) / sample_rate, 2),
        "seconds": round(time.perf_counter() - start, 1),
    }


def generation_rtf(config: dict, device: torch.device, workdir: Path, frames: int) -> dict:
    """Stock ``generate_custom_voice`` of a random model of ``config`` in bf16 (speaker row 3000 named
    "random_speaker"), text tokenizer and speech tokenizer from the tiny kit, ``frames`` frames at most."""
    import qwen_tts
    from qwen_tts.core.models.modeling_qwen3_tts import Qwen3TTSForConditionalGeneration

    from finetuning.published_models import qwen3_tts_config
    from finetuning.tiny_model import build_tiny_model

    kit_dir = build_tiny_model(workdir / "tiny_model")
    kit = qwen_tts.Qwen3TTSModel.from_pretrained(str(kit_dir), dtype=torch.float32, device_map=str(device))
    config = {**config, "tts_model_type": "custom_voice"}
    config["talker_config"] = {
        **config["talker_config"],
        "spk_id": {"random_speaker": 3000},
        "spk_is_dialect": {"random_speaker": False},
    }
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3TTSForConditionalGeneration(qwen3_tts_config(config)).to(torch.bfloat16).eval()
    model.load_speech_tokenizer(kit.model.speech_tokenizer)
    wrapper = qwen_tts.Qwen3TTSModel(model, kit.processor, kit.generate_defaults)
    options = {"speaker": "random_speaker", "language": "english", "max_new_tokens": frames}
    wrapper.generate_custom_voice(text=RTF_TEXT, **{**options, "max_new_tokens": 4})  # warm-up
    _synchronize(device)
    start = time.perf_counter()
    wavs, sample_rate = wrapper.generate_custom_voice(text=RTF_TEXT, **options)
    _synchronize(device)
    seconds = time.perf_counter() - start
    audio_s = len(wavs[0]) / sample_rate
    return {"frames": round(audio_s * FRAME_RATE_HZ), "seconds": round(seconds, 2), "rtf": round(seconds / audio_s, 3)}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def markdown(report: dict) -> str:
    """The report as Markdown: the environment line, one row per model and case, the pipeline and generation."""
    env = report["environment"]
    lines = [
        f"GPU check on {env.get('gpu', env['device'])} ({env.get('gpu_memory_gib', '-')} GiB), torch {env['torch']}, "
        f"CUDA {env['cuda']}; " + ", ".join(f"{name} {env[name]}" for name in KERNEL_PACKAGES + INSTALLED_PACKAGES),
        "",
        "| model | case | tokens/s | step (s) | MFU | peak (GiB) | estimate (GiB) | error | loss first → last |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in report["training"]:
        if "skipped" in row or "error" in row:
            note = f"skipped: {row['skipped']}" if "skipped" in row else f"**failed**: {row['error']}"
            lines.append(f"| {row['model']} | {row['case']} | {note} |||||||")
            continue
        first, last = row["loss_first_last"]
        lines.append(
            f"| {row['model']} | {row['case']} | {row['tokens_per_s']} | {row['step_s']} | {_or_dash(row['mfu'])} | "
            f"{_or_dash(row['peak_gib'])} | {row['estimate_gib']} | {_or_dash(row['estimate_error_pct'], '%')} | "
            f"{first} → {last} |"
        )
    for section in ("pipeline", "generation"):
        lines += ["", f"{section}: " + json.dumps(report[section])]
    return "\n".join(lines) + "\n"


def _or_dash(value, unit: str = "") -> str:
    return "-" if value is None else f"{value:+}{unit}" if unit else str(value)


def _attempt(run, *args) -> dict:
    """``run(*args)``, or its failure in one line (out of memory included): a check reports, it does not stop."""
    try:
        return run(*args)
    except Exception as error:  # any failure of a case is a finding to report
        return {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"}
    finally:
        torch._dynamo.reset()  # compiled graphs hold on to the model they traced
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("gpu_check"), help="folder for gpu_check.json / .md")
    parser.add_argument("--steps", type=int, default=25, help="optimizer steps per case")
    parser.add_argument("--max-batch-tokens", type=int, default=2048, help="padded talker positions per batch")
    parser.add_argument("--frames", type=int, default=125, help="frames generated for the real-time factor")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny widths, few steps: the code, not figures")
    args = parser.parse_args(argv)
    args.warmup, args.utterance_frames = min(WARMUP_STEPS, args.steps - 1), UTTERANCE_FRAMES
    if args.smoke:
        device = torch.device("cpu")
        for key, value in SMOKE.items():
            setattr(args, key, value)
    elif not torch.cuda.is_available():
        print("error: no CUDA GPU is visible; run with --smoke to check the code on the CPU", file=sys.stderr)
        return 2
    else:
        device = torch.device("cuda")
    report = {"command": " ".join(sys.argv), "environment": environment(device), "training": []}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        workdir = Path(tmp)
        if args.smoke:
            from finetuning.tiny_model import build_tiny_model

            models = {"tiny": model_config(build_tiny_model(workdir / "tiny_model"))}
        else:
            models = {"0.6B": published_config(MODEL_0_6B), "1.7B": published_config(MODEL_1_7B)}
        for label, config in models.items():
            for case in args.cases:
                row = _attempt(train_case, case, config, device, args, workdir)
                report["training"].append({"model": label, "case": case, **row})
                print(json.dumps(report["training"][-1]), flush=True)
        report["pipeline"] = _attempt(pipeline, device, workdir, 4 if args.smoke else 20)
        print(json.dumps({"pipeline": report["pipeline"]}), flush=True)
        rtf_config = models["tiny"] if args.smoke else models["1.7B"]
        report["generation"] = _attempt(generation_rtf, rtf_config, device, workdir, args.frames)
        print(json.dumps({"generation": report["generation"]}), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    table = markdown(report)
    (args.out / "gpu_check.md").write_text(table)
    print(table)
    failed = [r for r in report["training"] if "error" in r] + [
        report[s] for s in ("pipeline", "generation") if "error" in report[s]
    ]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
