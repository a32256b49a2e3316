"""The levers of nanochat's recipe (issue 28): each off by default (the default model is the one
before them), each doing what it says, a run with all of them resuming bit for bit, and the
export refusing, in one line naming the option, what the Llama architecture cannot hold."""

from __future__ import annotations

import dataclasses
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from train_support import losses_by_step, new_run, straight_and_resumed

from simone.checkpoint import save_checkpoint
from simone.cli import main
from simone.config import ConfigError, analytic_param_count, load_config, preset, save_config, value_embedding_layers
from simone.data.loader import BatchLoader
from simone.data.shards import TokenShard
from simone.model import build_model
from simone.model.attention import CausalSelfAttention
from simone.model.layers import rope_tables
from simone.train.optim import build_optimizer
from simone.train.schedule import LRSchedule, lr_at

ALL_MODEL_LEVERS = dict(mlp="relu2", qk_norm=True, value_embeddings=1, zero_init_proj=True, logit_softcap=15.0)
ALL_TRAIN_LEVERS = dict(optimizer="muon", muon_shape_scaling=True, muon_lr_scale=10.0, head_lr_scale=2.0,
                        lr_schedule="wsd", decay_fraction=0.65, min_lr_ratio=0.05, doc_aligned=True)


def tiny(**levers):
    return dataclasses.replace(preset("tiny").model, **levers)


def model(**levers):
    torch.manual_seed(0)
    return build_model(tiny(**levers))


