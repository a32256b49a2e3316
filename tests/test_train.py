"""The trainer end to end on the tiny preset (in-process): the loss falls, every output of the
run directory follows the contract, and a resumed run continues with identical losses."""

from __future__ import annotations

import json
import math

import pytest
import torch

from simone.data.shards import TokenShard
from simone.checkpoint import load_checkpoint, read_pointer, resolve_checkpoint
from simone.train.metrics import cpu_peak_flops, gpu_peak_flops, mfu
from simone.train.trainer import TrainResult, train
from train_support import losses_by_step, new_run, read_metrics


@pytest.fixture(scope="module")
def full_run(template, tmp_path_factory):
    """Two epochs of 18 steps (batch 16), evaluation every 10 steps."""
    cfg, run = new_run(template, tmp_path_factory.mktemp("full") / "run", batch_size=16, num_epochs=2,
                       min_epochs=1, patience=5, eval_every=10, checkpoint_every=10, log_every=2,
                       system_stats_every_s=0.5)
    result = train(cfg, run)
    return cfg, run, result


def test_loss_falls_well_below_its_start(full_run):
    _, run, result = full_run
    losses = [r["loss"] for r in read_metrics(run, "train")]
    assert losses[0] > 5.0  # ~ln(vocab) at initialisation
    assert losses[-1] < losses[0] - 2.0
    assert result.best_val_loss is not None and result.best_val_loss < 4.0


def test_result_and_stop_reason(full_run):
    cfg, run, result = full_run
    assert isinstance(result, TrainResult)
    assert result.stop_reason == "num_epochs"
    assert result.steps == 36 and result.epochs == 2
    assert result.tokens_seen == 36 * 16 * cfg.model.max_seq_len
    assert result.tokens_per_s > 0 and result.mfu is not None and result.mfu > 0
    assert result.final_val_loss == pytest.approx(result.best_val_loss)
    assert result.best_checkpoint == result.last_checkpoint == "step_000036"


def test_metric_rows_follow_the_contract(full_run):
    cfg, run, _ = full_run
    rows = read_metrics(run)
    assert all("t" in r and "kind" in r for r in rows)
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == list(range(2, 37, 2))
    for r in train_rows:
        assert {"step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "tokens_seen"} <= set(r)
        assert math.isfinite(r["loss"]) and r["lr"] > 0 and r["grad_norm"] > 0
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [10, 18, 20, 30, 36]  # every 10 steps and at both epoch ends
    shard = TokenShard(run.data, "val")
    for r in evals:
        assert set(r["per_domain"]) == set(shard.domains)
        for domain, d in r["per_domain"].items():
            assert d["bpb"] == pytest.approx(d["loss"] / math.log(2) / shard.bytes_per_token(domain))
            assert d["ppl"] == pytest.approx(math.exp(d["loss"]))
        assert min(d["loss"] for d in r["per_domain"].values()) <= r["val_loss"] <= max(
            d["loss"] for d in r["per_domain"].values())
        assert r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]))
    events = [r["event"] for r in rows if r["kind"] == "event"]
    assert events[0] == "start" and events[-1] == "finished"
    assert events.count("epoch_end") == 2
    samples = [json.loads(line) for line in run.samples.read_text().splitlines()]
    assert [s["step"] for s in samples] == [18, 36]
    assert all(s["prompt"] and isinstance(s["text"], str) for s in samples)
    assert "step 36/36" in run.log.read_text()
    system = [r for r in rows if r["kind"] == "system"]
    assert system and {"cpu_percent", "ram_used_gb", "disk_free_gb", "gpus"} <= set(system[0])
    assert (run.root / "tensorboard").is_dir() and any((run.root / "tensorboard").iterdir())


def test_status_and_checkpoints(full_run):
    _, run, _ = full_run
    status = run.read_status()
    assert status["state"] == "finished" and status["stage"] == "train"
    assert status["step"] == 36 and status["total_steps"] == 36
    assert status["stop_reason"] == "num_epochs" and status["schedule_progress"] == 1.0
    assert status["pid"] > 0 and status["heartbeat"] > 0
    assert read_pointer(run.checkpoints, "latest") == "step_000036"
    best = resolve_checkpoint(run.root, "best")
    _, state, config = load_checkpoint(best)
    assert state["step"] == 36 and state["epochs_done"] == 2
    assert config["train"]["batch_size"] == 16
    assert not (run.root / ".lock").exists()  # released at the end


