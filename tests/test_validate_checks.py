"""`simone validate`'s checks from the original list: the parameter count against the config's
analytic count, generation speed and peak memory against the preset's bounds, and the
repetition figures of the samples beside those of validation text."""

from __future__ import annotations

import copy
import json

import pytest

from simone.config import ValidateConfig, analytic_param_count, preset
from simone.model import build_model
from simone.train.trainer import train
from simone.inference.validation_report import distinct_n, diversity, longest_repeated_ngram, validate
from train_support import new_run


@pytest.fixture(scope="module")
def trained(template, tmp_path_factory):
    cfg, run = new_run(template, tmp_path_factory.mktemp("validate") / "run", max_steps=4,
                       eval_every=4, checkpoint_every=4)
    train(cfg, run)
    return run


def _model_configs():
    tiny = preset("tiny").model
    gov = copy.deepcopy(tiny)
    gov.governance, gov.n_domains = True, 3
    no_memory = copy.deepcopy(gov)
    no_memory.memory = False
    gqa_untied = copy.deepcopy(tiny)
    gqa_untied.n_kv_heads, gqa_untied.tie_embeddings, gqa_untied.ffn_hidden = 2, False, 100
    gpt2 = preset("tiny-gpt2").model
    gpt2_untied = copy.deepcopy(gpt2)
    gpt2_untied.tie_embeddings, gpt2_untied.n_kv_heads = False, 1
    return [tiny, gov, no_memory, gqa_untied, gpt2, gpt2_untied, preset("cpu").model]


@pytest.mark.parametrize("model_cfg", _model_configs(), ids=lambda m: f"{m.arch}-gov{m.governance}")
def test_analytic_count_matches_the_built_model(model_cfg):
    assert analytic_param_count(model_cfg) == build_model(model_cfg).num_params()


def test_default_bounds_pass_and_report_shows_repetition(trained, tmp_path):
    report = validate(trained.root, out_dir=tmp_path / "v")
    names = {c["name"]: c for c in report["checks"]}
    for name in ("parameter_count", "generation_speed", "peak_memory"):
        assert names[name]["ok"], names[name]
    assert report["params"] == report["params_expected"]
    div = report["diversity"]
    for key in ("samples", "validation_text"):
        assert 0.0 <= div[key]["distinct_2"] <= 1.0 and div[key]["longest_repeated_ngram"] >= 0
    saved = json.loads((tmp_path / "v" / "report.json").read_text())
    assert saved["diversity"] == div
    md = (tmp_path / "v" / "report.md").read_text()
    assert "distinct-2" in md and "validation text" in md


def test_a_tightened_speed_bound_fails_naming_the_figure_and_the_bound(trained, tmp_path):
    report = validate(trained.root, out_dir=tmp_path / "v",
                      bounds=ValidateConfig(min_generation_tokens_per_s_cpu=1e9))
    assert not report["ok"] and report["failed"] == ["generation_speed"]
    detail = next(c["detail"] for c in report["checks"] if c["name"] == "generation_speed")
    assert f"{report['generation_tokens_per_s']} tokens/s" in detail
    assert "1000000000.0 tokens/s" in detail and "validate.min_generation_tokens_per_s_cpu" in detail


def test_a_tightened_memory_bound_fails_naming_the_figure_and_the_bound(trained, tmp_path):
    report = validate(trained.root, out_dir=tmp_path / "v", bounds=ValidateConfig(max_peak_rss_mb=1.0))
    assert report["failed"] == ["peak_memory"]
    detail = next(c["detail"] for c in report["checks"] if c["name"] == "peak_memory")
    assert f"peak RSS {report['peak_rss_mb']} MB exceeds the bound 1.0 MB" in detail
    assert "validate.max_peak_rss_mb" in detail


def test_a_model_that_differs_from_its_config_fails_the_count(trained, tmp_path, monkeypatch):
    import simone.inference.validation_report as v

    monkeypatch.setattr(v, "analytic_param_count", lambda m: analytic_param_count(m) + 64)
    report = validate(trained.root, out_dir=tmp_path / "v")
    assert report["failed"] == ["parameter_count"]
    detail = next(c["detail"] for c in report["checks"] if c["name"] == "parameter_count")
    assert f"{report['params']:,} parameters" in detail and "(difference -64)" in detail


def test_distinct_2_and_longest_repeat_on_known_strings():
    loop = "the cat sat the cat sat the cat sat".split()
    # bigrams: 8, distinct: (the cat) (cat sat) (sat the) = 3
    assert distinct_n(loop, 2) == pytest.approx(3 / 8)
    assert longest_repeated_ngram(loop) == 6  # "the cat sat the cat sat" at 0 and 3
    fresh = "one two three four five".split()
    assert distinct_n(fresh, 2) == 1.0 and longest_repeated_ngram(fresh) == 0
    assert distinct_n(["alone"], 2) is None
    d = diversity(["a b a b a b", "x y z"])
    assert d["distinct_2"] == pytest.approx((2 / 5 + 1.0) / 2) and d["longest_repeated_ngram"] == 4
