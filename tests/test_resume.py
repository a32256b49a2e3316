"""Exact resume across real process deaths: `kill -9` at random points (also in the middle of a
checkpoint save) and SIGTERM, then `--resume latest`, reproduce the uninterrupted run's
per-step losses bit for bit. Also: a second process is refused while the first is live.

Each test drives `python -m simone.train` subprocesses on a copy of a tiny prepared run
directory (tiny preset, batch 16: an epoch is 18 steps; 30 steps in all, dropout on).
"""

from __future__ import annotations

import random
import signal

import pytest

from simone.rundir import RunDir
from simone.lock import LOCK_NAME
from train_support import (
    losses_by_step,
    new_run,
    prepared_template,
    read_metrics,
    run_training,
    start_training,
    subprocess_env,
    wait_for,
)

STEPS = 30
SETTINGS = ["--set", "model.dropout=0.1"]


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    return prepared_template(tmp_path_factory.mktemp("resume_template"))


def fresh(template, dest) -> RunDir:
    _, run = new_run(template, dest, batch_size=16, max_steps=STEPS, num_epochs=2, checkpoint_every=5,
                     eval_every=10, log_every=1, keep_checkpoints=2)
    return run


@pytest.fixture(scope="module")
def reference(template, tmp_path_factory) -> dict[int, float]:
    run = fresh(template, tmp_path_factory.mktemp("reference") / "run")
    done = run_training(run, *SETTINGS)
    assert done.returncode == 0, done.stdout + done.stderr
    losses = losses_by_step(run)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


def last_step(run: RunDir) -> int:
    return max((r["step"] for r in read_metrics(run, "train")), default=0)


def saving_now(run: RunDir) -> bool:
    return any(p.name.startswith(".tmp-") for p in run.checkpoints.iterdir())


def kill9_when(run: RunDir, ready, *args: str, env=None) -> None:
    proc = start_training(run, *args, env=env)
    try:
        assert wait_for(lambda: ready() or proc.poll() is not None, timeout=90)
        assert proc.poll() is None, f"finished before it could be killed:\n{proc.stdout.read()}"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_kill_9_anywhere_then_resume_matches_uninterrupted(template, tmp_path, reference, seed):
    rng = random.Random(seed)
    run = fresh(template, tmp_path / "run")
    # 1. killed at a random step
    k = rng.randint(6, 16)  # after the first checkpoint (step 5)
    kill9_when(run, lambda: last_step(run) >= k, *SETTINGS)
    killed_at = last_step(run)
    assert (run.root / LOCK_NAME).exists()  # a dead process's lock is left behind...
    # 2. resumed, then killed in the middle of writing a checkpoint (saves slowed down)
    kill9_when(run, lambda: saving_now(run), "--resume", "latest",
               env=subprocess_env(SIMONE_FAULT_SLOW_SAVE="0.4"))
    assert saving_now(run)  # the half-written checkpoint is still there
    # 3. resumed to the end
    done = run_training(run, "--resume", "latest")
    assert done.returncode == 0, done.stdout + done.stderr
    assert not saving_now(run)
    losses = losses_by_step(run)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses == reference, f"diverged after kill at step {killed_at}"
    resumes = [r for r in read_metrics(run, "event") if r["event"] == "resume"]
    assert len(resumes) == 2 and resumes[0]["step"] <= killed_at
    assert run.read_status()["state"] == "finished"
    assert "taking over a stale lock" in run.log.read_text()  # ...and taken over on resume
    assert not (run.root / LOCK_NAME).exists()


@pytest.mark.slow
def test_sigterm_saves_and_stops_and_a_live_run_refuses_a_second(template, tmp_path, reference):
    run = fresh(template, tmp_path / "run")
    # slowed down (0.4 s a step) so that it is still running while a second process starts
    proc = start_training(run, *SETTINGS, env=subprocess_env(SIMONE_FAULT_STEP_DELAY="0.4"))
    try:
        assert wait_for(lambda: last_step(run) >= 7 or proc.poll() is not None, timeout=90)
        status = run.read_status()
        assert status["state"] == "running" and status["pid"] == proc.pid and status["heartbeat"] > 0
        second = run_training(run, *SETTINGS)
        assert second.returncode == 2 and f"in use by pid {proc.pid}" in second.stderr
        assert proc.poll() is None, "the first run ended before it could be signalled"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, out
    status = run.read_status()
    stopped_at = status["step"]
    assert status["state"] == "stopped" and 7 <= stopped_at < STEPS
    (stopped,) = [r for r in read_metrics(run, "event") if r["event"] == "stopped"]
    assert stopped["step"] == stopped_at
    assert (run.checkpoints / f"step_{stopped_at:06d}" / "MANIFEST.json").exists()
    assert (run.checkpoints / "latest").read_text().strip() == f"step_{stopped_at:06d}"
    done = run_training(run, "--resume", "latest")
    assert done.returncode == 0, done.stdout + done.stderr
    assert losses_by_step(run) == reference
