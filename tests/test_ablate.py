"""`simone ablate`: every variant with several seeds, figures with error bars, differences that
say "no measurable difference" when their interval includes zero."""

from __future__ import annotations

import json
import math

import pytest

from simone.workflows.ablate import (VARIANTS, AblationSettings, check_variants, steps_for_budget, variant_config,
                                    variant_settings)
from simone.workflows.ablation_report import ablation_markdown, ablation_svg
from simone.workflows.ablation_stats import (FIGURES, GUIDANCE_REFERENCE, NO_DIFFERENCE, paired_difference, reading,
                                           summarize, summarize_runs)
from simone.config import preset
from simone.cli import main


def test_ablate_runs_every_variant_with_two_seeds(tiny_corpus, tmp_path, capsys):
    out = tmp_path / "ablation"
    rc = main(["ablate", "--data", str(tiny_corpus), "--preset", "tiny", "--out", str(out), "--max-steps", "2",
               "--seeds", "2", "--samples-per-domain", "2", "--sample-tokens", "8", "--heldout-batches", "2",
               "--set", "train.eval_batches=1", "--set", "train.log_every=1",
               "--vset", "no-trace:ablate.guidance_weight=0"])  # a per-variant override: no guided steering
    assert rc == 0
    result = json.loads((out / "ablation.json").read_text())
    assert result["seeds"] == 2
    # make_corpus's domains have distinct vocabularies: the judge must separate 8-word snippets
    assert result["judge_accuracy"] >= 0.9 and result["judge_accuracy_training_books"] >= 0.9
    rows = {r["variant"]: r for r in result["variants"]}
    assert list(rows) == list(VARIANTS)
    assert len(result["runs"]) == 2 * len(VARIANTS)
    for name, r in rows.items():
        assert r["steps"] == 2 and r["tokens_seen"] == 2 * result["tokens_per_step"]  # the same budget
        assert len(set(r["seeds"])) == 2  # two training seeds (init and data order)
        for figure in FIGURES:
            assert {"mean", "std", "ci95"} <= set(r[figure]), (name, figure)
        for figure in ("val_bpb", "heldout_bpb", "steering_accuracy"):
            s = r[figure]
            assert s["n"] == 2 and s["ci95"][0] <= s["mean"] <= s["ci95"][1], (name, figure)
        assert set(r["per_domain_bpb"]) == {"history", "poetry", "scripture"} and r["params"] > 0
    # different seeds train different models
    llama = [x["val_bpb"] for x in result["runs"] if x["variant"] == "llama"]
    assert llama[0] != llama[1]
    assert rows["full"]["steering_accuracy_guided"]["n"] == rows["full"]["steering_accuracy_guided_w0"]["n"] == 2
    assert any(d["variant"] == "full" and d["reference"] == GUIDANCE_REFERENCE for d in result["differences"])
    assert rows["no-policy"]["steering_accuracy_guided"]["mean"] is None
    assert rows["no-trace"]["steering_accuracy_guided"]["mean"] is None and rows["no-trace"]["guidance_weight"] == 0
    assert rows["llama"]["policy_accuracy"]["mean"] is None and rows["full"]["policy_accuracy"]["n"] == 2
    assert rows["no-memory"]["params"] < rows["full"]["params"]
    # the uncurated variant trained on its own data (built once), held out on the clean validation set
    assert (out / "uncurated" / "clean_val" / "val.bin").exists()
    assert (out / "runs" / "uncurated" / "seed_1" / "data").resolve() == (out / "uncurated" / "data").resolve()
    assert (out / "runs" / "full" / "seed_1" / "data").resolve() == (out / "shared" / "data").resolve()
    # differences against the plain model, paired by seed, each with its reading
    diffs = result["differences"]
    assert {(d["variant"], d["reference"]) for d in diffs} >= {("full", "llama"), ("uncurated", "full")}
    assert all(d["n"] == 2 and d["reading"] for d in diffs)
    table = (out / "ablation.md").read_text()
    for name in VARIANTS:
        assert f"| {name} |" in table
    assert " ± " in table and "held-out bpb" in table
    assert (out / "ablation.svg").read_text().startswith("<svg")