def test_resume_continues_with_identical_losses(template, tmp_path, monkeypatch):
    """20 steps straight == 13 steps, SIGTERM, resume to 20 (dropout on: RNG state matters).

    Step 13 is between checkpoints (every 4) and inside a logging interval's counters.
    """
    overrides = dict(batch_size=16, eval_every=5, checkpoint_every=4, log_every=1, num_epochs=2, max_steps=20)
    cfg_a, run_a = new_run(template, tmp_path / "a", **overrides)
    cfg_a.model.dropout = 0.1
    train(cfg_a, run_a)
    cfg_b, run_b = new_run(template, tmp_path / "b", **overrides)
    cfg_b.model.dropout = 0.1
    monkeypatch.setenv("SIMONE_FAULT_SIGTERM_AT_STEP", "13")
    first = train(cfg_b, run_b)
    assert first.stop_reason == "signal" and first.steps == 13
    assert run_b.read_status()["state"] == "stopped" and run_b.read_status()["step"] == 13
    assert run_b.read_status()["stop_reason"] == "signal" and first.schedule_progress == 0.65  # 13 of 20
    assert run_b.read_status()["schedule_progress"] == 0.65
    assert first.last_checkpoint == "step_000013"
    monkeypatch.delenv("SIMONE_FAULT_SIGTERM_AT_STEP")
    second = train(cfg_b, run_b, resume="latest")
    assert second.steps == 20
    a, b = losses_by_step(run_a), losses_by_step(run_b)
    assert sorted(a) == sorted(b) == list(range(1, 21))
    assert [a[s] for s in a] == [b[s] for s in a]  # bit for bit
    resumes = [r for r in read_metrics(run_b, "event") if r["event"] == "resume"]
    assert len(resumes) == 1 and resumes[0]["step"] == 13
    # evaluation, early stopping and the LR schedule continued too
    eval_a = {r["step"]: r["val_loss"] for r in read_metrics(run_a, "eval")}
    eval_b = {r["step"]: r["val_loss"] for r in read_metrics(run_b, "eval")}
    assert {s: eval_b[s] for s in eval_a} == eval_a
    lr_a = {r["step"]: r["lr"] for r in read_metrics(run_a, "train")}
    lr_b = {r["step"]: r["lr"] for r in read_metrics(run_b, "train")}
    assert lr_a == lr_b


def test_resume_from_best_and_from_a_path(full_run, tmp_path, template):
    cfg, run, _ = full_run
    best = resolve_checkpoint(run.root, "best")
    cfg2, run2 = new_run(template, tmp_path / "r", batch_size=16, num_epochs=3, max_steps=38, log_every=1)
    result = train(cfg2, run2, resume=str(best))
    assert result.steps == 38
    assert min(losses_by_step(run2)) == 37


def test_resume_latest_without_checkpoints_starts_fresh(template, tmp_path):
    cfg, run = new_run(template, tmp_path / "r", max_steps=3, log_every=1)
    result = train(cfg, run, resume="latest")
    assert result.steps == 3 and sorted(losses_by_step(run)) == [1, 2, 3]


def test_mfu_inputs():
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_peak_flops("NVIDIA H200") == 989e12
    assert gpu_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu_peak_flops("Some Unknown GPU") is None
    peak = cpu_peak_flops()
    assert 1e8 < peak < 1e13 and cpu_peak_flops() == peak  # measured once, then cached
    assert mfu(6e6, 1000.0, 1e10) == pytest.approx(0.6)
    assert mfu(6e6, 1000.0, None) is None


