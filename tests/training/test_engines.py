"""Every accelerate engine runs for real on CPU processes and ends with a checkpoint stock ``qwen_tts`` loads.

DeepSpeed runs with its CPU accelerator (``DS_ACCELERATOR=cpu``) over gloo in two processes, ZeRO-2 with duration
batching and ZeRO-3 with fixed batches, and so does FSDP2, all in bf16 (DDP, in bf16 autocast, runs in
``test_resume``). The engine guards (float32 buffers after a half-precision cast, frozen modules outside the engine,
DeepSpeed's ``auto`` values, ZeRO-3's batch rule) and gradient checkpointing (same gradients, fewer saved
activations) are checked in-process on the tiny model.
"""

import json
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import (
    REPO_ROOT,
    assert_stock_loadable_export,
    free_port,
    make_settings,
    prepare_small_dataset,
    subprocess_env,
    write_env_file,
)

from finetuning.training import engines

FINETUNE = str(REPO_ROOT / "finetuning" / "finetune.py")
CONFIGS = REPO_ROOT / "finetuning" / "accelerate_configs"
SPEAKERS = ("english_speaker", "swahili_speaker")


@pytest.fixture(scope="module")
def prepared(tiny_model_dir, tmp_path_factory):
    return prepare_small_dataset(tmp_path_factory, "engines", tiny_model_dir), tiny_model_dir


def _env_file(root, model_dir, name, **extra):
    values = {
        "MAX_STEPS": 4,
        "SAVE_STEPS": 0,
        "GRADIENT_ACCUMULATION_STEPS": 1,
        "LEARNING_RATE": 2e-3,
        "WARMUP_STEPS": 0,
        "LR_SCHEDULE": "constant",
        "EVAL_STEPS": 0,
        "LOGGING_STEPS": 1,
        "DATALOADER_WORKERS": 0,
        "VALIDATION_FRACTION": 0.0,
        "REPORT_TO": "none",
        **extra,
    }
    return write_env_file(root, model_dir, name, values)


def _run(command, env_extra=None):
    env = {**subprocess_env(), **(env_extra or {})}
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def assert_trained_and_stock_loadable(run_dir, base_dir):
    """The run's training loss fell, and its export is stock-loadable with the trained weights."""
    losses = [r["train/loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]
    assert losses[-1] < losses[0], losses
    assert_stock_loadable_export(run_dir / "model", base_dir, SPEAKERS)


def _launch(config, env_file, num_processes=2):
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(CONFIGS / f"{config}.yaml"),
        "--num_processes",
        str(num_processes),
        "--main_process_port",
        str(free_port()),
        FINETUNE,
        "--env-file",
        str(env_file),
    ]


@pytest.mark.slow
@pytest.mark.parametrize(
    "config, extra",
    [
        ("deepspeed_zero2", {"MIXED_PRECISION": "bf16", "MAX_BATCH_TOKENS": 160}),
        ("deepspeed_zero3", {"MIXED_PRECISION": "bf16", "MAX_BATCH_TOKENS": 0, "BATCH_SIZE": 2}),
        (  # the optimizer and its float32 partitions on the CPU, stepped by OPTIMIZER (here the 8-bit one)
            "deepspeed_zero2_offload",
            {"MIXED_PRECISION": "bf16", "MAX_BATCH_TOKENS": 160, "OPTIMIZER": "adamw_8bit"},
        ),
    ],
)
def test_deepspeed_trains_in_two_cpu_processes_and_exports(prepared, config, extra):
    pytest.importorskip("deepspeed")
    root, model_dir = prepared
    env_file = _env_file(root, model_dir, config, **extra)
    command = _launch(config, env_file)
    _run(command, {"DS_ACCELERATOR": "cpu"})
    assert_trained_and_stock_loadable(root / config, model_dir)


def test_zero3_refuses_batches_of_different_sizes():
    no_deepspeed = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=None))
    engines.check_zero3_batches(no_deepspeed, [1, 3, 2])  # other engines take batches of any size
    plugin = SimpleNamespace(deepspeed_config={"zero_optimization": {"stage": engines.ZERO_PARTITIONED_PARAMETERS}})
    zero3 = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin))
    engines.check_zero3_batches(zero3, [2, 2, 2])
    with pytest.raises(engines.EngineError, match="MAX_BATCH_TOKENS=0 and a BATCH_SIZE that divides .* \\(6\\)"):
        engines.check_zero3_batches(zero3, [1, 3, 2])