def test_ablate_refuses_an_unknown_variant(tiny_corpus, tmp_path, capsys):
    rc = main(["ablate", "--data", str(tiny_corpus), "--preset", "tiny", "--out", str(tmp_path / "a"),
               "--variants", "llama,mamba", "--max-steps", "1"])
    assert rc == 2 and "mamba" in capsys.readouterr().err
    rc = main(["ablate", "--data", str(tiny_corpus), "--preset", "tiny", "--out", str(tmp_path / "a"),
               "--vset", "full@x:model.n_memory_slots", "--max-steps", "1"])
    assert rc == 2 and "VARIANT:section.key=value" in capsys.readouterr().err


def test_summary_is_the_t_interval_of_the_mean():
    s = summarize([1.0, 2.0, 3.0, 4.0, None, float("nan")])  # missing values are left out
    std = math.sqrt(((1.5 ** 2) + (0.5 ** 2)) * 2 / 3)  # sample std, n - 1 = 3
    half = 3.182446305284263 * std / 2  # t(0.975, df=3) * std / sqrt(4)
    assert s["n"] == 4 and s["mean"] == pytest.approx(2.5) and s["std"] == pytest.approx(std)
    assert s["ci95"] == pytest.approx([2.5 - half, 2.5 + half])
    one = summarize([0.7])
    assert one["mean"] == 0.7 and one["std"] is None and one["ci95"] is None
    assert summarize([None])["mean"] is None


def _run(variant, seed, val_bpb, steering):
    return {"variant": variant, "seed": seed, "train_seed": 1337 + seed, "arch": "llama", "governance": {},
            "params": 10, "steps": 2, "tokens_seen": 100, "tokens_per_s": 1.0, "per_domain_bpb": {"a": val_bpb},
            "streaming": None, "val_bpb": val_bpb, "heldout_bpb": val_bpb, "steering_accuracy": steering,
            "steering_accuracy_guided": None, "policy_accuracy": None}


def test_a_difference_whose_interval_includes_zero_is_no_ranking():
    runs = [_run("llama", 0, 2.00, 0.50), _run("llama", 1, 2.10, 0.60), _run("llama", 2, 2.05, 0.40),
            # full: bpb lower by 0.10 ± 0.01 on every seed; steering up on one seed, down on another
            _run("full", 0, 1.90, 0.60), _run("full", 1, 2.01, 0.50), _run("full", 2, 1.94, 0.45)]
    bpb = paired_difference(runs, "full", "llama", "val_bpb")
    assert bpb["values"] == pytest.approx([-0.10, -0.09, -0.11]) and bpb["ci95"][1] < 0
    assert reading(bpb, lower_is_better=True) == "lower (better)"
    steer = paired_difference(runs, "full", "llama", "steering_accuracy")
    assert steer["ci95"][0] < 0 < steer["ci95"][1]
    assert reading(steer, lower_is_better=False) == NO_DIFFERENCE
    assert reading({"mean": 0.2, "ci95": None}, lower_is_better=False) == NO_DIFFERENCE  # one seed

    rows, diffs = summarize_runs(runs, ["llama", "full"])
    result = {"preset": "tiny", "seeds": 3, "steps_per_variant": 2, "tokens_per_variant": 100,
              "control_token_prob": 0.5, "judge_accuracy": 0.9, "steering_judge": {"chance": 0.5},
              "settings": AblationSettings().__dict__, "variants": rows, "differences": diffs}
    table = ablation_markdown(result)
    steering_line = next(line for line in table.splitlines() if line.startswith("| full | llama | steering |"))
    assert NO_DIFFERENCE in steering_line and "better" not in steering_line and "worse" not in steering_line
    bpb_line = next(line for line in table.splitlines() if line.startswith("| full | llama | val bpb |"))
    assert "lower (better)" in bpb_line
    assert "2.0500 ± 0.0500 [" in table  # llama's val bpb: mean ± std [95% interval]
    assert ablation_svg(result).count("<path") == 2 * 3  # a whisker per variant with an interval, 3 figures


