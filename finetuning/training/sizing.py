"""Peak memory per GPU of a training run, estimated from the model's shapes before any weight loads.

The model is built on the meta device (``finetuning.published_models``), so a 1.7B estimate takes a second and no
memory. Training here keeps float32 master weights and runs mixed precision through autocast; per process, in
bytes (P parameters, T of them trained, N processes sharing the ZeRO / FSDP shards):

==================  ======================================================================================
weights             4 P (ZeRO-3 / FSDP: 4 P / N, plus one gathered decoder layer)
gradients           4 T (ZeRO-2 and up: / N); DDP with several processes adds 4 T of reducer buckets
optimizer           OPTIMIZER's states (ZeRO-1 and up: / N), from each trained tensor's shape
                    (``optimizer_state_bytes``): adamw 8 T (exp_avg, exp_avg_sq in float32); adamw_8bit 2 T
                    plus a float32 scale per 256 elements of each moment (tensors under 4096 elements: 8 bytes
                    each); adafactor 4 bytes per row and per column of each matrix, 4 per
                    element of each vector
autocast weights    2 T_linear with bf16 / fp16: autocast's cached half-precision copies of the Linear weights
activations         per talker position per talker layer: 6 h + 4 i + 4 (q_heads + kv_heads) d elements; the
                    same per code-predictor position (16 per frame) per code-predictor layer; plus the heads'
                    logits: 3 V + 2 h per position and 3 * 15 V_cp + 16 (h + h_cp) per frame. Elements are
                    4 bytes in float32 and ACTIVATION_BYTES_MIXED under autocast (norms and the residual stream
                    stay float32). Gradient checkpointing keeps h per position per layer plus one layer's
                    activations.
==================  ======================================================================================

Optimizer offload (DeepSpeed ZeRO-2, ``deepspeed_zero2_offload.yaml``) moves the float32 master weights, the
float32 gradient partitions and the optimizer states to CPU memory (``host``, not part of the GPU total); the GPU
keeps the engine's weights in the training precision (2 P in bf16 / fp16), gradient buckets (counted as
2 × 4 bytes × the largest decoder layer) and the activations; the engine runs in half precision, so there are no
autocast copies.

The peak is taken as the sum (gradients and activations are counted as if all alive at once, so it errs high).
The activation coefficients count the tensors autograd saves in a qwen-tts decoder layer (RMSNorm in float32,
q/k norms, rotary, SDPA without a stored attention matrix, SwiGLU MLP); ``bench/sizing_memory.py`` measures
real-width models against them. ``estimate_memory`` takes the trained tensors' shapes (or their count), so a method
that trains fewer parameters (adapters) plugs in by passing its own.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

GIB = 2**30
FP32_BYTES = 4
ADAM_STATE_BYTES = 8  # exp_avg + exp_avg_sq, float32
HALF_BYTES = 2
# Bytes per saved activation element under bf16 / fp16 autocast: matmul outputs are half precision, RMSNorm
# statistics and the residual stream stay float32 (measured 0.65-0.68 of the float32 bytes on qwen-tts layers).
ACTIVATION_BYTES_MIXED = 2.7
CODE_PREDICTOR_POSITIONS = 16  # per frame: the talker's hidden state + codebooks 1..15
SUB_TALKER_HEADS = 15  # codebooks 2..16
MIN_8BIT_ELEMENTS = 4096  # bitsandbytes keeps float32 moments for smaller tensors (``optim.MIN_8BIT_ELEMENTS``)
BLOCK_8BIT = 256  # elements per float32 scale of bitsandbytes' block-wise 8-bit states
OFFLOAD_GRADIENT_BUCKETS = 2  # ZeRO-2 offload: gradient buffers on the GPU, each the size of the largest layer
OPTIMIZERS = ("adamw", "adamw_8bit", "adafactor")
# A run fits when the estimate is within 90 % of the GPU memory (allocator fragmentation, CUDA context, NCCL).
FITS_MARGIN = 0.9


@dataclass(frozen=True)
class DecoderShape:
    """One decoder stack: layers, hidden width h, MLP width i, query / key-value heads, head dim d, vocabulary V."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    def activation_elements(self) -> int:
        """Elements autograd saves per position per layer (see the module docstring)."""
        return 6 * self.hidden + 4 * self.intermediate + 4 * (self.heads + self.kv_heads) * self.head_dim

    @classmethod
    def from_config(cls, config) -> DecoderShape:
        return cls(
            config.num_hidden_layers,
            config.hidden_size,
            config.intermediate_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            getattr(config, "head_dim", config.hidden_size // config.num_attention_heads),
            config.vocab_size,
        )


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of a model: parameter counts and the two decoder stacks' shapes."""

    parameters: int  # every parameter, frozen ones included
    trainable: int  # a full fine-tune trains everything but the speaker encoder
    linear_parameters: int  # weights autocast casts (nn.Linear), trained ones
    largest_layer: int  # parameters of the largest decoder layer (what ZeRO-3 / FSDP gathers at once)
    trained_shapes: tuple[tuple[int, ...], ...]  # shape of every tensor a full fine-tune trains
    talker: DecoderShape
    code_predictor: DecoderShape


def model_shape(config: dict) -> ModelShape:
    """Shapes of the model ``config`` (a ``config.json`` dict) describes, from a meta-device build."""
    import torch

    from finetuning.published_models import build_on_meta

    model = build_on_meta(config)
    frozen = sum(p.numel() for p in model.speaker_encoder.parameters()) if model.speaker_encoder else 0
    total = sum(p.numel() for p in model.parameters())
    linear = sum(
        m.weight.numel()
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and not name.startswith("speaker_encoder")
    )
    layers = [*model.talker.model.layers, *model.talker.code_predictor.model.layers]
    talker_config = model.config.talker_config
    return ModelShape(
        parameters=total,
        trainable=total - frozen,
        linear_parameters=linear,
        largest_layer=max(sum(p.numel() for p in layer.parameters()) for layer in layers),
        trained_shapes=trained_shapes(model),
        talker=DecoderShape.from_config(talker_config),
        code_predictor=DecoderShape.from_config(talker_config.code_predictor_config),
    )


@dataclass(frozen=True)
class TrainingPlan:
    """How a run trains: ``precision`` no / bf16 / fp16, ``num_processes``, ``zero_stage`` 0-3 (3 = FSDP full
    shard), ``gradient_checkpointing``, and the largest micro-batch: ``positions`` padded talker positions
    (MAX_BATCH_TOKENS) of which ``frames`` are codec frames (at most ``positions``); ``optimizer`` (OPTIMIZER)
    and ``offload_optimizer`` (DeepSpeed ZeRO-2 with the optimizer in CPU memory; implies ``zero_stage`` 2)."""

    precision: str = "bf16"
    num_processes: int = 1
    zero_stage: int = 0
    gradient_checkpointing: bool = False
    positions: int = 4096
    frames: int = 4096
    optimizer: str = "adamw"
    offload_optimizer: bool = False


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per process by part; ``total`` is their sum (GPU memory); ``host`` is what optimizer offload keeps in
    CPU memory per process instead."""

    weights: float
    gradients: float
    optimizer: float
    autocast_weights: float
    activations: float
    host: float = 0.0

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.autocast_weights + self.activations

    def parts(self) -> dict[str, float]:
        return {
            "weights": self.weights,
            "gradients": self.gradients,
            "optimizer states": self.optimizer,
            "autocast weight copies": self.autocast_weights,
            "activations": self.activations,
        }


def activation_bytes(shape: ModelShape, plan: TrainingPlan) -> float:
    """Saved activations of one micro-batch of ``plan.positions`` talker positions and ``plan.frames`` frames."""
    element = FP32_BYTES if plan.precision == "no" else ACTIVATION_BYTES_MIXED
    talker, predictor = shape.talker, shape.code_predictor
    predictor_positions = CODE_PREDICTOR_POSITIONS * plan.frames
    if plan.gradient_checkpointing:  # each layer keeps its input; one layer at a time is recomputed
        stacks = talker.layers * talker.hidden * plan.positions + predictor.layers * predictor.hidden * (
            predictor_positions
        )
        stacks += max(
            talker.activation_elements() * plan.positions, predictor.activation_elements() * predictor_positions
        )
    else:
        stacks = talker.layers * talker.activation_elements() * plan.positions
        stacks += predictor.layers * predictor.activation_elements() * predictor_positions
    heads = (3 * talker.vocab + 2 * talker.hidden) * plan.positions
    heads += (
        3 * SUB_TALKER_HEADS * predictor.vocab + CODE_PREDICTOR_POSITIONS * (talker.hidden + predictor.hidden)
    ) * (plan.frames)
    return element * (stacks + heads)


def trained_shapes(model) -> tuple[tuple[int, ...], ...]:
    """Shapes of the tensors of ``model`` that train (``requires_grad``), the speaker encoder left out."""
    return tuple(
        tuple(p.shape)
        for name, p in model.named_parameters()
        if p.requires_grad and not name.startswith("speaker_encoder.")
    )


def optimizer_state_bytes(shapes: Iterable[tuple[int, ...]], optimizer: str) -> float:
    """Bytes of OPTIMIZER ``optimizer``'s states for trained tensors of ``shapes`` (see the module docstring), as
    ``finetuning.training.optim`` builds it on float32 parameters. Raises ValueError for an unknown name."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; one of {', '.join(OPTIMIZERS)}")
    total = 0.0
    for shape in shapes:
        elements = math.prod(shape)
        if optimizer == "adamw" or (optimizer == "adamw_8bit" and elements < MIN_8BIT_ELEMENTS):
            total += ADAM_STATE_BYTES * elements
        elif optimizer == "adamw_8bit":  # two uint8 moments and a float32 scale per block each (quantile maps shared)
            total += 2 * (elements + FP32_BYTES * math.ceil(elements / BLOCK_8BIT))
        elif len(shape) >= 2:  # adafactor: row and column means of the squared gradient
            total += FP32_BYTES * (math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1])
        else:
            total += FP32_BYTES * elements
    return total


