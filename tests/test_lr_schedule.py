"""The learning-rate schedule: linear warmup, cosine decay to the floor, flat after."""

from __future__ import annotations

import math

import pytest

from simone.train.schedule import lr_at


def test_warmup_is_linear_and_reaches_the_peak():
    lrs = [lr_at(s, 1.0, 10, 100, 0.1) for s in range(10)]
    assert lrs[0] == pytest.approx(1 / 11)
    assert all(b > a for a, b in zip(lrs, lrs[1:]))
    assert lrs[9] == pytest.approx(10 / 11)
    assert lr_at(10, 1.0, 10, 100, 0.1) == pytest.approx(1.0)


def test_cosine_decays_to_the_floor_and_stays_there():
    total = 100
    lrs = [lr_at(s, 2.0, 10, total, 0.1) for s in range(10, total)]
    assert all(b <= a for a, b in zip(lrs, lrs[1:]))
    mid = lr_at(55, 2.0, 10, total, 0.1)  # half-way through the decay
    assert mid == pytest.approx(0.2 + 0.5 * (2.0 - 0.2))
    assert lr_at(total, 2.0, 10, total, 0.1) == pytest.approx(0.2)
    assert lr_at(total + 50, 2.0, 10, total, 0.1) == pytest.approx(0.2)


def test_no_warmup_starts_at_the_peak():
    assert lr_at(0, 3e-4, 0, 1000, 0.1) == pytest.approx(3e-4)
    assert math.isclose(lr_at(999, 3e-4, 0, 1000, 0.1), 3e-5, rel_tol=1e-3)


# ----------------------------------------------------------------------------- time-planned schedule
# The trainer's loop in miniature on a fake clock (no sleeping): the stop checks, one step of
# `step_s(step)` seconds at the scheduled lr, `observe` at logging steps, evaluations that pause.

from simone.train.schedule import LRSchedule  # noqa: E402


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def simulate(total_steps=1000, warmup=20, cap_s=60.0, step_s=lambda step: 0.1, log_every=1,
             eval_every=0, eval_s=0.0, schedule=None, clock=None):
    clock = clock or FakeClock()
    sched = schedule or LRSchedule(1.0, warmup, total_steps, 0.1, max_seconds=cap_s, decay_fraction=0.2,
                                   clock=clock)
    lrs, step = [], 0
    while True:
        if step >= total_steps:
            reason = "num_epochs"
            break
        if sched.finished(step) or sched.out_of_time():
            reason = "max_minutes"
            break
        lrs.append(sched.lr(step))
        clock.now += step_s(step)
        step += 1
        if step % log_every == 0:
            sched.observe(step)
        if eval_every and step % eval_every == 0:
            with sched.paused():
                clock.now += eval_s
    return sched, clock, step, reason, lrs


def non_increasing(xs):
    return all(b <= a + 1e-12 for a, b in zip(xs, xs[1:]))


def test_a_slow_machine_ends_at_the_floor_exactly_when_the_cap_arrives():
    # 1000 planned steps at 0.1 s need 100 s; the cap is 60 s: 600 steps fit
    sched, clock, steps, reason, lrs = simulate()
    assert reason == "max_minutes" and sched.mode == "time"
    assert steps == 600 and clock.now == pytest.approx(60.0)
    assert sched.progress(steps) == 1.0
    assert lrs[-1] == pytest.approx(0.1)  # the last step runs at min lr
    after_warmup = lrs[20:]
    assert non_increasing(after_warmup)
    # warmup-stable-decay: the peak held, then the decay over the last fifth of the run
    held = sum(1 for lr in after_warmup if lr == pytest.approx(1.0))
    decaying = len(after_warmup) - held
    assert decaying == pytest.approx(0.2 * len(lrs), abs=2)


def test_evaluation_pauses_are_left_out_of_the_throughput_but_not_out_of_the_time():
    # a 2 s evaluation every 100 steps: still at the floor when the cap comes, never after it
    sched, clock, steps, reason, lrs = simulate(eval_every=100, eval_s=2.0)
    assert reason == "max_minutes" and sched.progress(steps) == 1.0
    assert 60.0 - 2.5 <= clock.now <= 60.0  # the longest pause is kept in reserve
    assert lrs[-1] == pytest.approx(0.1) and non_increasing(lrs[20:])
    assert 480 < steps < 600  # 4 evaluations took 8 s of the 60