def test_guidance_is_measured_against_the_same_sampler_without_the_policy_in_the_same_runs():
    runs = [_run("llama", k, 2.0, 0.4) for k in range(3)]
    for k, (w0, guided) in enumerate([(0.40, 0.61), (0.50, 0.69), (0.45, 0.67)]):
        runs.append({**_run("full", k, 2.0, 0.3), "steering_accuracy_guided": guided,
                     "steering_accuracy_guided_w0": w0})
    rows, diffs = summarize_runs(runs, ["llama", "full"])
    gain = next(d for d in diffs if d["variant"] == "full" and d["reference"] == GUIDANCE_REFERENCE)
    assert gain["values"] == pytest.approx([0.21, 0.19, 0.22]) and gain["reading"] == "higher (better)"
    assert rows[1]["guidance_gain"]["mean"] == pytest.approx(0.2067, abs=1e-4)
    assert not any(d["variant"] == "llama" and d["reference"] == GUIDANCE_REFERENCE for d in diffs)  # no guidance
    result = {"preset": "tiny", "seeds": 3, "steps_per_variant": 2, "tokens_per_variant": 100,
              "control_token_prob": 0.5, "judge_accuracy": 0.9, "steering_judge": {"chance": 0.5},
              "settings": AblationSettings().__dict__, "variants": rows, "differences": diffs}
    line = next(x for x in ablation_markdown(result).splitlines() if GUIDANCE_REFERENCE in x)
    assert line.startswith("| full |") and "+20.7%" in line and "higher (better)" in line
    # the report shows where the judge's own errors go
    result["steering_judge"]["validation_confusion"] = {"law": {"law": 3, "sky": 1}, "sky": {"law": 2}}
    table = ablation_markdown(result)
    assert "| law | 4 | 75% | sky 1 |" in table and "| sky | 2 | 0% | law 2 |" in table
    # a sweep point is compared with the plain model, its base and the plain model with its tag
    runs += [{**r, "variant": r["variant"] + "@cw"} for r in runs]
    pairs = {(d["variant"], d["reference"]) for d in summarize_runs(runs, ["llama", "full", "llama@cw", "full@cw"])[1]}
    assert {("full@cw", "llama"), ("full@cw", "full"), ("full@cw", "llama@cw"), ("llama@cw", "llama")} <= pairs
    # a gain whose interval includes zero is no gain
    mixed = [_run("llama", 0, 2.0, 0.4)] + [{**_run("full", k, 2.0, 0.3), "steering_accuracy_guided": g,
                                            "steering_accuracy_guided_w0": 0.5} for k, g in enumerate([0.55, 0.45, 0.52])]
    gain = next(d for d in summarize_runs(mixed, ["llama", "full"])[1] if d["reference"] == GUIDANCE_REFERENCE)
    assert gain["reading"] == NO_DIFFERENCE


def test_the_budget_is_the_same_number_of_tokens_for_every_variant():
    assert steps_for_budget(AblationSettings(tokens_per_variant=2_500_000), tokens_per_step=4096) == 611
    assert steps_for_budget(AblationSettings(tokens_per_variant=2_500_000, max_steps=5), 4096) == 5
    # the time budget: 60% of each run's share of the minutes
    assert steps_for_budget(AblationSettings(budget_minutes=10, variants=["llama", "full"], seeds=2), 4096,
                            seconds_per_step=1.0) == 90


