"""A time cap through the real trainer on a fake clock (no sleeping), and every stop said:
status.json, the final console lines, the validation report and the model card name why
training stopped (`stop_reason`) and how far the learning-rate schedule got
(`schedule_progress`)."""

from __future__ import annotations

import json

import pytest

from simone.inference.package import model_card, training_summary
from simone.checkpoint import load_checkpoint, resolve_checkpoint
from simone.train.schedule import lr_at
from simone.train.schedule import stop_summary
from simone.train.trainer import Trainer, train
from simone.inference.validation_report import validate
from train_support import new_run, read_metrics


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def slow_machine(monkeypatch, clock: FakeClock, step_s: float, eval_s: float) -> None:
    """Each optimizer step takes `step_s` fake seconds, each evaluation `eval_s`."""
    step, evaluate = Trainer._train_step, Trainer._evaluate

    def timed_step(self):
        clock.now += step_s
        return step(self)

    def timed_evaluate(self):
        clock.now += eval_s
        return evaluate(self)

    monkeypatch.setattr(Trainer, "_train_step", timed_step)
    monkeypatch.setattr(Trainer, "_evaluate", timed_evaluate)


def capped_run(template, dest, monkeypatch, step_s: float):
    """2 epochs of 18 steps planned (warmup 10), a 30 s cap, an evaluation (1 s) every 10 steps."""
    cfg, run = new_run(template, dest, batch_size=16, num_epochs=2, min_epochs=2, max_minutes=0.5,
                       eval_every=10, checkpoint_every=100, log_every=1)
    clock = FakeClock()
    slow_machine(monkeypatch, clock, step_s=step_s, eval_s=1.0)
    result = train(cfg, run, clock=clock)
    lrs = {r["step"]: r["lr"] for r in read_metrics(run, "train")}
    return cfg, run, result, [lrs[s] for s in sorted(lrs)], clock