@pytest.mark.slow
def test_fsdp2_trains_in_two_cpu_processes_and_exports(prepared):
    """FSDP2 with cpu_ram_efficient_loading: only the main process reads real weights, yet every process trains
    with the same speaker embeddings and the export gathers the full weights."""
    root, model_dir = prepared
    env_file = _env_file(root, model_dir, "fsdp", MIXED_PRECISION="bf16", MAX_BATCH_TOKENS=160)
    proc = _run(_launch("fsdp", env_file))
    assert "engine FSDP on cpu" in proc.stderr
    checksums = re.findall(r"process (\d): speaker embeddings \(2, \d+\), checksum ([\d.]+)", proc.stderr)
    assert sorted(rank for rank, _ in checksums) == ["0", "1"]
    assert len({value for _, value in checksums}) == 1  # the main process's embeddings, sent to the other
    assert_trained_and_stock_loadable(root / "fsdp", model_dir)


@pytest.fixture(scope="module")
def step_parts(tiny_model_dir):
    """(model, tokenizer, a batch of two utterances with random codes) on the tiny model, in training mode."""
    import qwen_tts

    from finetuning.training.step import assistant_text

    wrapper = qwen_tts.Qwen3TTSModel.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    tokenizer = wrapper.processor.tokenizer
    gen = torch.Generator().manual_seed(0)
    texts = ["The coffee is too hot.", "Habari ya asubuhi."]
    batch = {
        "text_ids": [tokenizer(assistant_text(t), return_tensors="pt")["input_ids"][0] for t in texts],
        "codes": [torch.randint(0, 2048, (n, 16), generator=gen) for n in (24, 17)],
        "speaker": torch.tensor([0, 1]),
        "language": ["english", None],
    }
    return wrapper.model, batch


def test_half_precision_cast_leaves_float32_buffers_restored(tiny_model_dir):
    import qwen_tts

    from finetuning.training.step import TalkerStep

    model = qwen_tts.Qwen3TTSModel.from_pretrained(str(tiny_model_dir), dtype=torch.float32).model  # cast below
    step = TalkerStep(model, torch.randn(2, model.config.talker_config.hidden_size))
    saved = engines.float_buffers(step)
    step.bfloat16()  # what a half-precision engine (older DeepSpeed, FSDP1 buffer_dtype) does to buffers
    restored = engines.restore_buffers(step, saved)
    assert "speaker_embeds" in restored and any(name.endswith("rotary_emb.inv_freq") for name in restored)
    for name, buf in step.named_buffers():
        if name in saved:
            assert buf.dtype == torch.float32 and torch.equal(buf, saved[name]), name
    assert next(step.parameters()).dtype == torch.bfloat16  # parameters are the engine's business


def test_frozen_modules_stay_outside_the_engine(step_parts, tiny_model_dir, tmp_path):
    from finetuning.training.losses import build_auxiliary_losses
    from finetuning.training.step import TalkerStep

    model, _ = step_parts
    settings = make_settings(tmp_path, tiny_model_dir, USE_AUXILIARY_LOSSES=True)
    aux = build_auxiliary_losses(settings, model, tiny_model_dir, torch.device("cpu"))
    encoder = engines.detach_speaker_encoder(model)
    try:
        step = TalkerStep(model, torch.zeros(2, model.config.talker_config.hidden_size), aux_losses=aux)
        names = [name for name, _ in step.named_parameters()] + [name for name, _ in step.named_buffers()]
        assert not any("speaker_encoder" in n or n.startswith("aux_losses") for n in names)
        assert aux.losses["voice_consistency"].speaker_encoder is encoder  # the voice loss keeps its encoder
        assert step.eval().aux_losses.training is False and step.train().aux_losses.training is True
    finally:
        model.speaker_encoder = encoder


