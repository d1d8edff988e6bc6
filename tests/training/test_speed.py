"""Speed levers: fused cross-entropy wiring, torch.compile on CPU, the CPU heap cache, clear errors for missing GPU
packages, and the FLOPs behind ``train/mfu``."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO_ROOT, make_settings

from finetuning.training.speed import (
    ModelFlops,
    SpeedOptionError,
    check_speed_options,
    compile_transformers,
    peak_flops,
    peak_flops_of,
)
from finetuning.training.step import IGNORE_INDEX, TalkerStep, assistant_text, build_talker_inputs, talker_forward


@pytest.fixture(scope="module")
def tiny(tiny_model_dirs):
    """(model, tokenizer) of the tiny ``wide_text`` model (text width != talker width, like 0.6B)."""
    import qwen_tts

    wrapper = qwen_tts.Qwen3TTSModel.from_pretrained(str(tiny_model_dirs["wide_text"]), dtype=torch.float32)
    return wrapper.model, wrapper.processor.tokenizer


def _batch(tokenizer, lengths=(6, 3)):
    gen = torch.Generator().manual_seed(5)
    texts = ["The coffee is too hot.", "Habari."][: len(lengths)]
    return {
        "text_ids": [tokenizer(assistant_text(t), return_tensors="pt")["input_ids"][0] for t in texts],
        "codes": [torch.randint(0, 2048, (n, 16), generator=gen) for n in lengths],
        "speaker": torch.arange(len(lengths)),
        "language": ["auto"] * len(lengths),
    }


def _reference_fused(weight, hidden, targets, bias):
    """What a fused linear + cross-entropy computes, in the argument order of liger-kernel's
    ``LigerFusedLinearCrossEntropyLoss.forward(lin_weight, _input, target, bias)``, without its memory saving."""
    return F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, ignore_index=IGNORE_INDEX)


def test_fused_loss_hook_gets_each_heads_weights_hidden_states_and_targets_and_skips_logits(tiny):
    """The wiring of FUSED_CROSS_ENTROPY on the CPU: ``talker_forward`` hands the fused loss each codec head's
    weight, the hidden states of exactly the scored positions and their targets, so the test's reference loss
    (a plain linear + cross-entropy, standing in for liger-kernel's CUDA kernel, which cannot run here) gives the
    plain path's losses and gradients, and no logits are built. liger-kernel's own numerics are its tests'."""
    model, tokenizer = tiny
    batch = _batch(tokenizer)
    speakers = torch.randn(2, model.config.talker_config.hidden_size, generator=torch.Generator().manual_seed(6))
    results = []
    for fused in (None, _reference_fused):
        inputs = build_talker_inputs(model, batch["text_ids"], batch["codes"], speakers, [None, None])
        out = talker_forward(model, inputs, fused)
        model.zero_grad()
        (out.codec0_loss + out.sub_talker_loss).backward()
        results.append((out, model.talker.code_predictor.lm_head[3].weight.grad.clone()))
    (plain, plain_grad), (fused, fused_grad) = results
    torch.testing.assert_close(fused.codec0_loss, plain.codec0_loss)
    torch.testing.assert_close(fused.sub_talker_loss, plain.sub_talker_loss)
    torch.testing.assert_close(fused_grad, plain_grad)
    assert fused.label_logits is None and fused.sub_talker_logits is None and fused.frame_codec0_logits is None
    model.zero_grad()


def test_compiled_transformers_train_like_eager_on_cpu(tiny_model_dirs):
    """TORCH_COMPILE compiles in place: same losses and gradients as eager, same parameter names (exports).
    Dynamo traces the real model (backend "eager" runs the traced graphs); inductor's C++ code generation of the
    same graphs takes minutes on a small shared CPU."""
    import qwen_tts

    models = [
        qwen_tts.Qwen3TTSModel.from_pretrained(str(tiny_model_dirs["equal"]), dtype=torch.float32) for _ in range(2)
    ]
    tokenizer = models[0].processor.tokenizer
    eager, compiled = (m.model for m in models)
    names = list(dict(compiled.named_parameters()))
    compile_transformers(compiled, backend="eager")
    assert list(dict(compiled.named_parameters())) == names
    speakers = torch.zeros(2, eager.config.talker_config.hidden_size)
    batch = _batch(tokenizer)
    grads = []
    for model in (eager, compiled):
        loss, _ = TalkerStep(model, speakers)(batch)
        loss.backward()
        grads.append((loss.detach(), model.talker.codec_head.weight.grad))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("key", "missing"),
    [("ATTN_IMPLEMENTATION=flash_attention_2", "flash_attn"), ("FUSED_CROSS_ENTROPY=true", "liger_kernel")],
)
def test_gpu_levers_fail_with_one_line_where_they_cannot_run(tmp_path, monkeypatch, key, missing):
    import importlib.util

    name, value = key.split("=")
    settings = make_settings(tmp_path, tmp_path, **{name: value})
    with pytest.raises(SpeedOptionError, match=f"^{key} runs on CUDA GPUs only.*set ") as cpu_error:
        check_speed_options(settings, torch.device("cpu"))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda m, *a: None if m == missing else real_find_spec(m, *a))
    with pytest.raises(SpeedOptionError, match=f"^{key} needs the {missing} package: `uv sync --group") as error:
        check_speed_options(settings, torch.device("cuda"))
    assert "\n" not in str(cpu_error.value) + str(error.value)
    check_speed_options(make_settings(tmp_path, tmp_path), torch.device("cpu"))  # the defaults run anywhere


