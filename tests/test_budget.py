"""`--budget-minutes`: the shape rule (simone/train/budget.py) and its wiring into `simone run`."""

from __future__ import annotations

import pytest

from simone.config import analytic_param_count, preset
from simone.train.budget import (
    BudgetShape,
    apply_budget,
    model_for_depth,
    probe_tokens_per_s,
    shape_for_budget,
    training_flops_per_token,
)

VOCAB = 4096
# a 4 layers x 256 model at ~9k tokens/s: what a 2-core CPU with bf16 units measures
PROBE_FLOPS = training_flops_per_token(model_for_depth(4, VOCAB))
PROBE_TPS = 9000.0


def rule(minutes: float, **kw) -> BudgetShape:
    return shape_for_budget(minutes, PROBE_TPS, PROBE_FLOPS, VOCAB, **kw)


def test_family_is_width_64_per_layer_with_heads_of_64():
    m = model_for_depth(4, VOCAB)
    assert (m.n_layers, m.dim, m.n_heads, m.max_seq_len) == (4, 256, 4, 256)
    assert model_for_depth(12, VOCAB).max_seq_len == 1024 and model_for_depth(2, VOCAB).max_seq_len == 128


def test_the_chosen_shape_is_the_deepest_that_keeps_the_ratio():
    s = rule(10.0)
    assert s.tokens_per_param >= 20.0
    deeper = model_for_depth(s.n_layers + 1, VOCAB)
    tps = PROBE_TPS * PROBE_FLOPS / training_flops_per_token(deeper)
    assert tps * 10 * 60 * 0.85 / analytic_param_count(deeper) < 20.0  # one layer more breaks the ratio
    assert s.params == analytic_param_count(model_for_depth(s.n_layers, VOCAB))
    assert s.tokens == pytest.approx(s.tokens_per_s * 10 * 60 * 0.85, rel=1e-6)


def test_more_time_or_a_faster_machine_gives_a_bigger_model():
    depths = [rule(m).n_layers for m in (5, 60, 600, 6000)]
    assert depths == sorted(depths) and depths[-1] > depths[0]
    fast = shape_for_budget(10.0, 100 * PROBE_TPS, PROBE_FLOPS, VOCAB)
    assert fast.n_layers > rule(10.0).n_layers and fast.max_seq_len >= rule(10.0).max_seq_len


def test_a_lower_ratio_allows_a_bigger_model():
    assert rule(10.0, tokens_per_param=2.0).n_layers > rule(10.0, tokens_per_param=20.0).n_layers


def test_a_small_corpus_caps_the_tokens_and_so_the_model():
    free = rule(600.0)
    capped = rule(600.0, corpus_tokens=1_000_000, max_epochs=4.0)
    assert capped.tokens == 4_000_000 and capped.n_layers < free.n_layers
    assert rule(0.5).n_layers == 2  # never below min_depth, even when nothing keeps the ratio


def test_batch_gives_about_the_target_steps_in_micro_batches_that_fit():
    s = rule(60.0, target_steps=500, max_micro_batch=8)
    assert s.batch_size <= 8
    tokens_per_step = s.batch_size * s.grad_accum * s.max_seq_len
    assert 400 <= s.tokens / tokens_per_step <= 600 and s.steps == s.tokens // tokens_per_step
    short = rule(1.0)  # little time: the batch stays at min_batch_tokens, fewer steps than the target
    assert short.batch_size * short.grad_accum * short.max_seq_len == 2048 and short.steps < 4000


def test_apply_budget_writes_the_shape_and_the_time_cap():
    cfg = preset("cpu")
    s = rule(10.0)
    apply_budget(cfg, 10.0, s)
    assert (cfg.model.n_layers, cfg.model.dim, cfg.model.n_heads, cfg.model.max_seq_len) == \
        (s.n_layers, s.dim, s.n_heads, s.max_seq_len)
    assert (cfg.train.batch_size, cfg.train.grad_accum, cfg.train.max_minutes) == (s.batch_size, s.grad_accum, 10.0)


def test_probe_measures_the_model_on_this_machine():
    cfg = preset("tiny")
    tps, flops = probe_tokens_per_s(cfg, steps=1, device="cpu")
    assert tps > 0 and flops == training_flops_per_token(cfg.model)


def test_run_budget_minutes_flag(tmp_path, monkeypatch, capsys):
    """The flag probes, applies the shape and caps the time, then runs the pipeline (stubbed)."""
    import simone.workflows.pipeline as pipeline
    from simone import cli

    seen = {}

    def fake_pipeline(cfg, run_dir, **kw):
        seen["cfg"] = cfg

        class R:
            ok = True
        return R()

    monkeypatch.setattr(pipeline, "run_pipeline", fake_pipeline)
    assert cli.main(["run", "--preset", "tiny", "--budget-minutes", "3", "--run-dir", str(tmp_path / "r"),
                     "--set", "train.device=cpu"]) == 0
    cfg = seen["cfg"]
    assert cfg.train.max_minutes == 3.0 and cfg.model.dim == 64 * cfg.model.n_layers
    assert "--budget-minutes 3: probe" in capsys.readouterr().out
    assert cli.main(["run", "--preset", "tiny", "--budget-minutes", "0"]) == 2
