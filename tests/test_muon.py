"""`train.optimizer=muon`: Muon for the blocks' matrices, AdamW for the rest. The split covers
every parameter once, the loss falls on the tiny preset, and a stopped run resumes bit for bit
(the optimizer state of both halves round-trips through the checkpoint)."""

from __future__ import annotations

import pytest
import torch

from simone.config import preset
from simone.model import build_model
from simone.train.optim import (
    Float32Muon,
    MuonWithAdamW,
    OptimizerConfigError,
    build_optimizer,
    hidden_matrices,
    set_lr,
)
from simone.train.trainer import train
from train_support import losses_by_step, new_run, read_metrics, straight_and_resumed


def tiny_model(arch: str = "llama") -> torch.nn.Module:
    cfg = preset("tiny").model
    cfg.arch = arch
    torch.manual_seed(0)
    return build_model(cfg)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_muon_takes_the_block_matrices_and_adamw_the_rest(arch):
    model = tiny_model(arch)
    opt = build_optimizer(model, "muon", lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), device_type="cpu")
    assert isinstance(opt, MuonWithAdamW)
    muon_ids = [id(p) for g in opt.muon.param_groups for p in g["params"]]
    adamw_ids = [id(p) for g in opt.adamw.param_groups for p in g["params"]]
    assert sorted(muon_ids + adamw_ids) == sorted(id(p) for p in model.parameters())  # each once
    assert muon_ids == [id(p) for p in hidden_matrices(model)] and len(muon_ids) >= 2 * 4
    assert id(model.tok_embeddings.weight) in adamw_ids and id(model.output.weight) in adamw_ids
    assert all(p.dim() == 2 for g in opt.muon.param_groups for p in g["params"])
    assert len(opt.param_groups) == len(opt.muon.param_groups) + len(opt.adamw.param_groups)


def test_a_muon_step_moves_each_matrix_by_an_orthogonalised_update():
    """match_rms_adamw: the update of an A x B matrix is 0.2 * lr * sqrt(max(A, B)) times an
    (almost) orthogonal matrix, so its RMS is about 0.2 * lr, whatever the gradient's size
    (AdamW's first step would move every entry by about lr)."""
    model = tiny_model()
    lr = 1e-2
    opt = build_optimizer(model, "muon", lr=lr, weight_decay=0.0, betas=(0.9, 0.95), device_type="cpu",
                          muon_lr_scale=1.0)
    before = [p.detach().clone() for p in hidden_matrices(model)]
    x = torch.randint(0, 512, (2, 16))
    model(x, x)[1].backward()
    opt.step()
    for p, p0 in zip(hidden_matrices(model), before):
        rms = (p.detach() - p0).pow(2).mean().sqrt().item()
        assert 0.1 * lr < rms < 0.3 * lr, (tuple(p.shape), rms / lr)


def test_float32_muon_steps_like_torch_muon_and_shares_its_state():
    """The float32 Newton-Schulz (for CPUs whose bf16 is emulated) gives the update torch's
    bf16 one gives, to bf16's precision; the state dicts are interchangeable."""
    torch.manual_seed(0)
    w0 = torch.randn(96, 64)
    grads = [torch.randn(96, 64) for _ in range(3)]
    params, opts = [], []
    for cls in (torch.optim.Muon, Float32Muon):
        p = torch.nn.Parameter(w0.clone())
        params.append(p)
        opts.append(cls([p], lr=0.01, weight_decay=0.1, adjust_lr_fn="match_rms_adamw"))
    for g in grads:
        for p, opt in zip(params, opts):
            p.grad = g.clone()
            opt.step()
    d_torch, d_ours = params[0].detach() - w0, params[1].detach() - w0
    cos = torch.nn.functional.cosine_similarity(d_torch.flatten(), d_ours.flatten(), dim=0)
    assert cos > 0.995 and abs(d_torch.norm() / d_ours.norm() - 1) < 0.02, (cos, d_torch.norm(), d_ours.norm())
    opts[0].load_state_dict(opts[1].state_dict())
    assert torch.equal(opts[0].state[params[0]]["momentum_buffer"], opts[1].state[params[1]]["momentum_buffer"])


def test_muon_lr_scale_multiplies_only_muons_rate():
    model = tiny_model()
    opt = build_optimizer(model, "muon", lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), device_type="cpu",
                          muon_lr_scale=4.0)
    set_lr(opt, 2e-3)
    assert [g["lr"] for g in opt.muon.param_groups] == [8e-3]
    assert {g["lr"] for g in opt.adamw.param_groups} == {2e-3}
    assert opt.muon.param_groups[0]["weight_decay"] * 8e-3 == pytest.approx(0.1 * 2e-3)  # AdamW's decay


def test_state_round_trips_and_refuses_an_adamw_state():
    model = tiny_model()
    opt = build_optimizer(model, "muon", lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), device_type="cpu")
    x = torch.randint(0, 512, (2, 16))
    for _ in range(2):
        model(x, x)[1].backward()
        opt.step()
        opt.zero_grad()
    saved = opt.state_dict()
    fresh = build_optimizer(model, "muon", lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), device_type="cpu")
    fresh.load_state_dict(saved)
    for a, b in zip(saved["muon"]["state"].values(), fresh.state_dict()["muon"]["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    assert saved["adamw"]["state"][0]["step"] == fresh.state_dict()["adamw"]["state"][0]["step"] == 2
    adamw = build_optimizer(model, "adamw", lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), device_type="cpu")
    with pytest.raises(OptimizerConfigError, match="same optimizer"):
        fresh.load_state_dict(adamw.state_dict())
    with pytest.raises(OptimizerConfigError, match="choose one of adamw, muon"):
        build_optimizer(model, "sgd", lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), device_type="cpu")


def test_loss_falls_with_muon(template, tmp_path):
    cfg, run = new_run(template, tmp_path / "run", batch_size=16, max_steps=30, num_epochs=2, log_every=1,
                       eval_every=0, checkpoint_every=0, optimizer="muon")
    result = train(cfg, run)
    losses = losses_by_step(run)
    assert result.steps == 30
    first, last = losses[1], sum(losses[s] for s in range(26, 31)) / 5
    assert last < 0.7 * first, (first, last)


def test_muon_run_resumes_bit_for_bit(template, tmp_path, monkeypatch):
    """12 steps straight == 7 steps, SIGTERM, resume to 12: Muon's momentum buffers and AdamW's
    moments come back from the checkpoint exactly."""
    run_a, run_b, stopped, resumed = straight_and_resumed(
        template, tmp_path, monkeypatch, 7, batch_size=16, eval_every=0, checkpoint_every=4, log_every=1,
        num_epochs=2, max_steps=12, optimizer="muon")
    assert stopped.steps == 7 and resumed.steps == 12
    a, b = losses_by_step(run_a), losses_by_step(run_b)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    assert [a[s] for s in a] == [b[s] for s in a]  # bit for bit
    assert [r["step"] for r in read_metrics(run_b, "event") if r["event"] == "resume"] == [7]