def test_fused_cross_entropy_refuses_the_auxiliary_losses(tmp_path):
    from finetuning.settings import SettingsError

    with pytest.raises(SettingsError, match="FUSED_CROSS_ENTROPY.*USE_AUXILIARY_LOSSES=true"):
        make_settings(tmp_path, tmp_path, FUSED_CROSS_ENTROPY="true", USE_AUXILIARY_LOSSES="true")


def test_model_flops_match_torch_flop_counter(tiny):
    """6 x weights per token agrees with torch's own count of a forward + backward step (one utterance, so no
    padding), within what the attention scores and the loss add."""
    from torch.utils.flop_counter import FlopCounterMode

    model, tokenizer = tiny
    batch = _batch(tokenizer, lengths=(40,))
    step = TalkerStep(model, torch.zeros(1, model.config.talker_config.hidden_size))
    with FlopCounterMode(display=False) as counter:
        loss, out = step(batch)
        loss.backward()
    model.zero_grad()
    estimate = ModelFlops(model).of(int(out.attention_mask.sum()), 40)
    assert 0.8 < estimate / counter.get_total_flops() < 1.05


def test_peak_flops_table():
    assert peak_flops_of("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_of("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_of("NVIDIA A10G") == 70e12
    assert peak_flops_of("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops_of("Some Future GPU") is None
    assert peak_flops(torch.device("cpu")) is None  # no train/mfu on CPU


HEAP_PROBE = """
import ctypes, json, sys
import torch
from finetuning.training.speed import keep_freed_memory

class MallInfo2(ctypes.Structure):
    names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
    _fields_ = [(name, ctypes.c_size_t) for name in names.split()]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
applied = keep_freed_memory() if sys.argv[1] == "on" else None
block = torch.empty(5_000_000)  # 20 MB, the size of a step's logits or their gradient
held = libc.mallinfo2()
del block
freed = libc.mallinfo2()
print(json.dumps({"applied": applied, "mmapped_with_block": held.hblkhd, "heap_with_block": held.arena,
                  "heap_after_free": freed.arena}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_cpu_heap_cache_serves_step_sized_blocks_from_a_heap_that_is_never_trimmed():
    """CPU_HEAP_CACHE: a 20 MB tensor comes from the heap and its memory stays there once freed, where glibc's
    default gives it fresh mmap pages (faulted in again at every step)."""

    def probe(mode: str) -> dict:
        proc = subprocess.run(
            [sys.executable, "-c", HEAP_PROBE, mode], capture_output=True, text=True, cwd=REPO_ROOT, check=True
        )
        return json.loads(proc.stdout.strip().splitlines()[-1])

    default, cached = probe("off"), probe("on")
    assert default["mmapped_with_block"] >= 20_000_000  # the control: without it the block is mmapped
    assert cached["applied"] is True
    assert cached["mmapped_with_block"] < 20_000_000
    assert cached["heap_with_block"] >= 20_000_000
    assert cached["heap_after_free"] == cached["heap_with_block"]
