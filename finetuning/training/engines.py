"""The accelerate engine a run trains under (one device, DDP, FSDP2, DeepSpeed) and the guards each engine needs.

``accelerate launch`` picks the engine (``--config_file finetuning/accelerate_configs/...``); this module builds
the ``Accelerator`` for it and keeps the promises the loop relies on, whatever the engine:

* Collectives wait DISTRIBUTED_TIMEOUT_MINUTES (``InitProcessGroupKwargs``), not torch's default 10 minutes, so
  rank 0 may export and generate for in-training evaluation while the other ranks wait.
* DeepSpeed gets the values its config leaves ``auto`` that accelerate can only fill from a DataLoader passed to
  ``prepare`` (the loop prepares none: its batch sampler already shards batches per process): the micro-batch
  size and the gradient clipping. Without them ``prepare`` raises "requires you to pass at least one of training
  or evaluation dataloaders". Under ZeRO-3 the Base model loads whole (``whole_model_loading``) and batches must
  have one size (``check_zero3_batches``).
* Frozen modules (speaker encoder, the auxiliary losses' decoder) stay outside the engine, and floating-point
  buffers keep float32 (``prepare_engine``): DeepSpeed before 0.17 cast the whole wrapped module
  (``module.bfloat16()``), buffers included, and a rotary ``inv_freq`` rounded to bf16 shifts every position's
  phase.
* FSDP runs on CPU processes too (``fsdp_on_cpu_processes``), and with ``fsdp_cpu_ram_efficient_loading`` every
  process gets the main process's speaker embeddings and frozen weights (``share_main_process_weights``).

accelerate 1.12 selects DeepSpeed only when the Accelerator is not forced onto the CPU (``cpu=True`` silently
falls back to DDP), so ``DEVICE=cpu`` is passed on as ``cpu=False`` under DeepSpeed: DeepSpeed's own CPU
accelerator (``DS_ACCELERATOR=cpu``) then runs it with gloo.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch

from finetuning.settings import Settings

logger = logging.getLogger(__name__)

# DeepSpeed counts batches in utterances; duration batching makes every micro-batch a different size, so the engine
# is told one "micro-batch" per process step (it only uses the number for throughput logs and its batch-size check).
DEEPSPEED_MICRO_BATCH = 1
ZERO_PARTITIONED_PARAMETERS = 3  # the ZeRO stage that shards the parameters themselves


class EngineError(RuntimeError):
    """The launch asks for an engine that cannot run here; the message says what to install or change."""


def zero_stage(accelerator) -> int | None:
    """The DeepSpeed ZeRO stage of this run, None without DeepSpeed."""
    plugin = accelerator.state.deepspeed_plugin
    return None if plugin is None else int(plugin.deepspeed_config["zero_optimization"]["stage"])


def deepspeed_requested() -> bool:
    """True under ``accelerate launch`` with a DeepSpeed config (accelerate's own launch flag)."""
    from accelerate.utils import parse_flag_from_env

    return parse_flag_from_env("ACCELERATE_USE_DEEPSPEED")


def make_accelerator(settings: Settings, trackers: list[str]):
    """The Accelerator for this launch: MIXED_PRECISION, GRADIENT_ACCUMULATION_STEPS, ``trackers``, the collective
    timeout, and DeepSpeed's ``auto`` values filled. Raises EngineError when DeepSpeed is asked for but not
    installed."""
    from accelerate import Accelerator
    from accelerate.utils import (
        DistributedType,
        FullyShardedDataParallelPlugin,
        InitProcessGroupKwargs,
        ProjectConfiguration,
        parse_flag_from_env,
    )

    use_deepspeed = deepspeed_requested()
    if use_deepspeed and importlib.util.find_spec("deepspeed") is None:
        raise EngineError("the launch config asks for DeepSpeed, which is not installed: `uv sync --group deepspeed`")
    fsdp_plugin = FullyShardedDataParallelPlugin() if parse_flag_from_env("ACCELERATE_USE_FSDP") else None
    accelerator = Accelerator(
        fsdp_plugin=fsdp_plugin,
        mixed_precision=settings.MIXED_PRECISION,
        gradient_accumulation_steps=settings.GRADIENT_ACCUMULATION_STEPS,
        cpu=settings.DEVICE == "cpu" and not use_deepspeed,
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=settings.OUTPUT_DIR, logging_dir=settings.OUTPUT_DIR),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(minutes=settings.DISTRIBUTED_TIMEOUT_MINUTES))],
    )
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        fill_deepspeed_config(plugin.deepspeed_config, settings)
    if fsdp_plugin is not None and accelerator.distributed_type != DistributedType.FSDP:
        fsdp_on_cpu_processes(accelerator, fsdp_plugin)
    precision = "bf16" if plugin and plugin.deepspeed_config.get("bf16", {}).get("enabled") else None
    logger.info(
        "engine %s on %s, %d process(es), mixed precision %s",
        accelerator.distributed_type.value,
        accelerator.device,
        accelerator.num_processes,
        precision or accelerator.mixed_precision,
    )
    return accelerator


