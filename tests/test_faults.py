"""Numerical faults, a full disk, a mismatched checkpoint and the run-directory lock."""

from __future__ import annotations

import subprocess
import sys

import pytest

from simone.checkpoint import CheckpointMismatchError, list_checkpoints, load_checkpoint, read_pointer
from simone.faults import Faults
from simone.lock import LOCK_NAME, RunLock, RunLockedError
from simone.train.schedule import lr_at
from simone.train.trainer import TrainingError, train
from train_support import new_run, read_metrics


def events(run, name):
    return [r for r in read_metrics(run, "event") if r["event"] == name]


def test_fault_spec_parsing():
    f = Faults.from_env({"SIMONE_FAULT_NAN_AT_STEP": "3,5-6,9+", "SIMONE_FAULT_NAN_ONCE": "1"})
    assert [s for s in range(12) if f.nan_at(s)] == [3, 5, 6, 9, 10, 11]
    assert not f.nan_at(5)  # once: already fired
    assert not Faults.from_env({}).active


@pytest.mark.parametrize("fused", [True, False])
def test_one_nan_step_is_skipped_and_logged(template, tmp_path, monkeypatch, fused):
    monkeypatch.setenv("SIMONE_FAULT_NAN_AT_STEP", "5")
    cfg, run = new_run(template, tmp_path / "r", max_steps=8, checkpoint_every=100, eval_every=100,
                       fused_adamw=fused)
    result = train(cfg, run)
    assert result.stop_reason == "max_steps" and result.steps == 8
    skips = events(run, "nan_skip")
    assert [e["step"] for e in skips] == [5] and skips[0]["skipped"] == 1
    rows = {r["step"]: r for r in read_metrics(run, "train")}
    assert rows[5]["loss"] is None  # no finite step in that logging interval
    assert all(rows[s]["loss"] is not None and rows[s]["loss"] < 7 for s in (4, 6, 7, 8))
    _, state, _ = load_checkpoint(run.checkpoints / "step_000008")
    steps_taken = {int(v["step"]) for v in state["optimizer"]["state"].values()}
    assert steps_taken == {7}  # the poisoned step never reached the weights or the moments
    assert not events(run, "rollback")


def test_consecutive_nan_steps_roll_back_with_lower_lr(template, tmp_path, monkeypatch):
    monkeypatch.setenv("SIMONE_FAULT_NAN_AT_STEP", "6-8")
    monkeypatch.setenv("SIMONE_FAULT_NAN_ONCE", "1")
    cfg, run = new_run(template, tmp_path / "r", max_steps=12, checkpoint_every=4, eval_every=100,
                       max_bad_steps=3, rollback_lr_factor=0.5)
    result = train(cfg, run)
    assert result.stop_reason == "max_steps" and result.steps == 12
    (rb,) = events(run, "rollback")
    assert rb["from_step"] == 8 and rb["step"] == 4 and "step_000004" in rb["message"]
    assert rb["lr_scale"] == 0.5
    lrs = {}
    for r in read_metrics(run, "train"):
        lrs[r["step"]] = r["lr"]  # after the rollback, steps 5.. are logged again
    tc = cfg.train
    for step in (5, 9, 12):
        assert lrs[step] == pytest.approx(0.5 * lr_at(step - 1, tc.lr, tc.warmup_steps, 12, tc.min_lr_ratio))
    assert run.read_status()["state"] == "finished"


def test_rollback_before_any_checkpoint_restarts_from_the_seeded_initial_weights(template, tmp_path, monkeypatch):
    monkeypatch.setenv("SIMONE_FAULT_NAN_AT_STEP", "2-3")
    monkeypatch.setenv("SIMONE_FAULT_NAN_ONCE", "1")
    cfg, run = new_run(template, tmp_path / "r", max_steps=5, checkpoint_every=100, eval_every=100,
                       log_every=1, max_bad_steps=2, rollback_lr_factor=0.5)
    result = train(cfg, run)
    assert result.stop_reason == "max_steps" and result.steps == 5
    (rb,) = events(run, "rollback")
    assert rb["from_step"] == 3 and rb["step"] == 0 and "initial weights" in rb["message"]
    first_steps = [r["loss"] for r in read_metrics(run, "train") if r["step"] == 1]
    # step 1 again: the same initial weights, data and dropout stream give the same loss
    assert len(first_steps) == 2 and first_steps[0] == first_steps[1]


