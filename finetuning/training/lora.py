"""LoRA fine-tuning (FINETUNE_METHOD=lora): adapters on the talker, a merged stock export, the adapter beside it.

``apply_lora`` wraps the talker's linear layers named in LORA_TARGETS (talker and code predictor; the speaker
encoder is never touched) with ``peft`` LoRA adapters of rank LORA_RANK, and trains the modules named in
LORA_FULLY_TRAINED (default: the codec heads) fully, as peft ``modules_to_save`` copies. Every other weight is
frozen and stays bit-identical to the Base model. The model object is changed in place, so the training step,
the loop, resume (accelerate states hold the adapter and the trained copies) and every process (DDP) see it as
before; the optimizer only gets the trainable parameters.

An export merges without touching the model being trained: ``LoraAdapter.merged_state_dict`` turns a (gathered)
state dict of the adapted model into the Base model's keys, ``W + (LORA_ALPHA / LORA_RANK) · B @ A`` for each
adapted layer and the trained copy for each fully trained module, which is what peft's ``merge_and_unload``
computes (tested). The checkpoint is then the same stock-loadable ``custom_voice`` folder as a full fine-tune's,
speaker rows written after the merge. ``save_adapter`` writes the adapter itself (peft's ``adapter_config.json``
and ``adapter_model.safetensors``) for ``peft.PeftModel.from_pretrained(base_model, "<export>/adapter")``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from finetuning.settings import Settings

logger = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"  # inside an export
ADAPTER_NAME = "default"  # peft's adapter name; it appears in state-dict keys of the adapted model
ADAPTED_SCOPE = "talker"  # LoRA and full training stay inside the talker (code predictor included)
ADAMW_STATE_TENSORS = 2  # exp_avg and exp_avg_sq, one fp32 value each per trainable parameter
FP32_BYTES = 4
LORA_WEIGHT_PARTS = (f".lora_A.{ADAPTER_NAME}.weight", f".lora_B.{ADAPTER_NAME}.weight")
BASE_LAYER = ".base_layer."
ORIGINAL_MODULE = ".original_module."
TRAINED_COPY = f".modules_to_save.{ADAPTER_NAME}."


class LoraError(ValueError):
    """LORA_TARGETS / LORA_FULLY_TRAINED do not fit the model; the message names the key and the fix."""


@dataclass
class LoraAdapter:
    """The peft model around the (in place) adapted model and the LoRA scale of each adapted layer.

    ``scalings`` maps an adapted layer's name in the model (e.g. ``talker.model.layers.0.self_attn.q_proj``) to
    LORA_ALPHA / LORA_RANK as peft applies it.
    """

    peft_model: torch.nn.Module
    scalings: dict[str, float]

    def merged_state_dict(self, state: dict[str, torch.Tensor], scale: float = 1.0) -> dict[str, torch.Tensor]:
        """The Base model's keys and merged weights from ``state``, a state dict of the adapted model (keys as in
        the model, e.g. from ``export.gathered_state_dict``), the update scaled by ``scale`` (LORA_MERGE_SCALE):
        W + scale x alpha / rank x B A for adapted layers, W + scale x (trained copy - W) for fully trained
        modules, so 0 gives the Base model's weights and 1 the trained model's. Merging is done in float32; tensors
        stay where they are. Raises KeyError when ``state`` lacks an adapted layer's parts."""
        merged = {}
        for name, tensor in state.items():
            if ".lora_" in name or ORIGINAL_MODULE in name:
                continue
            key = name.replace(BASE_LAYER, ".").replace(TRAINED_COPY, ".")
            original = state.get(name.replace(TRAINED_COPY, ORIGINAL_MODULE)) if TRAINED_COPY in name else None
            if original is not None and scale != 1.0 and tensor.is_floating_point():
                tensor = (original.float() + scale * (tensor.float() - original.float())).to(tensor.dtype)
            merged[key] = tensor
        for layer, scaling in self.scalings.items():
            lora_a, lora_b = (state[layer + part].float() for part in LORA_WEIGHT_PARTS)  # (r, in), (out, r)
            base = state[f"{layer}{BASE_LAYER}weight"]  # (out, in)
            merged[f"{layer}.weight"] = (base.float() + (lora_b @ lora_a) * (scaling * scale)).to(base.dtype)
        return merged

    def save_adapter(self, state: dict[str, torch.Tensor], checkpoint_dir: Path, base_model: str) -> None:
        """Write peft's adapter folder (config + adapter and fully trained weights) from ``state`` (keys as in the
        model) to ``checkpoint_dir / ADAPTER_DIR``; ``base_model`` is recorded as the model it adapts."""
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        prefixed = {f"base_model.model.{name}": tensor for name, tensor in state.items()}
        weights = get_peft_model_state_dict(self.peft_model, state_dict=prefixed, save_embedding_layers=False)
        output_dir = Path(checkpoint_dir) / ADAPTER_DIR
        output_dir.mkdir(parents=True, exist_ok=True)
        config = self.peft_model.peft_config[ADAPTER_NAME]
        config.base_model_name_or_path = base_model
        config.save_pretrained(str(output_dir))
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
        save_file(tensors, str(output_dir / "adapter_model.safetensors"), metadata={"format": "pt"})