def test_deepspeed_auto_values_are_filled_and_explicit_ones_kept(tiny_model_dir, tmp_path):
    settings = make_settings(tmp_path, tiny_model_dir, MAX_GRAD_NORM=0.5)
    config = engines.fill_deepspeed_config(
        {"train_micro_batch_size_per_gpu": "auto", "gradient_clipping": "auto"}, settings
    )
    assert config == {"train_micro_batch_size_per_gpu": engines.DEEPSPEED_MICRO_BATCH, "gradient_clipping": 0.5}
    kept = engines.fill_deepspeed_config({"train_micro_batch_size_per_gpu": 4, "gradient_clipping": 2.0}, settings)
    assert kept == {"train_micro_batch_size_per_gpu": 4, "gradient_clipping": 2.0}
    # Offload: OPTIMIZER steps on the CPU (DeepSpeed would insist on its CPU Adam) and may be one it has not tested.
    offloaded = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    adafactor = make_settings(tmp_path, tiny_model_dir, OPTIMIZER="adafactor")
    filled = engines.fill_deepspeed_config(offloaded, adafactor)
    assert filled["zero_force_ds_cpu_optimizer"] is False and filled["zero_allow_untested_optimizer"] is True


def _gradients_and_saved_bytes(model, batch):
    """One forward + backward of the training step: ({parameter: gradient}, bytes of tensors autograd kept for
    backward, the part of them packed inside the talker's and code predictor's decoder layers), each storage
    counted once."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    from finetuning.training.step import TalkerStep

    storages: dict[int, int] = {}
    in_layers: dict[int, int] = {}
    depth = [0]

    def pack(tensor):
        storage = tensor.untyped_storage()
        (in_layers if depth[0] else storages)[storage.data_ptr()] = storage.nbytes()
        return tensor

    layers = [m for m in model.talker.modules() if isinstance(m, GradientCheckpointingLayer)]
    handles = [layer.register_forward_pre_hook(lambda *_: depth.__setitem__(0, depth[0] + 1)) for layer in layers]
    handles += [layer.register_forward_hook(lambda *_: depth.__setitem__(0, depth[0] - 1)) for layer in layers]
    speakers = torch.randn(2, model.config.talker_config.hidden_size, generator=torch.Generator().manual_seed(1))
    step = TalkerStep(model, speakers).train()
    model.zero_grad(set_to_none=True)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss, _ = step(batch)
    finally:
        for handle in handles:
            handle.remove()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.talker.named_parameters() if p.grad is not None}
    layer_bytes = sum(size for ptr, size in in_layers.items() if ptr not in storages)
    return grads, sum(storages.values()) + layer_bytes, layer_bytes


def test_gradient_checkpointing_keeps_gradients_and_saves_less(step_parts):
    model, batch = step_parts
    plain_grads, plain_bytes, plain_layer_bytes = _gradients_and_saved_bytes(model, batch)
    layers = engines.enable_gradient_checkpointing(model)
    try:
        checkpointed_grads, checkpointed_bytes, checkpointed_layer_bytes = _gradients_and_saved_bytes(model, batch)
    finally:
        model.talker.gradient_checkpointing_disable()
        model.zero_grad(set_to_none=True)
    tcfg = model.config.talker_config
    assert layers == tcfg.num_hidden_layers + tcfg.code_predictor_config.num_hidden_layers
    assert plain_grads.keys() == checkpointed_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    mib = 2**20
    print(
        f"saved for backward: {plain_bytes / mib:.2f} MiB plain ({plain_layer_bytes / mib:.2f} inside decoder "
        f"layers), {checkpointed_bytes / mib:.2f} MiB checkpointed ({checkpointed_layer_bytes / mib:.2f})"
    )
    assert plain_layer_bytes > 0 and checkpointed_layer_bytes == 0  # layers keep nothing but their inputs
    assert plain_bytes - checkpointed_bytes > 0.5 * plain_layer_bytes


def test_collective_timeout_reaches_the_process_group_settings(tiny_model_dir, tmp_path):
    from datetime import timedelta

    settings = make_settings(tmp_path, tiny_model_dir, DISTRIBUTED_TIMEOUT_MINUTES=45)
    accelerator = engines.make_accelerator(settings, trackers=[])
    assert accelerator.init_handler.timeout == timedelta(minutes=45)