def test_the_cpu_peak_probe_counts_the_cpu_time_it_got_not_the_time_others_took(monkeypatch):
    """Another process on the cores doubles each burst's wall time; this process's CPU time
    (over its threads) is what the matmuls took, so the probe reads the same peak."""
    import types

    import simone.train.metrics as metrics

    clock = {"wall": 0.0, "cpu": 0.0}

    def mm(a, b):  # each matmul: 0.02 s of wall time, of which this process ran half (2 threads)
        clock["wall"] += 0.02
        clock["cpu"] += 0.02
        return a

    fake_time = types.SimpleNamespace(perf_counter=lambda: clock["wall"], process_time=lambda: clock["cpu"])
    monkeypatch.setattr(metrics, "time", fake_time)
    monkeypatch.setattr(metrics.torch, "mm", mm)
    monkeypatch.setattr(metrics.torch, "get_num_threads", lambda: 2)
    peak = metrics.cpu_peak_flops.__wrapped__(torch.float32, n=8, bursts=4, burst_s=0.015)
    assert peak == pytest.approx(2 * 8**3 / 0.01)  # 0.02 s of CPU time over 2 threads, not 0.02 s of wall time


def test_early_stopping_ends_the_run_after_patience(template, tmp_path):
    """With lr 0 the validation loss never improves: the first evaluation after min_epochs
    that fails to improve (patience 1) stops the run at the end of epoch 1 of 3."""
    cfg, run = new_run(template, tmp_path / "r", batch_size=16, lr=0.0, num_epochs=3, min_epochs=1,
                       patience=1, eval_every=10, checkpoint_every=100, log_every=6)
    result = train(cfg, run)
    assert result.stop_reason == "early_stop" and result.steps == 18 and result.epochs == 1
    status = run.read_status()  # named, with how far the 3-epoch schedule got
    assert status["stop_reason"] == "early_stop" and status["schedule_progress"] == pytest.approx(18 / 54, abs=1e-4)
    assert [r["step"] for r in read_metrics(run, "eval")] == [10, 18]
    (stop,) = [r for r in read_metrics(run, "event") if r["event"] == "early_stop"]
    assert stop["step"] == 18
    assert read_pointer(run.checkpoints, "best") == "step_000010"
    assert read_pointer(run.checkpoints, "latest") == "step_000018"


def test_max_minutes_caps_the_run(template, tmp_path):
    cfg, run = new_run(template, tmp_path / "r", max_minutes=1e-6, eval_every=100, log_every=1)
    result = train(cfg, run)
    assert result.stop_reason == "max_minutes" and result.steps <= 1
    assert run.read_status()["state"] == "finished" and run.read_status()["stop_reason"] == "max_minutes"
    assert read_pointer(run.checkpoints, "latest") == f"step_{result.steps:06d}"  # the end is saved


def test_activation_checkpointing_changes_memory_not_results(template, tmp_path):
    settings = dict(max_steps=4, eval_every=100, checkpoint_every=100, log_every=1)
    cfg_a, run_a = new_run(template, tmp_path / "a", **settings)
    cfg_b, run_b = new_run(template, tmp_path / "b", activation_checkpointing=True, **settings)
    cfg_a.model.dropout = cfg_b.model.dropout = 0.1  # recomputation must replay the same dropout
    train(cfg_a, run_a)
    train(cfg_b, run_b)
    assert losses_by_step(run_a) == losses_by_step(run_b)
    weights_a, _, _ = load_checkpoint(run_a.checkpoints / "step_000004")
    weights_b, _, _ = load_checkpoint(run_b.checkpoints / "step_000004")
    assert weights_a.keys() == weights_b.keys()  # parameter names unchanged
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


def test_activation_checkpointing_recomputes_blocks_in_backward():
    from simone.config import preset
    from simone.model import build_model
    from simone.train.parallelize import apply_activation_checkpointing

    model = build_model(preset("tiny").model)
    calls = []
    for i, block in enumerate(model.layers):
        def counting(*args, _forward=block.forward, _i=i, **kwargs):
            calls.append(_i)
            return _forward(*args, **kwargs)
        block.forward = counting
    apply_activation_checkpointing(model)
    x = torch.randint(0, 512, (2, 16))
    _, loss = model(x, x)
    assert calls == [0, 1]
    loss.backward()
    assert sorted(calls) == [0, 0, 1, 1]  # each block ran again during backward
    with torch.no_grad():
        calls.clear()
        model(x, x)
        assert calls == [0, 1]  # no checkpointing (and no recompute) without grad
