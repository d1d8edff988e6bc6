"""The optimizer: fused AdamW where torch has the kernel, the multi-tensor path elsewhere, the same update."""

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