def test_a_sweep_point_is_a_variant_with_its_own_overrides():
    overrides = {"full@mem2": ["model.n_memory_slots=2", "model.policy_layer=0", "ablate.guidance_weight=3"]}
    settings = AblationSettings(variants=["llama", "full@mem2"], overrides=overrides)
    check_variants(settings)
    cfg = variant_config(preset("tiny"), "full@mem2", overrides["full@mem2"])
    assert cfg.model.governance and cfg.model.memory and cfg.model.n_memory_slots == 2 and cfg.model.policy_layer == 0
    assert variant_settings(settings, "full@mem2").guidance_weight == 3.0
    assert variant_settings(settings, "llama").guidance_weight == 1.0
    with pytest.raises(ValueError, match="mamba@x"):
        check_variants(AblationSettings(variants=["mamba@x"]))
    with pytest.raises(ValueError, match="not in the ablation"):
        check_variants(AblationSettings(variants=["llama"], overrides={"full": ["model.n_memory_slots=2"]}))


def test_resume_reuses_finished_runs_and_only_those(tiny_corpus, tmp_path, capsys):
    out = tmp_path / "ablation"
    common = ["ablate", "--data", str(tiny_corpus), "--preset", "tiny", "--out", str(out), "--max-steps", "2",
              "--variants", "llama", "--samples-per-domain", "2", "--sample-tokens", "8", "--heldout-batches", "2",
              "--set", "train.eval_batches=1", "--set", "train.log_every=1"]
    assert main(common + ["--seeds", "1"]) == 0
    first = json.loads((out / "ablation.json").read_text())["runs"][0]
    capsys.readouterr()
    assert main(common + ["--seeds", "2", "--resume"]) == 0  # one more seed: seed 0 is not trained again
    said = capsys.readouterr().out
    assert "llama seed 0: reusing" in said and "llama seed 1: training" in said
    result = json.loads((out / "ablation.json").read_text())
    assert result["seeds"] == 2 and result["runs"][0] == first and result["runs"][1]["seed"] == 1
    # a changed steering setting changes what the figures mean: nothing is reused as it was,
    # but the trained models are: they are evaluated again, not trained again
    assert main(common + ["--seeds", "1", "--resume", "--samples-per-domain", "3"]) == 0
    said = capsys.readouterr().out
    assert "reusing" not in said and "seed 0: training" not in said
    assert "llama seed 0: evaluating the model llama seed 0 trained" in said
    again = json.loads((out / "ablation.json").read_text())["runs"][0]
    assert again["val_bpb"] == first["val_bpb"]  # the same weights
    # without --resume everything is trained again
    assert main(common + ["--seeds", "1"]) == 0
    assert "llama seed 0: training" in capsys.readouterr().out


def test_resume_trains_again_a_run_its_time_guard_cut_short(tiny_corpus, tmp_path, capsys, monkeypatch):
    """A run the time guard stopped (a busy machine) has not had its step budget: --resume
    must not take its figures as the budget's."""
    import dataclasses

    import simone.workflows.pipeline as pipeline
    from simone.workflows.ablate import FINISHED_RUN

    out = tmp_path / "ablation"
    common = ["ablate", "--data", str(tiny_corpus), "--preset", "tiny", "--out", str(out), "--max-steps", "2",
              "--variants", "llama", "--seeds", "1", "--samples-per-domain", "2", "--sample-tokens", "8",
              "--heldout-batches", "2", "--set", "train.eval_batches=1", "--set", "train.log_every=1"]
    real_stage_train = pipeline.stage_train

    def stopped_by_the_clock(cfg, run_dir, **kwargs):  # as the time guard ends a run after one step
        cfg.train.max_steps = 1
        return dataclasses.replace(real_stage_train(cfg, run_dir, **kwargs), stop_reason="max_minutes")

    monkeypatch.setattr(pipeline, "stage_train", stopped_by_the_clock)
    assert main(common) == 0
    assert "llama seed 0: stopped after 1 of 2 steps (max_minutes); --resume trains it again" in capsys.readouterr().out
    saved = json.loads((out / "runs" / "llama" / "seed_0" / FINISHED_RUN).read_text())
    assert saved["steps_trained"] == 1 and saved["stop_reason"] == "max_minutes" and saved["key"]["steps"] == 2
    monkeypatch.undo()

    assert main(common + ["--resume"]) == 0
    said = capsys.readouterr().out
    assert "reusing" not in said and "evaluating the model" not in said
    assert f"llama seed 0: the run in {out / 'runs' / 'llama' / 'seed_0'} stopped after 1 of 2 steps (max_minutes); " \
           "training it again" in said
    assert json.loads((out / "ablation.json").read_text())["runs"][0]["steps"] == 2
    # trained to its budget now: the next --resume reuses it
    assert main(common + ["--resume"]) == 0
    assert "llama seed 0: reusing" in capsys.readouterr().out


