"""`train.embed_lr_scale`: the token embedding (and the tied output head) learns at a multiple of
the schedule's rate, under AdamW and under Muon's AdamW half; a run with it resumes bit for bit,
and a checkpoint written without it still loads (two groups, as before)."""

from __future__ import annotations

import pytest
import torch
from train_support import losses_by_step, straight_and_resumed

from simone.config import preset
from simone.model import build_model
from simone.train import trainer as trainer_module
from simone.train.optim import build_optimizer, set_lr


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(preset("tiny").model)


def adamw_groups(opt) -> list[dict]:
    return opt.adamw.param_groups if hasattr(opt, "adamw") else opt.param_groups


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_the_embedding_gets_its_own_rate_and_every_parameter_stays_in_one_group(name):
    model = tiny_model()
    opt = build_optimizer(model, name, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), device_type="cpu",
                          embed_lr_scale=5.0)
    set_lr(opt, 2e-3)
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())  # each once
    embedding = [g for g in adamw_groups(opt) if any(p is model.tok_embeddings.weight for p in g["params"])]
    assert len(embedding) == 1 and embedding[0]["params"] == [model.tok_embeddings.weight]
    assert embedding[0]["lr"] == pytest.approx(1e-2) and embedding[0]["weight_decay"] == 0.1
    assert {g["lr"] for g in adamw_groups(opt) if g is not embedding[0]} == {2e-3}
    plain = build_optimizer(model, name, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), device_type="cpu")
    assert len(adamw_groups(plain)) == 2  # unchanged without the option: old checkpoints load


def test_a_first_adamw_step_moves_the_embedding_by_its_scaled_rate():
    """Adam's first step moves each entry with a gradient by about lr (the update is m/sqrt(v) =
    sign(g)); the embedding's rows that saw a token move by about embed_lr_scale x lr."""
    model = tiny_model()
    lr, scale = 1e-3, 4.0
    opt = build_optimizer(model, "adamw", lr=lr, weight_decay=0.0, betas=(0.9, 0.95), device_type="cpu",
                          embed_lr_scale=scale)
    emb0, w0 = model.tok_embeddings.weight.detach().clone(), model.layers[0].attention.wo.weight.detach().clone()
    x = torch.randint(0, 512, (2, 16))
    model(x, x)[1].backward()
    opt.step()
    seen = torch.unique(x)  # tied head: every row gets a gradient; the input rows surely do
    emb_move = (model.tok_embeddings.weight.detach() - emb0)[seen].abs().median().item()
    w_move = (model.layers[0].attention.wo.weight.detach() - w0).abs().median().item()
    assert emb_move == pytest.approx(scale * lr, rel=0.05) and w_move == pytest.approx(lr, rel=0.05)


def test_a_run_with_it_uses_it_and_resumes_bit_for_bit(template, tmp_path, monkeypatch):
    built = []
    real = trainer_module.new_optimizer
    monkeypatch.setattr(trainer_module, "new_optimizer", lambda *a: built.append(real(*a)) or built[-1])
    run_a, run_b, stopped, resumed = straight_and_resumed(
        template, tmp_path, monkeypatch, 6, batch_size=16, eval_every=0, checkpoint_every=4, log_every=1,
        num_epochs=2, max_steps=10, embed_lr_scale=3.0)
    scaled = [g for g in built[0].param_groups if g.get("lr_scale") == 3.0]
    assert len(scaled) == 1 and scaled[0]["lr"] == pytest.approx(3.0 * min(g["lr"] for g in built[0].param_groups))
    assert stopped.steps == 6 and resumed.steps == 10
    a, b = losses_by_step(run_a), losses_by_step(run_b)
    assert sorted(a) == sorted(b) == list(range(1, 11)) and [a[s] for s in a] == [b[s] for s in a]