def tokens(batch=2, length=16, seed=1):
    return torch.randint(0, 512, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_the_default_model_is_the_one_before_the_levers():
    """Figures of the tiny preset's model at seed 0, taken before the levers were added (tolerances
    cover another CPU's rounding; any change of init order or computation moves them by far more)."""
    m = model()
    x = tokens()
    with torch.no_grad():
        logits, loss = m(x, x)
    _, train_loss = m.train()(x, x)
    train_loss.backward()
    assert loss.item() == pytest.approx(5.087048053741455, rel=1e-5)
    assert train_loss.item() == pytest.approx(5.087048053741455, rel=1e-5)
    assert logits[0, :2, :3].flatten().tolist() == pytest.approx(
        [0.32449692487716675, 0.0387842059135437, -0.0043997131288051605,
         0.30371758341789246, -0.22300493717193604, -0.29773297905921936], abs=1e-5)
    assert m.layers[0].attention.wqkv.weight.grad.abs().sum().item() == pytest.approx(27.873638153076172, rel=1e-4)
    assert sum(p.double().sum().item() for p in m.parameters()) == pytest.approx(312.31896733731236, rel=1e-6)
    assert not list(m.value_embeds.parameters())


@pytest.mark.parametrize("levers", [dict(mlp="relu2"), dict(value_embeddings=1), dict(mlp="relu2", ffn_hidden=96),
                                    dict(ALL_MODEL_LEVERS, tie_embeddings=False, n_kv_heads=2)])
def test_the_analytic_parameter_count_follows_the_levers(levers):
    assert model(**levers).num_params() == analytic_param_count(tiny(**levers))


def test_relu2_is_two_matrices_and_a_squared_relu():
    m = model(mlp="relu2")
    ff = m.layers[0].feed_forward
    assert ff.w1.weight.shape == (256, 64) and ff.w2.weight.shape == (64, 256) and not hasattr(ff, "w13")
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.allclose(ff(x), (x @ ff.w1.weight.t()).clamp(min=0).pow(2) @ ff.w2.weight.t(), atol=1e-5)
        negative = -(x @ ff.w1.weight.t()).abs()  # every pre-activation below zero: nothing comes through
        assert torch.count_nonzero(ff.w2(F.relu(negative).square())) == 0


def test_qk_norm_makes_attention_blind_to_the_scale_of_each_heads_queries_and_keys():
    torch.manual_seed(0)
    x, rope = torch.randn(2, 8, 64), tuple(t[:8] for t in rope_tables(16, 8))
    for qk_norm_eps, blind in ((1e-6, True), (None, False)):
        attn = CausalSelfAttention(64, 4, 4, qk_norm_eps=qk_norm_eps).eval()
        with torch.no_grad():
            before = attn(x, rope)
            attn.wqkv.weight[16:32] *= 5.0  # query head 1
            attn.wqkv.weight[64 + 32 : 64 + 48] *= 0.2  # key head 2
            after = attn(x, rope)
        assert torch.allclose(before, after, atol=1e-4) == blind


def test_value_embeddings_sit_on_every_other_layer_from_the_last():
    assert value_embedding_layers(tiny(n_layers=12, value_embeddings=6)) == [1, 3, 5, 7, 9, 11]
    assert value_embedding_layers(tiny(n_layers=5, value_embeddings=2)) == [2, 4]
    m = model(n_layers=4, value_embeddings=2, n_kv_heads=2)
    assert sorted(m.value_embeds) == ["1", "3"] and m.value_embeds["1"].weight.shape == (512, 32)
    assert [b.attention.ve_gate is not None for b in m.layers] == [False, True, False, True]
    kinds = {id(p): kind for kind, p in m.param_kinds()}
    assert kinds[id(m.value_embeds["3"].weight)] == "embedding"
    with pytest.raises(ConfigError, match="model.value_embeddings=3"):
        model(n_layers=4, value_embeddings=3)


def test_a_value_embedding_is_added_to_the_values_through_a_gate_that_starts_at_one():
    """q = k = v = 0 (wqkv zero): every query attends evenly to the positions so far, so the
    output is wo(running mean of gate · value embedding); the gate, 2·sigmoid(0), is 1 at the
    model's init (its weights zero)."""
    torch.manual_seed(0)
    attn = CausalSelfAttention(64, 4, 2, value_gate_channels=32).eval()
    x, ve = torch.randn(1, 5, 64), torch.randn(1, 5, 32)
    assert all(torch.count_nonzero(b.attention.ve_gate.weight) == 0 for b in model(value_embeddings=1).layers[1:])
    with torch.no_grad():
        attn.wqkv.weight.zero_()
        attn.ve_gate.weight.zero_()
        assert torch.count_nonzero(attn(x)) == 0  # without the value embedding: nothing
        running_mean = ve.cumsum(1) / torch.arange(1, 6).view(1, 5, 1)
        want = attn.wo(running_mean.view(1, 5, 2, 16).repeat_interleave(2, dim=2).reshape(1, 5, 64))
        assert torch.allclose(attn(x, value_embedding=ve), want, atol=1e-5)
        attn.ve_gate.weight.fill_(1.0)
        gate = 2 * torch.sigmoid(x[..., :32].sum(-1, keepdim=True))  # the same gate for both kv heads here
        want = attn.wo(((gate * ve).cumsum(1) / torch.arange(1, 6).view(1, 5, 1)).view(1, 5, 2, 16)
                       .repeat_interleave(2, dim=2).reshape(1, 5, 64))
        assert torch.allclose(attn(x, value_embedding=ve), want, atol=1e-5)


def test_zero_init_projections_make_every_block_start_as_the_identity():
    m = model(zero_init_proj=True).eval()
    for block in m.layers:
        assert torch.count_nonzero(block.attention.wo.weight) == 0 and torch.count_nonzero(block.feed_forward.w2.weight) == 0
        assert torch.count_nonzero(block.attention.wqkv.weight) > 0
    x = tokens()
    with torch.no_grad():
        assert torch.allclose(m(x)[0], m.output(m.norm(m.tok_embeddings(x))), atol=1e-6)


def test_the_soft_cap_bounds_the_logits_and_the_fused_loss_matches_autograd():
    capped, plain = model(logit_softcap=0.5), model()
    capped.load_state_dict(plain.state_dict())
    x = tokens()
    with torch.no_grad():
        raw, cap = plain(x)[0], capped(x)[0]
    assert raw.abs().max() > 1.0 and cap.abs().max() < 0.5
    assert torch.allclose(cap, 0.5 * torch.tanh(raw / 0.5), atol=1e-6)
    targets = x.clone()
    targets[0, :4] = -1
    _, fused = capped.train()(x, targets)  # the fused loss (no logits kept)
    fused.backward()
    fused_grads = [p.grad.clone() for p in capped.parameters()]
    capped.zero_grad()
    logits = 0.5 * torch.tanh(capped.output(capped.norm(capped_hidden(capped, x))) / 0.5)
    reference = F.cross_entropy(logits.view(-1, 512), targets.view(-1), ignore_index=-1)
    reference.backward()
    assert fused.item() == pytest.approx(reference.item(), rel=1e-6)
    for got, p in zip(fused_grads, capped.parameters()):
        assert torch.allclose(got, p.grad, atol=1e-6)


def capped_hidden(m, x):
    h = m.tok_embeddings(x)
    rope = (m.rope_cos[: x.size(1)], m.rope_sin[: x.size(1)])
    for block in m.layers:
        h = block(h, rope, None, 0)
    return h


def test_with_levers_generation_takes_the_module_path_and_the_cache_changes_nothing():
    m = model(**ALL_MODEL_LEVERS).eval()
    with torch.no_grad():  # zero-init would make the first steps trivially equal: give the blocks weight
        for block in m.layers:
            block.attention.wo.weight.normal_(0, 0.05)
            block.feed_forward.w2.weight.normal_(0, 0.05)
    prompt = tokens(2, 6)
    cached = torch.cat(list(m.generate(prompt, 10, temperature=0)), 1)
    recomputed = torch.cat(list(m.generate(prompt, 10, temperature=0, use_cache=False)), 1)
    assert torch.equal(cached, recomputed)


@pytest.mark.parametrize("field, value, message", [
    ("mlp", "gelu", "model.mlp='gelu'"), ("logit_softcap", 0.0, "model.logit_softcap=0.0"),
    ("value_embeddings", -1, "model.value_embeddings=-1")])
def test_bad_lever_values_are_refused_naming_the_field(field, value, message):
    with pytest.raises(ConfigError, match=message):
        build_model(tiny(**{field: value}))


def test_the_gpt2_baseline_refuses_the_levers():
    with pytest.raises(ConfigError, match=r"model.qk_norm=true: the Llama-style model only"):
        build_model(tiny(arch="gpt2", qk_norm=True))


# ----------------------------------------------------------------------------- training levers


def test_the_untied_head_gets_its_own_learning_rate_and_muon_its_per_shape_scaling():
    m = model(tie_embeddings=False)
    opt = build_optimizer(m, "muon", lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), device_type="cpu",
                          head_lr_scale=3.0, muon_shape_scaling=True)
    head = [g for g in opt.adamw.param_groups if g.get("lr_scale") == 3.0]
    assert len(head) == 1 and head[0]["params"] == [m.output.weight] and head[0]["lr"] == pytest.approx(3e-3)
    assert {g["adjust_lr_fn"] for g in opt.muon.param_groups} == {"original"}
    default = build_optimizer(m, "muon", lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), device_type="cpu")
    assert len(default.adamw.param_groups) == 2 and default.muon.param_groups[0]["adjust_lr_fn"] == "match_rms_adamw"