def _run_with_data(tmp_path, index: str):
    """A run folder with just a tokenizer file and a shard index holding `index`."""
    from simone.rundir import RunDir

    run = RunDir(tmp_path / "run").make()
    run.tokenizer_dir.mkdir(parents=True, exist_ok=True)
    run.tokenizer.write_text("{}")
    run.data.mkdir(parents=True, exist_ok=True)
    (run.data / "index.json").write_text(index)
    return run


def test_a_run_key_holds_the_data_and_the_simone_version(tmp_path, monkeypatch):
    """Other shards (other curated documents) or another simone version train another model:
    the key, and the part of it the weights depend on, differ."""
    import simone.workflows.ablate as ablate
    from simone.workflows.ablate import run_key, training_key

    run = _run_with_data(tmp_path, '{"documents_sha256": "a"}')
    key = run_key(preset("tiny"), "llama", 0, 2, AblationSettings(), run, 0.5)
    assert key["simone_version"] == ablate.__version__ and key["data_sha256"] == key["heldout_sha256"]
    (run.data / "index.json").write_text('{"documents_sha256": "b"}')
    other_data = run_key(preset("tiny"), "llama", 0, 2, AblationSettings(), run, 0.5)
    assert other_data["data_sha256"] != key["data_sha256"] and training_key(other_data) != training_key(key)
    monkeypatch.setattr(ablate, "__version__", "99.0")
    other_version = run_key(preset("tiny"), "llama", 0, 2, AblationSettings(), run, 0.5)
    assert other_version["simone_version"] == "99.0" and training_key(other_version) != training_key(other_data)
    # scored on other held-out shards: other figures, the same weights
    heldout = tmp_path / "clean_val"
    heldout.mkdir()
    (heldout / "index.json").write_text("{}")
    scored_elsewhere = run_key(preset("tiny"), "llama", 0, 2, AblationSettings(), run, 0.5, heldout)
    assert scored_elsewhere != other_version and training_key(scored_elsewhere) == training_key(other_version)


def test_a_sweep_point_that_differs_only_in_evaluation_reuses_the_trained_model(tiny_corpus, tmp_path, capsys):
    out = tmp_path / "ablation"
    assert main(["ablate", "--data", str(tiny_corpus), "--preset", "tiny", "--out", str(out), "--max-steps", "2",
                 "--variants", "full", "--seeds", "1", "--samples-per-domain", "2", "--sample-tokens", "8",
                 "--heldout-batches", "2", "--set", "train.eval_batches=1",
                 "--vset", "full@g3:ablate.guidance_weight=3", "--vset", "full@mem2:model.n_memory_slots=2"]) == 0
    said = capsys.readouterr().out
    assert "full@g3 seed 0: evaluating the model full seed 0 trained" in said
    assert "full@mem2 seed 0: training" in said  # a model override trains its own model
    runs = {r["variant"]: r for r in json.loads((out / "ablation.json").read_text())["runs"]}
    assert runs["full@g3"]["run_dir"] == runs["full"]["run_dir"] != runs["full@mem2"]["run_dir"]
    assert runs["full@g3"]["val_bpb"] == runs["full"]["val_bpb"]  # the same weights
    assert runs["full@g3"]["guidance_weight"] == 3.0 and runs["full"]["guidance_weight"] == 1.0
    assert not (out / "runs" / "full@g3" / "seed_0" / "checkpoints").exists()  # nothing trained there


