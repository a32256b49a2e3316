"""bench/run_ablation.py: the issue-17 run as one command, and its wall-time plan."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from simone.cli import build_parser

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "run_ablation.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("run_ablation", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_full_run_is_six_variants_three_seeds_and_a_token_budget(bench):
    args = bench.parse_args(["--vset", "full@mem16:model.n_memory_slots=16"])
    cmd = bench.ablate_command(args)
    assert cmd[1:4] == ["-m", "simone", "ablate"]
    parsed = build_parser().parse_args(cmd[3:])  # `simone ablate` accepts it as written
    assert parsed.preset == "cpu" and parsed.seeds == 3 and parsed.tokens_per_variant >= 2_500_000
    assert parsed.samples_per_domain >= 50 and parsed.sample_tokens == 128
    assert parsed.variants.split(",") == ["llama", "full", "no-policy", "no-memory", "uncurated", "gpt2", "full@mem16"]
    assert parsed.variant_overrides == ["full@mem16:model.n_memory_slots=16"]
    assert bench.VARIANTS[-1] == "gpt2"  # parsing did not change the defaults
    assert not parsed.resume
    assert build_parser().parse_args(bench.ablate_command(bench.parse_args(["--resume"]))[3:]).resume


def test_the_plan_adds_up_the_measured_rates(bench):
    args = bench.parse_args(["--variants", "llama,full", "--seeds", "2", "--samples-per-domain", "10",
                             "--sample-tokens", "100", "--heldout-batches", "1"])
    data = {"sampled_bytes": 1_000, "corpus_bytes": 100_000, "prep_s": 3.0, "judge_fit_s": 4.0, "domains": 2,
            "val_share_of_tokens": 0.5, "bytes_per_token": 1.0}
    models = {"llama": {"step_s": 0.01, "eval_s_per_token": 0.0, "batch_gen_s_per_token": 0.001,
                        "guided_gen_s_per_token": 0.0},
              "full": {"step_s": 0.01, "eval_s_per_token": 0.0, "batch_gen_s_per_token": 0.001,
                       "guided_gen_s_per_token": 0.001}}
    plan = bench.estimate(args, data, models)
    assert plan["steps_per_run"] == 1221  # ceil(2.5M / (16 x 128)) with the cpu preset
    assert plan["heldout_tokens_est"] == 2 * 1 * 16 * 128  # capped by --heldout-batches
    # steering: 2 domains x 10 samples x 100 tokens x 1 ms; full also the guided sampler, twice (W and W = 0)
    assert plan["per_run"]["llama"]["steering_s"] == pytest.approx(2.0)
    assert plan["per_run"]["full"]["steering_s"] == pytest.approx(6.0)
    assert plan["prep_s"] == pytest.approx(2 * 3.0 * 100 + 4.0)
    assert plan["total_s"] == pytest.approx(plan["prep_s"] + 2 * (2 * 12.21 + 2.0 + 6.0))


def test_the_data_experiment_is_curated_against_five_variants_with_the_suite():
    spec = importlib.util.spec_from_file_location("run_data_ablation", SCRIPT.with_name("run_data_ablation.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cmd = module.ablate_command(module.parse_args(["--resume"]))
    parsed = build_parser().parse_args(cmd[3:])  # `simone ablate` accepts it as written
    assert parsed.preset == "cpu" and parsed.seeds == 3 and parsed.tokens_per_variant >= 2_500_000
    assert parsed.samples_per_domain == 0 and parsed.variants is None and parsed.resume
    assert [v.split("=")[1] for v in parsed.data_variants] == [
        "raw", "contradict:0.1", "contradict:0.3", "contradict:0.6", "contradict:0.3:negation"]