def test_muon_per_shape_scaling_sizes_each_update_by_its_matrix_shape():
    """The same gradient on a [256, 64] matrix: nanochat's scaling moves it by sqrt(256/64) = 2 x lr
    x the orthogonalised update, the AdamW-matched one by 0.2 x sqrt(256) = 3.2 x (ratio 0.625)."""
    moves = {}
    for shape_scaling in (True, False):
        m = model(mlp="relu2")
        w = m.layers[0].feed_forward.w1.weight
        before = w.detach().clone()
        opt = build_optimizer(m, "muon", lr=1e-2, weight_decay=0.0, betas=(0.9, 0.95), device_type="cpu",
                              muon_lr_scale=1.0, muon_shape_scaling=shape_scaling)
        torch.manual_seed(3)
        w.grad = torch.randn_like(w)
        opt.muon.step()
        moves[shape_scaling] = (w.detach() - before).norm().item()
    assert moves[True] / moves[False] == pytest.approx(2.0 / 3.2, rel=1e-3)


def test_the_long_warm_down_holds_the_peak_then_decays_over_the_last_share_of_the_steps():
    wsd = LRSchedule(1.0, 10, 100, 0.05, decay_fraction=0.65, shape="wsd")
    assert wsd.lr(5) == pytest.approx(6 / 11)  # warmup as before
    assert [wsd.lr(s) for s in (10, 20, 34)] == [1.0, 1.0, 1.0]  # stable until step 35
    assert 0.05 < wsd.lr(36) < wsd.lr(35) <= 1.0 and wsd.lr(99) == pytest.approx(0.05, abs=1e-3)
    assert wsd.lr(67) == pytest.approx(0.05 + 0.95 * 0.5, abs=0.02)  # half way down, half way through
    cosine = LRSchedule(1.0, 10, 100, 0.05)
    assert [cosine.lr(s) for s in range(120)] == [lr_at(s, 1.0, 10, 100, 0.05) for s in range(120)]
    with pytest.raises(ConfigError, match="train.lr_schedule='linear'"):
        LRSchedule(1.0, 10, 100, 0.05, shape="linear")