def test_a_fast_machine_runs_its_planned_steps_on_the_plain_cosine():
    sched, clock, steps, reason, lrs = simulate(step_s=lambda step: 0.01)  # 10 s of a 60 s cap
    assert reason == "num_epochs" and steps == 1000 and sched.mode == "cosine"
    assert sched.progress(steps) == 1.0
    assert lrs == [lr_at(s, 1.0, 20, 1000, 0.1) for s in range(1000)]  # exactly as without a cap


def test_no_cap_is_the_plain_cosine():
    sched = LRSchedule(2.0, 10, 100, 0.1)
    assert [sched.lr(s) for s in range(120)] == [lr_at(s, 2.0, 10, 100, 0.1) for s in range(120)]
    assert sched.observe(50) is None and sched.mode == "cosine" and not sched.out_of_time()


def test_a_slow_compile_step_does_not_make_the_plan_look_too_long():
    # the first step compiles for 20 s; 800 steps of 0.1 s then fit the 120 s cap comfortably
    sched, clock, steps, reason, lrs = simulate(total_steps=800, cap_s=120.0, log_every=5,
                                                step_s=lambda step: 20.0 if step == 0 else 0.1)
    assert reason == "num_epochs" and sched.mode == "cosine" and steps == 800


def test_a_machine_that_slows_down_switches_to_time_and_still_finishes():
    # fits at first (0.03 s a step), then the machine slows to 0.2 s a step half way through
    sched, clock, steps, reason, lrs = simulate(step_s=lambda step: 0.03 if step < 500 else 0.2,
                                                log_every=10, eval_every=100, eval_s=0.5)
    assert reason == "max_minutes" and sched.mode == "time"
    assert sched.progress(steps) == 1.0 and clock.now <= 60.0
    assert lrs[-1] == pytest.approx(0.1) and non_increasing(lrs[20:])
    assert lrs[499] == pytest.approx(lr_at(499, 1.0, 20, 1000, 0.1))  # the cosine until then


@pytest.mark.parametrize("first_interval_s", [58.0, 110.0])
def test_a_slow_compiled_run_logging_every_10_steps_decays_over_a_fifth_of_it(first_interval_s):
    # a real run: 5.3 s a step, the first 10 steps 58 s (torch.compile; ~110 s on the schedule's
    # clock, which also counts the start-up), a 9-minute cap, warmup 50, 1198 planned steps. The
    # decay (~20 steps) is barely longer than the logging interval: it must start between logging
    # steps, not wait for one and be squeezed into the last step (as it was: 1 step of 91).
    sched, clock, steps, reason, lrs = simulate(total_steps=1198, warmup=50, cap_s=540.0, log_every=10,
                                                step_s=lambda step: first_interval_s / 10 if step < 10 else 5.3)
    assert reason == "max_minutes" and sched.mode == "time" and clock.now <= 540.0
    assert 90 <= steps <= 100  # 91 and 100
    decaying = [lr for lr in lrs[50:] if lr < 1.0 - 1e-9]
    assert len(decaying) >= 0.15 * steps and len(decaying) >= 14
    assert non_increasing(lrs[50:]) and lrs[-1] == pytest.approx(0.1)  # the last step at min lr
    last_log = (steps - 1) // 10 * 10  # the lr logged there is that of the step before it
    assert lrs[last_log - 1] < 1.0 - 1e-9 and lrs[last_log - 1] > lrs[-1]
    assert sched.progress(steps) == 1.0
    assert all(sched.progress(s) < 1.0 for s in range(steps))  # 1.0 only once at the floor


def test_the_decay_start_is_said_once_before_it_begins():
    clock = FakeClock()
    sched = LRSchedule(1.0, 50, 1198, 0.1, max_seconds=540.0, decay_fraction=0.2, clock=clock)
    news, step = {}, 0
    while not (sched.finished(step) or sched.out_of_time()):
        clock.now += 5.8 if step < 10 else 5.3
        step += 1
        if step % 10 == 0:
            news[step] = sched.observe(step)
    said = {s: m for s, m in news.items() if m}
    assert "do not fit" in said.pop(50)
    ((at, message),) = said.items()
    start = int(message.split("decay starts at step ")[1].split(",")[0])
    assert "decay starts" in message and at <= start < at + 10


