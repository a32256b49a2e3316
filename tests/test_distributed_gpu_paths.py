"""The GPU-side paths of the trainer (issue 7, part 5), on a CPU: each is picked by a capability
check, and where the CPU has the path too (bf16 autocast, fused AdamW, torch.compile, the flash
SDPA kernel) it runs here and matches float32 eager within a tolerance."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from simone.config import preset
from simone.model import build_model
from simone.train import precision
from simone.train.metrics import peak_flops
from simone.train.optim import build_optimizer, optimizer_skips_on_device
from simone.train.precision import autocast_dtype
from simone.train.trainer import train
from train_support import losses_by_step, new_run

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)
STEPS = dict(max_steps=4, eval_every=100, checkpoint_every=100, log_every=1)


def tiny_model() -> torch.nn.Module:
    cfg = preset("tiny").model
    cfg.vocab_size = 320
    torch.manual_seed(0)
    return build_model(cfg)


# ----------------------------------------------------------------------------- capability checks


def test_autocast_dtype_follows_the_device_capabilities(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert autocast_dtype("auto", CUDA) is torch.bfloat16  # H100/H200/A100
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert autocast_dtype("auto", CUDA) is torch.float16  # V100/T4: fp16 (with a grad scaler)
    with pytest.raises(ValueError, match="no bf16 support"):
        autocast_dtype("bfloat16", CUDA)
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: True)
    assert autocast_dtype("auto", CPU) is torch.bfloat16  # AMX / AVX512-BF16
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: False)
    assert autocast_dtype("auto", CPU) is None  # emulated bf16 is slower than float32
    assert autocast_dtype("bfloat16", CPU) is torch.bfloat16  # asked for: honoured
    assert autocast_dtype("float32", CUDA) is None
    with pytest.raises(ValueError, match="choose auto"):
        autocast_dtype("fp8", CPU)


def test_fused_adamw_is_used_on_cpu_and_skips_bad_steps_on_the_device():
    model = tiny_model()
    fused = build_optimizer(model, "adamw", lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), device_type="cpu")
    plain = build_optimizer(model, "adamw", lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), device_type="cpu", fused=False)
    assert fused.defaults["fused"] and optimizer_skips_on_device(fused)
    assert not plain.defaults.get("fused") and not optimizer_skips_on_device(plain)
    # a found_inf step leaves the weights alone, without a host sync
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    fused.found_inf = torch.ones(())
    fused.step()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    fused.found_inf = torch.zeros(())
    fused.step()
    assert not torch.equal(before["layers.0.attention.wqkv.weight"], model.layers[0].attention.wqkv.weight)


def test_peak_flops_comes_from_the_gpu_table_by_name(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "NVIDIA H200")
    assert peak_flops(CUDA, torch.bfloat16) == 989e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Some Future GPU")
    assert peak_flops(CUDA, torch.bfloat16) is None  # unknown: no MFU rather than a wrong one


def test_training_attention_is_eligible_for_the_flash_kernel(monkeypatch):
    """The training forward calls SDPA with is_causal and no mask (what CUDA's flash kernel
    needs), and forcing the flash kernel (the CPU one here) gives the math kernel's loss."""
    import simone.model.attention as attention

    model = tiny_model()
    x = torch.randint(0, 320, (2, 64), generator=torch.Generator().manual_seed(1))
    calls, sdpa = [], F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append((kwargs.get("attn_mask"), kwargs.get("is_causal")))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
    model(x, x)
    monkeypatch.undo()
    assert calls == [(None, True)] * len(model.layers)
    with sdpa_kernel(SDPBackend.MATH):
        _, loss_math = model(x, x)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises "No available kernel" if ineligible
        _, loss_flash = model(x, x)
    assert loss_flash.item() == pytest.approx(loss_math.item(), abs=1e-5)
    # the restriction bites: a kernel this CPU does not have is refused, not silently replaced
    q = torch.randn(1, 2, 8, 16)
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION), pytest.raises(RuntimeError, match="No viable backend"):
        F.scaled_dot_product_attention(q, q, q, is_causal=True)


def test_compile_is_skipped_with_a_reason_when_no_compiler_is_installed(template, tmp_path, monkeypatch):
    import shutil

    from torch._dynamo.utils import counters

    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    assert "no C++ compiler" in precision.compiler_missing()
    cfg, run = new_run(template, tmp_path / "run", compile=True, max_steps=2, eval_every=100,
                       checkpoint_every=100, log_every=1)
    counters.clear()
    train(cfg, run)
    assert sorted(losses_by_step(run)) == [1, 2]  # trained, eager
    assert counters["stats"]["unique_graphs"] == 0
    assert "training runs eager" in run.log.read_text(encoding="utf-8")


# ----------------------------------------------------------------------------- the paths, run


def test_bf16_autocast_training_matches_float32(template, tmp_path):
    cfg32, run32 = new_run(template, tmp_path / "f32", dtype="float32", **STEPS)
    cfg16, run16 = new_run(template, tmp_path / "bf16", dtype="bfloat16", **STEPS)
    train(cfg32, run32)
    train(cfg16, run16)
    a, b = losses_by_step(run32), losses_by_step(run16)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert a != b  # bf16 really ran
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=2e-2), step


@pytest.mark.slow
def test_compiled_training_matches_eager(template, tmp_path):
    """train.compile=True (inductor, C++ kernels on a CPU): the same losses within 1e-4."""
    cfg_e, run_e = new_run(template, tmp_path / "eager", **STEPS)
    cfg_c, run_c = new_run(template, tmp_path / "compiled", compile=True, **STEPS)
    from torch._dynamo.utils import counters

    train(cfg_e, run_e)
    counters.clear()
    train(cfg_c, run_c)
    assert counters["stats"]["unique_graphs"] > 0  # the model really went through the compiler
    a, b = losses_by_step(run_e), losses_by_step(run_c)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-4), step