def _matching_modules(model: torch.nn.Module, names: tuple[str, ...], key: str) -> list[str]:
    """Full names of the talker modules whose name ends with one of ``names`` (a ModuleList of them counts as its
    members). Raises LoraError naming a name that matches nothing."""
    modules = dict(model.named_modules())
    found = []
    for wanted in names:
        hits = [n for n in modules if n.startswith(f"{ADAPTED_SCOPE}.") and (n == wanted or n.endswith(f".{wanted}"))]
        if not hits:
            raise LoraError(f"{key}: {wanted!r} names no module of the talker; use names like codec_head, q_proj")
        for hit in hits:
            module = modules[hit]
            members = [f"{hit}.{i}" for i in range(len(module))] if isinstance(module, torch.nn.ModuleList) else [hit]
            found.extend(members)
    return found


def apply_lora(model: torch.nn.Module, settings: Settings) -> LoraAdapter | None:
    """Add LoRA adapters to ``model`` in place for FINETUNE_METHOD=lora (None for full fine-tuning).

    Afterwards only the adapters and the LORA_FULLY_TRAINED copies require gradients. Raises LoraError when
    LORA_TARGETS is empty, names no linear layer, or overlaps LORA_FULLY_TRAINED.
    """
    if settings.FINETUNE_METHOD != "lora":
        return None
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    if not settings.LORA_TARGETS:
        raise LoraError("LORA_TARGETS is empty; name the layers that get adapters, e.g. q_proj,k_proj,v_proj,o_proj")
    targets = _matching_modules(model, settings.LORA_TARGETS, "LORA_TARGETS")
    modules = dict(model.named_modules())
    not_linear = [n for n in targets if not isinstance(modules[n], torch.nn.Linear)]
    if not_linear:
        raise LoraError(f"LORA_TARGETS must name linear layers; {not_linear[0]} is not one")
    fully_trained = _matching_modules(model, settings.LORA_FULLY_TRAINED, "LORA_FULLY_TRAINED")
    overlap = sorted(set(targets) & set(fully_trained))
    if overlap:
        raise LoraError(f"{overlap[0]} is in LORA_TARGETS and LORA_FULLY_TRAINED; a module is adapted or trained")
    config = LoraConfig(
        r=settings.LORA_RANK,
        lora_alpha=settings.LORA_ALPHA,
        lora_dropout=settings.LORA_DROPOUT,
        # Whole names, matched in full: only these layers, never a like-named layer of the speaker encoder.
        target_modules="|".join(re.escape(name) for name in targets),
        modules_to_save=fully_trained or None,
        bias="none",
    )
    peft_model = get_peft_model(model, config, adapter_name=ADAPTER_NAME)
    scalings = {n: m.scaling[ADAPTER_NAME] for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    return LoraAdapter(peft_model=peft_model, scalings=scalings)


def trainable_summary(model: torch.nn.Module) -> dict[str, float]:
    """Parameters the optimizer updates vs all parameters, and the AdamW state they need (two fp32 moments per
    trainable parameter), for any fine-tuning method; works on a meta-device model (nothing is read)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "trainable_parameters": trainable,
        "total_parameters": total,
        "trainable_share": trainable / total if total else 0.0,
        "optimizer_state_bytes": trainable * ADAMW_STATE_TENSORS * FP32_BYTES,
    }


def log_trainable_summary(model: torch.nn.Module, method: str) -> dict[str, float]:
    """Log ``trainable_summary`` at training start (one line) and return it."""
    summary = trainable_summary(model)
    logger.info(
        "%s fine-tuning: %d of %d parameters trainable (%.2f %%), optimizer state %.1f MB",
        method,
        summary["trainable_parameters"],
        summary["total_parameters"],
        100 * summary["trainable_share"],
        summary["optimizer_state_bytes"] / 1e6,
    )
    return summary
