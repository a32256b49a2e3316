"""Two gloo processes under torchrun train exactly like one process accumulating two
micro-batches: the same windows per step, gradients averaged, the same losses."""

from __future__ import annotations

import subprocess
import sys

import pytest

from test_train_support import losses_by_step, new_run, prepared_template, read_metrics, run_training, subprocess_env


@pytest.mark.slow
def test_two_processes_match_one_process_with_accumulation(tmp_path):
    template = prepared_template(tmp_path / "t")
    settings = dict(max_steps=6, batch_size=8, grad_accum=2, eval_every=3, checkpoint_every=3)
    _, one = new_run(template, tmp_path / "one", **settings)
    _, two = new_run(template, tmp_path / "two", **settings)
    single = run_training(one)
    assert single.returncode == 0, single.stderr
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", "29531", "-m", "simone.train", "--run-dir", str(two.root)]
    double = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert double.returncode == 0, double.stdout[-2000:] + double.stderr[-4000:]
    a, b = losses_by_step(one), losses_by_step(two)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-5), step
    # only rank 0 wrote: one start event, one row per step
    assert len([r for r in read_metrics(two, "event") if r["event"] == "start"]) == 1
    assert len(read_metrics(two, "train")) == 6
    start = [r for r in read_metrics(two, "event") if r["event"] == "start"][0]
    assert start["world_size"] == 2 and start["tokens_per_step"] == 8 * 2 * 64
    assert two.read_status()["state"] == "finished"