@pytest.fixture(scope="module")
def slow(template, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        return capped_run(template, tmp_path_factory.mktemp("slow") / "run", mp, step_s=1.0)


def test_a_capped_run_on_a_slow_machine_ends_its_schedule_as_the_cap_arrives(slow):
    cfg, run, result, lrs, clock = slow
    assert result.stop_reason == "max_minutes" and result.schedule_progress == 1.0
    assert 20 <= result.steps < 36  # 36 planned steps of 1 s (and evaluations) do not fit 30 s
    assert lrs[-1] == pytest.approx(cfg.train.lr * cfg.train.min_lr_ratio)  # the last step at min lr
    after_warmup = lrs[cfg.train.warmup_steps:]
    assert all(b <= a for a, b in zip(after_warmup, after_warmup[1:]))
    assert clock.now <= 30.0 + 1.0  # the cap (+ the final evaluation after it)
    planned, decay = [r for r in read_metrics(run, "event") if r["event"] == "schedule"]
    assert "do not fit" in planned["message"] and planned["mode"] == "time"
    assert planned["step"] == cfg.train.warmup_steps  # judged once warmup is measured
    assert "decay starts" in decay["message"] and lrs[decay["step"] - 1] == cfg.train.lr  # held at the peak
    _, state, _ = load_checkpoint(resolve_checkpoint(run.root, "latest"))
    assert state["schedule"]["mode"] == "time" and state["schedule"]["end_step"] == result.steps


def test_a_capped_run_on_a_fast_machine_runs_its_planned_cosine(template, tmp_path, monkeypatch):
    cfg, run, result, lrs, _ = capped_run(template, tmp_path / "run", monkeypatch, step_s=0.1)
    assert result.stop_reason == "num_epochs" and result.steps == 36 and result.schedule_progress == 1.0
    tc = cfg.train
    assert lrs == pytest.approx([lr_at(s, tc.lr, tc.warmup_steps, 36, tc.min_lr_ratio) for s in range(36)])


def test_status_names_the_stop_and_the_schedule_progress(slow, template, tmp_path):
    _, run, _, _, _ = slow
    status = run.read_status()
    assert status["stop_reason"] == "max_minutes" and status["schedule_progress"] == 1.0
    (finished,) = [r for r in read_metrics(run, "event") if r["event"] == "finished"]
    assert finished["stop_reason"] == "max_minutes" and finished["schedule_progress"] == 1.0
    assert "time cap" in finished["message"] and "100% done" in finished["message"]
    # a cap that comes before anything could be measured stops the schedule barely begun: said so
    cfg, run2 = new_run(template, tmp_path / "steps", batch_size=16, num_epochs=2, max_steps=None,
                        eval_every=100, checkpoint_every=100, log_every=4)
    cfg.train.max_minutes = 1e-9
    result = train(cfg, run2)
    assert result.stop_reason == "max_minutes" and result.schedule_progress < 0.1
    status = run2.read_status()
    assert status["stop_reason"] == "max_minutes" and status["schedule_progress"] == result.schedule_progress


def test_the_final_console_lines_name_the_stop():
    assert stop_summary("max_minutes", 1.0) == (
        "max_minutes (the time cap (train.max_minutes)), learning-rate schedule 100% done")
    assert stop_summary("early_stop", 0.4567).endswith("schedule 45.6% done")
    assert "99.9%" in stop_summary("signal", 0.9999)  # never rounded up to a finished-looking 100%

    from simone.workflows.pipeline import _training_ended
    from simone.train.trainer import TrainResult

    result = TrainResult(steps=10, epochs=0, best_val_loss=None, final_val_loss=None, best_checkpoint=None,
                         last_checkpoint=None, tokens_seen=0, tokens_per_s=0.0, mfu=None, seconds=1.0,
                         stop_reason="max_steps", schedule_progress=0.25)
    assert _training_ended(result) == "training ended: " + stop_summary("max_steps", 0.25)


def test_validation_report_and_model_card_name_the_stop(slow, tmp_path):
    _, run, _, _, _ = slow
    report = validate(run.root, out_dir=tmp_path / "validation", max_batches=1, sample_tokens=4)
    assert report["stop_reason"] == "max_minutes" and report["schedule_progress"] == 1.0
    saved = json.loads((tmp_path / "validation" / "report.json").read_text())
    assert saved["stop_reason"] == "max_minutes" and saved["schedule_progress"] == 1.0
    md = (tmp_path / "validation" / "report.md").read_text()
    assert "Training stopped: max_minutes" in md and "schedule 100% done" in md

    summary = training_summary(run, resolve_checkpoint(run.root, "best"))
    assert summary["training"]["stop_reason"] == "max_minutes"
    assert summary["training"]["schedule_progress"] == 1.0
    card = model_card(summary)
    assert "| training stopped by | max_minutes, learning-rate schedule 100% done |" in card


def test_a_resumed_capped_run_continues_its_time_plan(template, tmp_path, monkeypatch):
    """Stopped by a signal in the stable phase, then resumed (a fresh 30 s): the saved plan
    holds the peak until the new session has measured its own speed, then decays to the floor."""
    cfg, run = new_run(template, tmp_path / "run", batch_size=16, num_epochs=2, min_epochs=2, max_minutes=0.5,
                       eval_every=10, checkpoint_every=100, log_every=1)
    clock = FakeClock()
    slow_machine(monkeypatch, clock, step_s=1.0, eval_s=1.0)
    monkeypatch.setenv("SIMONE_FAULT_SIGTERM_AT_STEP", "15")
    first = train(cfg, run, clock=clock)
    assert first.stop_reason == "signal" and first.steps == 15 and first.schedule_progress < 1.0
    assert [r for r in read_metrics(run, "event") if r["event"] == "schedule"]  # planned by time
    monkeypatch.delenv("SIMONE_FAULT_SIGTERM_AT_STEP")
    clock = FakeClock()
    slow_machine(monkeypatch, clock, step_s=1.0, eval_s=1.0)
    second = train(cfg, run, resume="latest", clock=clock)
    lrs = {r["step"]: r["lr"] for r in read_metrics(run, "train")}
    assert lrs[16] == lrs[17] == cfg.train.lr  # held, as planned before the stop (a cosine would be lower)
    assert second.schedule_progress == 1.0
    assert lrs[second.steps] == pytest.approx(cfg.train.lr * cfg.train.min_lr_ratio)