def test_a_setting_added_later_stays_out_of_the_run_key_while_off(tmp_path):
    from simone.workflows.ablate import run_key

    run = _run_with_data(tmp_path, "{}")
    cfg = preset("tiny")
    key = run_key(cfg, "llama", 0, 2, AblationSettings(), run, 0.5)
    assert "control_window_prob" not in key["config"]["data"]  # keys written before it existed still match
    cfg.data.control_window_prob = 0.5
    assert run_key(cfg, "llama", 0, 2, AblationSettings(), run, 0.5)["config"]["data"]["control_window_prob"] == 0.5


def test_a_run_key_names_its_variant_and_carries_its_own_steering_overrides(tmp_path):
    """The key of `full@g5` says `full@g5` and guidance weight 5 (a key that lost them would let
    --resume reuse a run evaluated at another weight)."""
    from simone.workflows.ablate import run_key

    run = _run_with_data(tmp_path, "{}")
    settings = AblationSettings(overrides={"full@g5": ["ablate.guidance_weight=5"]})
    key = run_key(preset("tiny"), "full@g5", 0, 2, settings, run, 0.5)
    assert key["variant"] == "full@g5"
    assert key["steering"]["guidance_weight"] == 5 and key["steering"]["overrides"] == ["ablate.guidance_weight=5"]
    assert run_key(preset("tiny"), "full", 0, 2, settings, run, 0.5)["steering"]["guidance_weight"] == 1.0


def test_the_step_probe_times_the_configured_optimizer_under_the_training_autocast(template, monkeypatch):
    """The time budget's step probe steps Muon when `train.optimizer=muon`, in the training dtype
    (it timed AdamW in float32 whatever the config said)."""
    import torch

    from simone.config import load_config
    from simone.model.transformer import Transformer
    from simone.rundir import RunDir
    from simone.train import optim
    from simone.workflows.ablate import seconds_per_step

    cfg = load_config(template / "config.json")
    cfg.train.optimizer, cfg.train.dtype, cfg.train.device, cfg.train.grad_accum = "muon", "bfloat16", "cpu", 2
    muon_steps, autocast_on = [], []
    muon_step, forward = optim.MuonWithAdamW.step, Transformer.forward
    monkeypatch.setattr(optim.MuonWithAdamW, "step", lambda self: muon_steps.append(1) or muon_step(self))
    monkeypatch.setattr(Transformer, "forward",
                        lambda self, *a, **k: autocast_on.append(torch.is_autocast_enabled("cpu")) or forward(self, *a, **k))
    assert seconds_per_step(cfg, RunDir(template), steps=2) > 0
    assert len(muon_steps) == 3  # the warm-up step and the two timed ones
    assert autocast_on == [True] * 2 * 3  # every micro-batch (two a step) under bf16 autocast


def test_seeds_to_resolve_a_difference_follow_from_its_spread():
    from simone.workflows.ablation_stats import seeds_to_resolve, t_quantile

    diff = summarize([0.01, -0.002, 0.013])  # 3 seeds: its interval includes zero
    assert diff["ci95"][0] < 0 < diff["ci95"][1]
    n = seeds_to_resolve(diff)
    half = lambda k: t_quantile(0.975, k - 1) * diff["std"] / math.sqrt(k)  # noqa: E731
    assert half(n) < abs(diff["mean"]) <= half(n - 1)  # the first count that would exclude zero
    assert seeds_to_resolve(summarize([0.0, 0.0])) is None  # no spread, no mean: nothing to resolve
    assert seeds_to_resolve(summarize([1e-9, -1e-3, 1e-3]), most=50) is None  # beyond the cap
