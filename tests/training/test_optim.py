"""The optimizer: fused AdamW where torch has the kernel, the multi-tensor path elsewhere, the same update; the
OPTIMIZER choices (8-bit AdamW, Adafactor) train, resume and take the state bytes preflight counts."""

import math

import pytest
import torch
from conftest import make_settings

from finetuning.training.optim import make_optimizer


class _Net(torch.nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.embedding = torch.nn.Embedding(10, 4)
        self.proj = torch.nn.Linear(4, 3).to(dtype)


def _one_update(optimizer, net) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    for p in net.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    return {name: p.detach().clone() for name, p in net.named_parameters()}


def test_fused_adamw_on_cpu_updates_like_the_reference_loop(tmp_path):
    settings = make_settings(tmp_path, tmp_path, LEARNING_RATE="0.01", WEIGHT_DECAY="0.1")
    torch.manual_seed(1)
    fused_net = _Net()
    reference_net = _Net()
    reference_net.load_state_dict(fused_net.state_dict())
    fused = make_optimizer(fused_net, settings)
    assert fused.defaults["fused"] is True
    reference = torch.optim.AdamW(
        [
            {"params": [reference_net.proj.weight], "weight_decay": 0.1},
            {"params": [reference_net.embedding.weight, reference_net.proj.bias], "weight_decay": 0.0},
        ],
        lr=0.01,
        foreach=False,
    )
    for _ in range(3):
        after_fused, after_reference = _one_update(fused, fused_net), _one_update(reference, reference_net)
    for name in after_reference:
        torch.testing.assert_close(after_fused[name], after_reference[name], rtol=1e-6, atol=1e-7)


def test_parameters_without_a_fused_kernel_fall_back_to_the_multi_tensor_path(tmp_path):
    net = _Net(dtype=torch.complex64)  # complex parameters: AdamW has no fused kernel for them
    optimizer = make_optimizer(net, make_settings(tmp_path, tmp_path))
    assert not optimizer.defaults["fused"] and optimizer.defaults["foreach"]
    before = net.proj.weight.detach().clone()
    _one_update(optimizer, net)
    assert not torch.equal(net.proj.weight, before)


# ------------------------------------------------------------------------------------- OPTIMIZER choices --
OPTIMIZER_CLASSES = {"adamw": "AdamW", "adamw_8bit": "AdamW8bit", "adafactor": "Adafactor"}
FEW_STEPS = 6
SHARED_QUANTILE_MAP_BYTES = 2 * 256 * 4  # bitsandbytes' two float32 quantile maps, one pair for all tensors


@pytest.fixture(scope="module")
def tiny_step_parts(tiny_model_dir):
    """(the tiny model, a batch of two utterances with random codes); each test trains a copy."""
    import qwen_tts

    from finetuning.training.step import assistant_text

    wrapper = qwen_tts.Qwen3TTSModel.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    tokenizer = wrapper.processor.tokenizer
    gen = torch.Generator().manual_seed(0)
    batch = {
        "text_ids": [tokenizer(assistant_text(t), return_tensors="pt")["input_ids"][0] for t in ("Hello.", "Habari.")],
        "codes": [torch.randint(0, 2048, (n, 16), generator=gen) for n in (12, 9)],
        "speaker": torch.tensor([0, 1]),
        "language": ["english", None],
    }
    return wrapper.model, batch


def _copy(model):
    """A new model of ``model``'s class and config with its weights (the qwen-tts model does not deep-copy)."""
    new = type(model)(model.config)
    new.load_state_dict(model.state_dict())
    return new


def _train_copy(parts, settings, steps: int = FEW_STEPS):
    """Train a copy of the tiny model (FINETUNE_METHOD of ``settings``) for ``steps`` updates on one batch:
    (model, optimizer, losses)."""
    from finetuning.training.lora import apply_lora
    from finetuning.training.step import TalkerStep

    model = _copy(parts[0])
    model.speaker_encoder.requires_grad_(False)
    apply_lora(model, settings)
    step = TalkerStep(model, torch.randn(2, model.config.talker_config.hidden_size, generator=torch.Generator()))
    optimizer = make_optimizer(model, settings)
    losses = []
    for _ in range(steps):
        loss, _ = step(parts[1])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return model, optimizer, losses


def _state_bytes(optimizer) -> int:
    """Bytes of the optimizer's state tensors, each storage once; per-tensor scalars (step counters) left out."""
    storages = {}
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                storages[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
    return sum(storages.values())


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("name", list(OPTIMIZER_CLASSES))
def test_each_optimizer_lowers_the_loss_and_holds_the_state_preflight_counts(tiny_step_parts, tmp_path, name, method):
    """A few updates on one batch lower the loss (full fine-tune and LoRA), and the optimizer's state is the bytes
    ``sizing.optimizer_state_bytes`` counts for the trained tensors: 8-bit moments, factored Adafactor rows."""
    from finetuning.training.sizing import optimizer_state_bytes, trained_shapes

    settings = make_settings(tmp_path, tmp_path, OPTIMIZER=name, FINETUNE_METHOD=method, LEARNING_RATE=1e-3)
    model, optimizer, losses = _train_copy(tiny_step_parts, settings)
    assert type(optimizer).__name__ == OPTIMIZER_CLASSES[name]
    assert losses[-1] < 0.95 * losses[0], losses
    shared_maps = SHARED_QUANTILE_MAP_BYTES if name == "adamw_8bit" else 0
    assert _state_bytes(optimizer) == optimizer_state_bytes(trained_shapes(model), name) + shared_maps


def test_8bit_states_are_a_quarter_of_adamw_and_adafactor_is_factored():
    """On the 1.7B's trained tensors: 8-bit AdamW's moments are ~1/4 of AdamW's float32 ones (block scales and
    small tensors add ~1 %), Adafactor keeps a row and a column per matrix (well under 1 %)."""
    from finetuning.published_models import MODEL_1_7B, model_config
    from finetuning.training.sizing import model_shape, optimizer_state_bytes

    shapes = model_shape(model_config(MODEL_1_7B)).trained_shapes
    adamw = optimizer_state_bytes(shapes, "adamw")
    assert adamw == 8 * sum(math.prod(s) for s in shapes)
    assert 0.25 < optimizer_state_bytes(shapes, "adamw_8bit") / adamw < 0.26
    assert optimizer_state_bytes(shapes, "adafactor") / adamw < 0.01


@pytest.mark.parametrize("name", ["adamw_8bit", "adafactor"])
def test_a_state_dict_round_trip_continues_to_identical_weights(tiny_step_parts, tmp_path, name):
    """Save the optimizer's state dict mid-run (through a file, as a resume does), load it into a fresh optimizer
    over a copy of the weights: the next updates give bit-identical weights to the uninterrupted run."""
    settings = make_settings(tmp_path, tmp_path, OPTIMIZER=name, LEARNING_RATE=1e-3)
    model, optimizer, _ = _train_copy(tiny_step_parts, settings, steps=3)
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    resumed = _copy(model)
    resumed.speaker_encoder.requires_grad_(False)
    resumed_optimizer = make_optimizer(resumed, settings)
    resumed_optimizer.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=False))
    from finetuning.training.step import TalkerStep

    speaker = torch.randn(2, model.config.talker_config.hidden_size, generator=torch.Generator().manual_seed(1))
    for net, opt in ((model, optimizer), (resumed, resumed_optimizer)):
        step = TalkerStep(net, speaker)
        for _ in range(3):
            step(tiny_step_parts[1])[0].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    for (key, a), b in zip(model.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), key


def test_8bit_without_bitsandbytes_and_non_adamw_under_fsdp_are_refused_in_one_line(tmp_path, monkeypatch):
    from finetuning.training import optim

    settings = make_settings(tmp_path, tmp_path, OPTIMIZER="adamw_8bit")
    optim.check_optimizer(settings, "NO")  # installed here: allowed
    real_find_spec = optim.importlib.util.find_spec
    monkeypatch.setattr(
        optim.importlib.util, "find_spec", lambda n, *a: None if n == "bitsandbytes" else real_find_spec(n, *a)
    )
    with pytest.raises(optim.OptimizerError, match=r"OPTIMIZER=adamw_8bit needs the bitsandbytes package: `uv sync"):
        optim.check_optimizer(settings, "NO")
    with pytest.raises(optim.OptimizerError, match="OPTIMIZER=adafactor does not run under FSDP"):
        optim.check_optimizer(make_settings(tmp_path, tmp_path, OPTIMIZER="adafactor"), "FSDP")
    optim.check_optimizer(make_settings(tmp_path, tmp_path), "FSDP")