def finish(accelerator) -> None:
    """End the launch's distributed state while the interpreter is whole: DeepSpeed's engine is destroyed (its
    hooks), the trackers finish and every process group is destroyed, DeepSpeed's own references to them included.

    Destroyed groups still run their gloo threads for as long as anything refers to them, and DeepSpeed keeps a
    ZeRO-3 model (whose parameters refer to a group each) in module-level state past the run. Those threads can
    abort a finished process during interpreter exit, so a launched process leaves with ``exit_launched``.
    """
    stage = zero_stage(accelerator)
    accelerator.free_memory()
    if stage is not None and torch.distributed.is_initialized():
        import deepspeed.comm

        deepspeed.comm.destroy_process_group()
    accelerator.end_training()


def exit_launched(code: int) -> None:
    """Leave a process started by ``accelerate launch`` with ``code`` without interpreter teardown, once the
    run has ended (``finish``) and the output is flushed; return at once in a process not launched so.

    A two-process ZeRO-3 run on CPU aborted after its export in 1 run of 10 to 50, depending on load ("terminate
    called without an active exception"): the gloo threads of process groups that DeepSpeed keeps alive were still
    running while the interpreter was torn down. Nothing is left to clean up by then, and an abort would fail a
    finished run.
    """
    import os
    import sys

    if "RANK" not in os.environ:  # set by the launcher (torch elastic) in every process it starts
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def fsdp_on_cpu_processes(accelerator, plugin) -> None:
    """Turn the CPU processes of an FSDP launch into an FSDP run.

    accelerate 1.12 selects FSDP only for accelerator devices: on CPU processes it quietly falls back to DDP
    (``MULTI_CPU``). torch's FSDP2 (``fully_shard``) runs on CPU over gloo, so the accelerator state is switched to
    FSDP with the launch's plugin, as accelerate does for GPUs. FSDP1 is refused there (it needs a device).
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.MULTI_CPU:
        raise EngineError(
            f"the launch config asks for FSDP, but accelerate set up {accelerator.distributed_type.value}: launch "
            "several processes (--num_processes 2 or more)"
        )
    if plugin.fsdp_version != 2:
        raise EngineError("FSDP on CPU processes needs fsdp_version: 2 in the launch config (FSDP1 needs a GPU)")
    state = accelerator.state
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def fill_deepspeed_config(config: dict, settings: Settings) -> dict:
    """Replace the ``auto`` values that accelerate fills only from a prepared DataLoader, in place: the micro-batch
    size (DEEPSPEED_MICRO_BATCH) and gradient clipping (MAX_GRAD_NORM; 0 = off in DeepSpeed too). With the
    optimizer offloaded to the CPU, OPTIMIZER (torch's fused CPU AdamW, bitsandbytes, Adafactor) steps there in
    place of DeepSpeed's CPU Adam, which would compile at first use; OPTIMIZER other than adamw is allowed under
    ZeRO (DeepSpeed refuses optimizers it has not tested unless told)."""
    if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        config["train_micro_batch_size_per_gpu"] = DEEPSPEED_MICRO_BATCH
    if config.get("gradient_clipping", "auto") == "auto":
        config["gradient_clipping"] = settings.MAX_GRAD_NORM
    if config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") != "none":
        config.setdefault("zero_force_ds_cpu_optimizer", False)  # OPTIMIZER steps the float32 partitions on the CPU
    if settings.OPTIMIZER != "adamw":  # DeepSpeed knows only its own and torch's Adam(W) by type
        config.setdefault("zero_allow_untested_optimizer", True)
    return config


@contextmanager
def whole_model_loading(accelerator) -> Iterator[None]:
    """Load the Base model whole on every process, also under ZeRO-3.

    While accelerate's DeepSpeed config is registered with transformers, a ZeRO-3 config makes ``from_pretrained``
    build the model already partitioned (``deepspeed.zero.Init``), whatever ``zero3_init_flag`` says; the speaker
    encoder would then run on empty weights before training ("weight should have at least three dimensions").
    The model is loaded whole, the speaker embeddings computed, and the engine partitions it in ``prepare``.
    """
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def check_zero3_batches(accelerator, batch_sizes: list[int]) -> None:
    """ZeRO-3 gathers a module's sharded weights with a collective at each call, and the step embeds utterance by
    utterance: processes whose batches differ in size would call different numbers of collectives and hang. So
    under ZeRO-3 every batch of the epoch plan (``batch_sizes``, all processes) must have one size. Raises
    EngineError naming the fix otherwise; does nothing for other engines."""
    if zero_stage(accelerator) != ZERO_PARTITIONED_PARAMETERS or len(set(batch_sizes)) <= 1:
        return
    raise EngineError(
        f"DeepSpeed ZeRO-3 needs batches of one size on every process, but this epoch's batches hold "
        f"{min(batch_sizes)} to {max(batch_sizes)} utterances: set MAX_BATCH_TOKENS=0 and a BATCH_SIZE that divides "
        f"the utterances per epoch ({sum(batch_sizes)}), or use ZeRO-2 (deepspeed_zero2.yaml) or FSDP"
    )


def main_process_loads_alone(accelerator) -> bool:
    """True under FSDP with ``fsdp_cpu_ram_efficient_loading``: transformers then reads the weights on the main
    process only and gives the others uninitialised memory of the right shapes."""
    plugin = accelerator.state.fsdp_plugin if accelerator.distributed_type.value == "FSDP" else None
    return bool(plugin is not None and plugin.cpu_ram_efficient_loading and accelerator.num_processes > 1)


def share_main_process_weights(accelerator, speaker_embeds: torch.Tensor, *frozen: torch.nn.Module | None) -> None:
    """Give every process the main process's ``speaker_embeds`` (S, D) and ``frozen`` modules' parameters and
    buffers (the auxiliary losses' decoder and speaker encoder), in place, when only the main process loaded real
    weights (``main_process_loads_alone``): the other processes computed their speaker embeddings from
    uninitialised memory. The engine shares the trained model's own weights in ``prepare``. Every process must
    call it. Logs a checksum of the embeddings on each process (equal everywhere)."""
    if main_process_loads_alone(accelerator):
        import torch.distributed as dist

        tensors = [speaker_embeds]
        for module in frozen:
            if module is not None:
                tensors += [*module.parameters(), *module.buffers()]
        for tensor in tensors:  # through the accelerator's device: NCCL sends no CPU tensors
            on_device = tensor.data.to(accelerator.device)
            dist.broadcast(on_device, src=0)
            tensor.data.copy_(on_device)
    logger.info(
        "process %d: speaker embeddings %s, checksum %.6f",
        accelerator.process_index,
        tuple(speaker_embeds.shape),
        float(speaker_embeds.double().abs().sum()),
    )


def float_buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every floating-point buffer of ``module`` (rotary ``inv_freq``, the speaker embeddings), by name."""
    return {name: buf.detach().clone() for name, buf in module.named_buffers() if buf.is_floating_point()}


def restore_buffers(module: torch.nn.Module, saved: dict[str, torch.Tensor]) -> list[str]:
    """Put back the ``saved`` buffers whose dtype an engine changed (DeepSpeed's half-precision cast); returns their
    names. Values and dtype come from ``saved``, the device from the buffer now in place."""
    restored = []
    for name, buf in module.named_buffers():
        original = saved.get(name)
        if original is None or buf.dtype == original.dtype:
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        owner._buffers[attr] = original.to(buf.device)
        restored.append(name)
    if restored:
        logger.info("kept %d buffers in float32 after the engine's cast: %s", len(restored), ", ".join(restored))
    return restored


def prepare_engine(accelerator, step_module: torch.nn.Module, optimizer):
    """``accelerator.prepare(step_module, optimizer)`` with the step's float32 buffers kept float32."""
    saved = float_buffers(step_module)
    step_module, optimizer = accelerator.prepare(step_module, optimizer)
    restore_buffers(accelerator.unwrap_model(step_module), saved)
    return step_module, optimizer


def detach_speaker_encoder(model) -> torch.nn.Module | None:
    """Take the frozen speaker encoder out of ``model`` (it becomes None there) and return it, so no engine wraps,
    casts or shards it. Call once the speaker embeddings are computed; the voice-consistency loss keeps its own
    reference. Exports never contain it (a custom-voice model has none)."""
    encoder = model.speaker_encoder
    model.speaker_encoder = None
    return encoder


def enable_gradient_checkpointing(model) -> int:
    """GRADIENT_CHECKPOINTING: every decoder layer of the talker and of the code predictor keeps only its input
    for backward and recomputes the rest (transformers' non-reentrant checkpointing, so frozen inputs and
    ``no_grad`` parts need no special care). Gradients are unchanged; activation memory drops from all of a
    layer's intermediates to its input. Returns the number of layers switched."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    model.talker.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = [m for m in model.talker.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers or not all(layer.gradient_checkpointing for layer in layers):
        raise EngineError("GRADIENT_CHECKPOINTING=true, but the talker's decoder layers do not support it")
    return len(layers)