def test_persistent_nan_fails_after_max_rollbacks(template, tmp_path, monkeypatch):
    monkeypatch.setenv("SIMONE_FAULT_NAN_AT_STEP", "6+")
    cfg, run = new_run(template, tmp_path / "r", max_steps=20, checkpoint_every=4, eval_every=100,
                       max_bad_steps=2, max_rollbacks=2)
    with pytest.raises(TrainingError, match="non-finite") as err:
        train(cfg, run)
    assert err.value.reason == "non_finite"
    assert len(events(run, "nan_skip")) == 6  # 2 bad steps x 3 attempts
    assert [e["rollbacks"] for e in events(run, "rollback")] == [1, 2]
    assert events(run, "failed")
    status = run.read_status()
    assert status["state"] == "failed" and "non-finite" in status["error"]
    assert not (run.root / LOCK_NAME).exists()


def test_disk_full_during_save_stops_cleanly_and_keeps_previous(template, tmp_path, monkeypatch):
    monkeypatch.setenv("SIMONE_FAULT_ENOSPC_ON_SAVE", "8")
    cfg, run = new_run(template, tmp_path / "r", max_steps=12, checkpoint_every=4, eval_every=100)
    with pytest.raises(TrainingError, match="disk full") as err:
        train(cfg, run)
    assert err.value.reason == "checkpoint_save"
    status = run.read_status()
    assert status["state"] == "failed" and "disk full" in status["error"] and status["step"] == 8
    assert [p.name for p in list_checkpoints(run.checkpoints)] == ["step_000004"]
    assert read_pointer(run.checkpoints, "latest") == "step_000004"
    assert not [p for p in run.checkpoints.iterdir() if p.name.startswith(".")]
    monkeypatch.delenv("SIMONE_FAULT_ENOSPC_ON_SAVE")
    result = train(cfg, run, resume="latest")  # space freed: the run goes on from step 4
    assert result.steps == 12


def test_resuming_with_a_different_model_shape_is_a_clear_error(template, tmp_path):
    cfg, run = new_run(template, tmp_path / "r", max_steps=2, checkpoint_every=100, eval_every=100)
    train(cfg, run)
    cfg.model.dim = 32
    with pytest.raises(CheckpointMismatchError, match=r"step_000002/model.safetensors: weights do not fit.*has shape"):
        train(cfg, run, resume="latest")
    assert run.read_status()["state"] == "failed"


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def hold_lock(run_root) -> subprocess.Popen:
    """Another process that holds the run lock until killed (prints 'locked' once it does)."""
    code = ("import sys, time; from simone.lock import RunLock; "
            f"lock = RunLock({str(run_root)!r}).acquire(); print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_live_lock_refuses_and_a_dead_owners_lock_is_taken_over(template, tmp_path):
    cfg, run = new_run(template, tmp_path / "r", max_steps=1, eval_every=100)
    live = hold_lock(run.root)
    try:
        with pytest.raises(RunLockedError, match=f"in use by pid {live.pid}"):
            train(cfg, run)
        assert (run.root / LOCK_NAME).exists()  # the owner's lock is left alone
    finally:
        live.kill()
        live.wait()
    # the kernel dropped the dead owner's flock; its file (and pid) is still there
    assert f'"pid": {live.pid}' in (run.root / LOCK_NAME).read_text()
    warnings: list[str] = []
    with RunLock(run.root, warn=warnings.append):
        assert f"stale lock from pid {live.pid}" in warnings[0]
        with RunLock(run.root):  # re-entrant in the same process
            pass
        assert (run.root / LOCK_NAME).exists()
    assert not (run.root / LOCK_NAME).exists()
    assert train(cfg, run).steps == 1  # a dead owner does not block training


def test_a_lock_file_alone_does_not_lock(template, tmp_path):
    """Only a live flock holds a run: garbage or a live pid written into the file does not."""
    cfg, run = new_run(template, tmp_path / "r", max_steps=1, eval_every=100)
    (run.root / LOCK_NAME).write_text("{}")
    with RunLock(run.root):
        pass
    (run.root / LOCK_NAME).write_text(f'{{"pid": {_dead_pid()}, "host": null}}')
    assert train(cfg, run).steps == 1


def test_out_of_memory_names_the_batch_and_the_accumulation_that_keeps_it(template, tmp_path, monkeypatch):
    monkeypatch.setenv("SIMONE_FAULT_OOM_AT_STEP", "3")
    cfg, run = new_run(template, tmp_path / "r", max_steps=5, batch_size=16, grad_accum=2, eval_every=100)
    with pytest.raises(TrainingError, match="batch_size=16") as err:
        train(cfg, run)
    assert err.value.reason == "out_of_memory"
    assert "--set train.batch_size=8 --set train.grad_accum=4" in str(err.value)
    assert "effective batch of 32 sequences" in str(err.value)
    status = run.read_status()
    assert status["state"] == "failed" and "out of GPU memory" in status["error"]