def test_document_aligned_windows_open_every_document_and_start_at_one_or_k_windows_in(template):
    shard = TokenShard(template / "data", "train")
    doc_starts = [0] + [int(i) + 1 for i in np.flatnonzero(np.asarray(shard.tokens) == shard.eod_id)][:-1]
    loader = BatchLoader(shard, 4, 64, seed=0, doc_aligned=True)
    starts = loader.window_starts(np.arange(loader.n_windows))
    assert set(doc_starts) <= set(starts.tolist())
    doc_of = np.searchsorted(doc_starts, starts, side="right") - 1
    assert all((s - doc_starts[d]) % 64 == 0 for s, d in zip(starts, doc_of))
    x, y = loader.next_batch()
    assert torch.equal(x[:, 1:], y[:, :-1])
    first = starts[loader.window_ids(0, 0)]
    assert torch.equal(x[:, 0], torch.from_numpy(np.asarray(shard.tokens)[first].astype(np.int64)))


def test_with_windows_longer_than_every_document_each_batch_starts_right_after_an_end_of_document(template):
    shard = TokenShard(template / "data", "train")
    tokens_ = np.asarray(shard.tokens)
    longest = int(np.diff(np.flatnonzero(tokens_ == shard.eod_id)).max())
    loader = BatchLoader(shard, 2, longest + 1, seed=0, doc_aligned=True)
    for _ in range(loader.batches_per_epoch):
        starts = loader.window_starts(loader.window_ids(loader.epoch, loader.position))
        loader.next_batch()
        assert all(s == 0 or tokens_[s - 1] == shard.eod_id for s in starts)
    state = loader.state_dict()
    plain = BatchLoader(shard, 2, longest + 1, seed=0)
    with pytest.raises(ValueError, match="doc_aligned"):
        plain.load_state_dict(state)


@pytest.fixture
def lever_template(template, tmp_path):
    """The tiny prepared run with every model lever on in its config.json."""
    dest = tmp_path / "lever_template"
    shutil.copytree(template, dest)
    cfg = load_config(dest / "config.json")
    for key, value in ALL_MODEL_LEVERS.items():
        setattr(cfg.model, key, value)
    cfg.model.tie_embeddings = False
    save_config(cfg, dest / "config.json")
    return dest


def test_a_run_with_every_lever_on_learns_and_resumes_bit_for_bit(lever_template, tmp_path, monkeypatch):
    run_a, run_b, stopped, resumed = straight_and_resumed(
        lever_template, tmp_path, monkeypatch, 6, batch_size=8, eval_every=0, checkpoint_every=4, log_every=1,
        num_epochs=2, max_steps=12, warmup_steps=2, **ALL_TRAIN_LEVERS)
    assert stopped.steps == 6 and resumed.steps == 12
    a, b = losses_by_step(run_a), losses_by_step(run_b)
    assert sorted(a) == sorted(b) == list(range(1, 13)) and [a[s] for s in a] == [b[s] for s in a]
    assert all(math.isfinite(v) for v in a.values()) and a[12] < a[1]


# ----------------------------------------------------------------------------- export


def saved_run(template, dest, **levers):
    cfg, run = new_run(template, dest)
    for key, value in levers.items():
        setattr(cfg.model, key, value)
    save_config(cfg, run.config)
    torch.manual_seed(0)
    save_checkpoint(run.checkpoints, 1, build_model(cfg.model).state_dict(), {}, cfg.to_dict(), best=True)
    return run.root


@pytest.mark.parametrize("fmt, levers, named", [
    ("hf", dict(qk_norm=True), "model.qk_norm=true"),
    ("gguf", dict(mlp="relu2"), "model.mlp=relu2"),
    ("hf", ALL_MODEL_LEVERS, "model.mlp=relu2, model.qk_norm=true, model.value_embeddings=1, model.logit_softcap=15.0"),
])
def test_export_refuses_what_llama_cannot_hold_in_one_line(template, tmp_path, capsys, fmt, levers, named):
    run = saved_run(template, tmp_path / "run", **levers)
    out = tmp_path / ("out.gguf" if fmt == "gguf" else "hf")
    assert main(["export", "--model", str(run), "--format", fmt, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert named in err and len(err.splitlines()) == 1
    assert not out.exists() or not any(out.iterdir())


def test_zero_init_projections_export_like_any_llama_model(template, tmp_path):
    run = saved_run(template, tmp_path / "run", zero_init_proj=True, tie_embeddings=False)
    assert main(["export", "--model", str(run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "model.safetensors").exists()