def test_a_machine_that_slows_after_the_plan_starts_the_decay_now_and_ends_at_the_floor():
    # planned by time at 0.1 s a step (decay from step 480 to 600); at step 400 the machine slows to
    # 0.2 s: seen at the next logging step (450) from that interval alone, not from the 8-interval
    # window (400 steps here, too late), the decay starts there and ends at the floor as the cap comes
    sched, clock, steps, reason, lrs = simulate(total_steps=1000, warmup=20, cap_s=60.0, log_every=50,
                                                step_s=lambda step: 0.1 if step < 400 else 0.2)
    assert reason == "max_minutes" and steps == 500 and clock.now == pytest.approx(60.0)
    assert lrs[-1] == pytest.approx(0.1) and sched.progress(steps) == 1.0 and non_increasing(lrs[20:])
    assert lrs[449] == sched.hold and lrs[450] < sched.hold  # held until the slowdown was seen


def test_a_resumed_plan_drops_a_decay_that_had_not_started():
    sched, _, steps, _, _ = simulate(total_steps=1198, warmup=50, cap_s=540.0, log_every=10,
                                     step_s=lambda step: 5.3)
    plan = sched.state_dict()
    again = LRSchedule(1.0, 50, 1198, 0.1, max_seconds=540.0, clock=FakeClock())
    again.load_state_dict(plan, steps_done=60)  # saved at step 60, before its decay
    assert again.mode == "time" and again.decay_anchor is None and not again.finished(steps)
    assert again.lr(90) == 1.0
    again.load_state_dict(plan, steps_done=steps)  # saved during the decay: continued as planned
    assert [again.lr(s) for s in range(steps)] == [sched.lr(s) for s in range(steps)]


def test_the_plan_travels_in_a_checkpoint():
    clock = FakeClock()
    sched, _, steps, _, _ = simulate(clock=clock)
    plan = sched.state_dict()
    assert plan["mode"] == "time" and plan["end_step"] == 600
    again = LRSchedule(1.0, 20, 1000, 0.1, max_seconds=60.0, clock=FakeClock())
    again.load_state_dict(plan)
    assert [again.lr(s) for s in range(600)] == [sched.lr(s) for s in range(600)]
    again.load_state_dict(None)  # a checkpoint from before time planning: the cosine
    assert again.mode == "cosine" and again.lr(300) == lr_at(300, 1.0, 20, 1000, 0.1)


def test_progress_is_never_rounded_up_to_finished():
    sched = LRSchedule(1.0, 0, 30_000, 0.1)
    assert sched.progress(29_999) == 0.9999 and sched.progress(30_000) == 1.0
    assert sched.progress(13 * 1500) == 0.65 and sched.progress(0) == 0.0


def _capped_run_with_a_first_evaluation_near_the_end(expect: bool):
    # a real `make run` on a loaded machine: 2.8 s a step (the first 10 steps 40 s: compile), a
    # 9-minute cap, warmup 50, log every 10, an evaluation + checkpoint of 19 s every 200 steps
    # and at the end; ~210 steps fit, so the first evaluation comes at step 200, inside the decay
    clock = FakeClock()
    sched = LRSchedule(1.0, 50, 1198, 0.1, max_seconds=540.0, decay_fraction=0.2, clock=clock)
    if expect:
        sched.expect_evaluations(200, 8.0)
    sched, clock, steps, reason, lrs = simulate(
        total_steps=1198, warmup=50, cap_s=540.0, log_every=10, eval_every=200, eval_s=19.0,
        step_s=lambda step: 4.0 if step < 10 else 2.8, schedule=sched, clock=clock)
    with sched.paused():  # the final evaluation and checkpoint
        clock.now += 19.0
    return sched, clock, steps, reason, lrs


def test_evaluations_still_to_come_are_reserved_so_the_final_one_ends_before_the_cap():
    sched, clock, steps, reason, lrs = _capped_run_with_a_first_evaluation_near_the_end(expect=True)
    assert reason == "max_minutes" and sched.progress(steps) == 1.0 and lrs[-1] == pytest.approx(0.1)
    assert clock.now <= 540.0  # the final evaluation included
    decaying = [lr for lr in lrs[50:] if lr < 1.0 - 1e-9]
    assert len(decaying) >= 0.15 * steps and non_increasing(lrs[50:])
    assert steps >= 170  # the reserve costs a few steps, not the run


def test_without_the_reserve_the_final_evaluation_ran_past_the_cap():
    # what a real run did before evaluations were expected: the cap came first, the final
    # evaluation after it (the reason the test above must hold)
    sched, clock, steps, reason, lrs = _capped_run_with_a_first_evaluation_near_the_end(expect=False)
    assert clock.now > 540.0
