"""Two gloo processes under torchrun train exactly like one process accumulating two
micro-batches: the same windows per step, gradients averaged, the same losses and final weights."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch

from train_support import losses_by_step, new_run, prepared_template, read_metrics, run_training, subprocess_env


SETTINGS = dict(max_steps=6, batch_size=8, grad_accum=2, eval_every=3, checkpoint_every=3)


def torchrun(run, *args: str, env=None, port: int = 29531) -> subprocess.CompletedProcess:
    """2 processes under torchrun; on a timeout the whole process group is killed."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), "-m", "simone.train", "--run-dir", str(run.root), *args]
    proc = subprocess.Popen(cmd, env=env or subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun did not finish in 120 s:\n{err[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.slow
def test_two_processes_match_one_process_with_accumulation(tmp_path):
    template = prepared_template(tmp_path / "t")
    _, one = new_run(template, tmp_path / "one", **SETTINGS)
    _, two = new_run(template, tmp_path / "two", **SETTINGS)
    single = run_training(one)
    assert single.returncode == 0, single.stderr
    double = torchrun(two)
    assert double.returncode == 0, double.stdout[-2000:] + double.stderr[-4000:]
    a, b = losses_by_step(one), losses_by_step(two)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-5), step
    # ...and end with the same weights
    from simone.checkpoint import load_checkpoint

    w1, _, _ = load_checkpoint(one.checkpoints / "step_000006")
    w2, _, _ = load_checkpoint(two.checkpoints / "step_000006")
    assert sorted(w1) == sorted(w2)
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=0, atol=1e-5, msg=name)
    # only rank 0 wrote: one start event, one row per step
    assert len([r for r in read_metrics(two, "event") if r["event"] == "start"]) == 1
    assert len(read_metrics(two, "train")) == 6
    start = [r for r in read_metrics(two, "event") if r["event"] == "start"][0]
    assert start["world_size"] == 2 and start["tokens_per_step"] == 8 * 2 * 64
    assert two.read_status()["state"] == "finished"


@pytest.mark.slow
def test_two_processes_resume_exactly(tmp_path):
    """Each rank's dropout stream is saved, so a stopped 2-process run resumes bit for bit."""
    template = prepared_template(tmp_path / "t")
    _, straight = new_run(template, tmp_path / "straight", **SETTINGS)
    _, stopped = new_run(template, tmp_path / "stopped", **SETTINGS)
    dropout = ("--set", "model.dropout=0.1")
    assert torchrun(straight, *dropout, port=29532).returncode == 0
    torchrun(stopped, *dropout, env=subprocess_env(SIMONE_FAULT_SIGTERM_AT_STEP="4"), port=29533)
    assert stopped.read_status()["state"] == "stopped" and stopped.read_status()["step"] == 4
    done = torchrun(stopped, "--resume", "latest", port=29534)
    assert done.returncode == 0, done.stderr[-4000:]
    assert losses_by_step(stopped) == losses_by_step(straight)