def estimate_memory(
    shape: ModelShape,
    plan: TrainingPlan,
    trainable: int | None = None,
    shapes: tuple[tuple[int, ...], ...] | None = None,
) -> MemoryEstimate:
    """Peak bytes per process for ``shape`` trained as ``plan``. A method that trains other tensors than a full
    fine-tune (adapters) passes their ``shapes``, or only their count ``trainable`` (optimizer states are then
    scaled from the full fine-tune's bytes per trained parameter): gradients and states cover only those."""
    if shapes is not None:
        trained = sum(math.prod(s) for s in shapes)
        states = optimizer_state_bytes(shapes, plan.optimizer)
    else:
        trained = shape.trainable if trainable is None else trainable
        full = optimizer_state_bytes(shape.trained_shapes, plan.optimizer)
        states = full * trained / sum(math.prod(s) for s in shape.trained_shapes)
    n = plan.num_processes
    stage = 2 if plan.offload_optimizer else plan.zero_stage
    activations = activation_bytes(shape, plan)
    if plan.offload_optimizer:
        engine_bytes = FP32_BYTES if plan.precision == "no" else HALF_BYTES
        buckets = OFFLOAD_GRADIENT_BUCKETS * FP32_BYTES * shape.largest_layer
        host = (2 * FP32_BYTES * trained + states) / n  # master weights, gradient partitions, states
        return MemoryEstimate(engine_bytes * shape.parameters, buckets, 0.0, 0.0, activations, host)
    weights = FP32_BYTES * shape.parameters / (n if stage >= 3 else 1)
    if stage >= 3 and n > 1:
        weights += FP32_BYTES * shape.largest_layer
    gradients = FP32_BYTES * trained / (n if stage >= 2 else 1)
    if n > 1 and stage == 0:
        gradients += FP32_BYTES * trained  # DDP reducer buckets
    optimizer = states / (n if stage >= 1 else 1)
    linear_trained = min(shape.linear_parameters, trained)
    autocast = 0.0 if plan.precision == "no" else HALF_BYTES * linear_trained / (n if stage >= 3 else 1)
    return MemoryEstimate(weights, gradients, optimizer, autocast, activations)
