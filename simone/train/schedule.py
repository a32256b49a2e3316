"""The learning-rate schedule of one run: planned over steps, or over time under a time cap.

Without a time cap, or when the planned steps fit comfortably inside it, the schedule is the
plain one: linear warmup, then a half cosine to `lr * min_lr_ratio` over the planned steps
(`lr_at`), a pure function of the step. `train.lr_schedule=wsd` makes it warmup-stable-decay
over the planned steps too: the lr holds at its peak until the last `decay_fraction` of them,
which take the same half cosine to the same floor (nanochat's long warm-down, linear there, is
`decay_fraction=0.65, min_lr_ratio=0.05`).

A time cap (`train.max_minutes`) that the planned steps will not fit, judged from the measured
step throughput, turns it into warmup-stable-decay: the learning rate holds where it is, and the
decay (the same half-cosine shape, to the same floor) takes the last `decay_fraction` of the
whole run (warmup included) as predicted from the time left: if the run will end at step E, it
starts at step E - decay_fraction * E. The predicted end is re-fitted at every logging step;
until the decay starts its start moves with it (a start that has already passed by then starts
it at once, still ending at the predicted end), and the start is a step number, so the decay
begins between logging steps, not at the next one (with log_every close to the decay's length,
waiting for a logging step squeezed the whole decay into the last step). Once it has started,
the re-fit only moves its end, continuing from the progress reached, so the run reaches its
floor as the cap arrives, on a fast machine or a slow one, instead of being cut mid-schedule.

The throughput counts training steps only: time inside `paused()` (evaluation, samples,
checkpoints) is left out of it, and the session's first logging interval (compile and
allocator warm-up) is never measured. The step time is that of the last RATE_WINDOW logging
intervals, or of the last interval alone when that is SLOWDOWN times slower (the machine slowed
down). Pauses still eat into the time left, so they enter the plan as an overhead ratio, and the
longest one is kept in reserve before the cap (room for the final evaluation and checkpoint).
Evaluations still to come (`expect_evaluations`: every `eval_every` steps, and the final one)
are reserved too, each at the longest pause seen or, before any was seen, at an estimate in
training steps: the first evaluation of a short capped run otherwise comes as a surprise near
the end and cuts the decay short.

The plan changes only at logging steps, and the lr is a function of the step and the plan in
between, so every rank uses the same learning rate (the trainer agrees the throughput over the
ranks) and a checkpoint (`state_dict`) carries it: an uncapped run resumes bit for bit; a capped
run resumed before its decay began holds the lr until the new session has measured its speed.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from simone.config import ConfigError

# The planned steps "fit" the cap when they need at most this share of the time left (judged
# once per session, at the first measurement; later a plan is changed only when it no longer fits)
FIT_MARGIN = 0.9
# Step time is measured over the last this many logging intervals: recent enough to see a
# machine slow down (another job starts) in time to re-fit the decay, long enough to smooth noise
RATE_WINDOW = 8
# ... unless the last interval alone is this much slower (another job started): then plan by it,
# or a long window (8 intervals of log_every=50 is 400 steps) cuts the decay off at the cap
SLOWDOWN = 1.25


def cosine_factor(q: float) -> float:
    """1 at q=0, 0 at q=1: the half-cosine shape of every decay here."""
    return 0.5 * (1.0 + math.cos(math.pi * min(max(q, 0.0), 1.0)))


def lr_at(
    step: int, base_lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float, decay_start: int = 0
) -> float:
    """Learning rate for the optimizer step with 0-based index `step`.

    Warmup rises linearly from base_lr/(warmup+1) to base_lr over `warmup_steps` steps; the lr
    holds there until `decay_start` (if later); then a half cosine falls to `base_lr *
    min_lr_ratio` at `total_steps`, and stays there after.
    """
    min_lr = base_lr * min_lr_ratio
    if step < warmup_steps:
        return base_lr * (step + 1) / (warmup_steps + 1)
    if step >= total_steps or total_steps <= warmup_steps:
        return min_lr
    start = max(warmup_steps, decay_start)
    if step < start:
        return base_lr
    return min_lr + cosine_factor((step - start) / (total_steps - start)) * (base_lr - min_lr)


class LRSchedule:
    """Learning rate per step; `observe` at logging steps re-plans it under a time cap.

    `lr(step)` is for the optimizer step with 0-based index `step`; `progress(steps_done)` is
    how far the schedule has got (1.0: at its floor). `clock` returns seconds (monotonic).
    """

    def __init__(
        self,
        base_lr: float,
        warmup_steps: int,
        total_steps: int,
        min_lr_ratio: float,
        max_seconds: float | None = None,
        decay_fraction: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
        shape: str = "cosine",
    ):
        if not 0.0 < decay_fraction <= 1.0:
            raise ConfigError(f"train.decay_fraction={decay_fraction}: must be in (0, 1]")
        if shape not in ("cosine", "wsd"):
            raise ConfigError(f"train.lr_schedule={shape!r}: choose cosine or wsd")
        # wsd: the planned steps decay from here (0: from the end of warmup, the plain cosine)
        self.decay_start = total_steps - round(decay_fraction * total_steps) if shape == "wsd" else 0
        self.base_lr, self.warmup_steps, self.min_lr_ratio = base_lr, warmup_steps, min_lr_ratio
        self.total_steps, self.max_seconds = total_steps, max_seconds
        self.decay_fraction, self.clock = decay_fraction, clock
        self.eval_every: int | None = None  # see expect_evaluations
        self.eval_steps = 0.0
        self.reset()
        self.start_session()

    def expect_evaluations(self, every: int | None, steps_each: float) -> None:
        """Evaluations (with their checkpoint) come every `every` steps and at the end; until one
        is timed, each is assumed to take as long as `steps_each` training steps."""
        self.eval_every = every if every and every > 0 else None
        self.eval_steps = max(0.0, float(steps_each))

    # ---------------------------------------------------------------- the plan (in checkpoints)

    def reset(self) -> None:
        """The initial plan: cosine over the planned steps."""
        self.mode = "cosine"  # "cosine" (over planned steps) | "time" (warmup-stable-decay to the cap)
        self.hold = 1.0  # time mode: the lr factor held until the decay starts
        self.decay_anchor: tuple[int, float] | None = None  # time mode: (step, decay progress) the plan starts from
        self.end_step = self.total_steps  # the step count at which the lr reaches its floor

    def state_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "hold": self.hold,
            "end_step": self.end_step,
            "decay_anchor": list(self.decay_anchor) if self.decay_anchor is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any] | None, steps_done: int | None = None) -> None:
        """Continue a saved plan (None: a checkpoint from before time planning: cosine) at
        `steps_done` steps. A decay that had not started by then is dropped: its start and end
        were fitted to the saved session's cap, so the lr holds until this session measured its own."""
        self.reset()
        if not state or state.get("mode") != "time":
            return  # cosine: a function of the step and this run's total_steps
        self.mode = "time"
        self.hold = float(state["hold"])
        anchor = state.get("decay_anchor")
        if anchor is None or (steps_done is not None and int(anchor[0]) >= steps_done):
            return  # held (end_step: the planned steps) until the next re-plan
        self.end_step = min(int(state["end_step"]), self.total_steps)
        self.decay_anchor = (int(anchor[0]), float(anchor[1]))

    # ---------------------------------------------------------------- learning rate and progress

    def factor(self, step: int) -> float:
        """The learning rate of step `step` (0-based) as a fraction of the peak."""
        if step < self.warmup_steps or self.mode == "cosine":
            return lr_at(step, 1.0, self.warmup_steps, self.total_steps, self.min_lr_ratio, self.decay_start)
        anchor = self.decay_anchor
        if anchor is None:
            return self.hold
        return self.min_lr_ratio + (self.hold - self.min_lr_ratio) * cosine_factor(self._decay_progress(step, anchor))

    def lr(self, step: int) -> float:
        return self.base_lr * self.factor(step)

    def _decay_progress(self, step: int, anchor: tuple[int, float]) -> float:
        """Decay progress of step `step` from `anchor` (a `decay_anchor`): the plan's last step (end_step - 1)
        runs at the floor. The anchor's progress is that of the step before it, so a re-fit is continuous."""
        anchor_step, anchor_q = anchor
        span = max(1, self.end_step - anchor_step)
        return min(1.0, anchor_q + (1.0 - anchor_q) * max(0, step + 1 - anchor_step) / span)

    def progress(self, steps_done: int) -> float:
        """How far the schedule got after `steps_done` steps: 0.0 .. 1.0 (the lr at its floor)."""
        # 4 decimals, rounded down: 29999 of 30000 steps is not a finished 1.0
        return min(1.0, math.floor(steps_done / max(1, self.end_step) * 10_000 + 1e-6) / 10_000)

    def finished(self, steps_done: int) -> bool:
        """A time-planned schedule has reached its floor (the run's cap has come: stop)."""
        return self.mode == "time" and steps_done >= self.end_step

    # ---------------------------------------------------------------- time (this session only)

    def start_session(self) -> None:
        """Start the clock: the cap counts from here (a resumed run gets a fresh one)."""
        self._start = self.clock()
        self._paused_s = 0.0
        self._longest_pause_s = 0.0
        # (steps done, training s, wall s) at the logging steps of the rate window; the first of
        # the session (its interval holds compile and warm-up) starts the measurement
        self._marks: deque[tuple[int, float, float]] = deque(maxlen=RATE_WINDOW)
        self._first: tuple[int, float, float] | None = None
        self._decided = False  # the first fit judgement (with FIT_MARGIN) of this session is made
        self._interval = 1  # steps between the last two logging steps
        self._announced = False  # the start of the decay is said

    def elapsed_s(self) -> float:
        return self.clock() - self._start

    def out_of_time(self) -> bool:
        return self.max_seconds is not None and self.elapsed_s() >= self.max_seconds

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time inside is not training (evaluation, samples, checkpoints): not in the throughput."""
        t0 = self.clock()
        try:
            yield
        finally:
            pause = self.clock() - t0
            self._paused_s += pause
            self._longest_pause_s = max(self._longest_pause_s, pause)

    def observe(self, steps_done: int, agree: Callable[[float], float] = lambda x: x) -> str | None:
        """At a logging step (after the host sync): measure throughput and, under a time cap,
        re-plan. `agree` makes the ranks agree on a number (the minimum over them); it is
        called at the same steps on every rank. Returns a message when the plan changes kind."""
        if self.max_seconds is None:
            return None
        wall = self.elapsed_s()
        train = wall - self._paused_s
        if self._first is None or steps_done <= self._marks[-1][0]:  # first of the session, or a rollback
            self._first = (steps_done, train, wall)
            self._marks.clear()
            self._marks.append(self._first)
            return None
        window_step, window_train, _ = self._marks[0]
        last_step, last_train, _ = self._marks[-1]
        self._interval = steps_done - last_step  # steps until the next logging step, likely
        self._marks.append((steps_done, train, wall))
        step_s = max(train - window_train, 1e-9) / (steps_done - window_step)
        last_step_s = max(train - last_train, 1e-9) / (steps_done - last_step)
        if last_step_s > SLOWDOWN * step_s:
            step_s = last_step_s  # the machine slowed down: the window would see it too late to re-fit
        # pauses come now and then (every eval_every steps): their share over the whole session
        _, first_train, first_wall = self._first
        overhead = max(1.0, (wall - first_wall) / max(train - first_train, 1e-9))
        # one evaluation with its checkpoint: as long as the longest pause, or the estimate before any
        pause_s = max(self._longest_pause_s, self.eval_steps * step_s)
        left_s = self.max_seconds - wall - pause_s  # the final evaluation and checkpoint
        steps_fit = max(0.0, left_s) / (step_s * overhead)
        if self.eval_every:  # and the periodic ones due before the end (a fixed point: a few rounds)
            for _ in range(4):
                due = int((steps_done + steps_fit) // self.eval_every - steps_done // self.eval_every)
                steps_fit = max(0.0, left_s - due * pause_s) / (step_s * overhead)
        steps_fit = agree(steps_fit)
        return self._replan(steps_done, steps_fit, step_s, self.max_seconds)

    def _replan(self, steps_done: int, steps_fit: float, step_s: float, max_seconds: float) -> str | None:
        planned_left = self.total_steps - steps_done
        message = None
        if self.mode == "cosine":
            if steps_done < self.warmup_steps:
                return None  # the warmup is the same either way: judge with the most measurements
            margin = 1.0 if self._decided else FIT_MARGIN
            self._decided = True
            if planned_left <= margin * steps_fit:
                return None  # fits: the plain schedule, as planned
            # hold the lr where the cosine has it (the end of warmup: the peak) and plan by time
            self.hold = self.factor(steps_done)
            self.mode = "time"
            message = (
                f"the {self.total_steps} planned steps do not fit the {max_seconds / 60:g}-minute cap "
                f"at {1 / step_s:.3g} steps/s: warmup-stable-decay, the decay ({self.decay_fraction:.0%} "
                f"of the run) ending as the cap arrives"
            )
        # floor, with a hair for float error: a step that does not quite fit is not planned
        steps_left = max(0, min(planned_left, math.floor(steps_fit + 1e-6)))
        end = steps_done + steps_left
        started = self.decay_anchor  # started once a step already taken ran below the held lr: then fixed
        if started is None or started[0] >= steps_done:
            # the decay is the last decay_fraction of the whole run (warmup included), never in the
            # warmup, never before the steps already taken: until it starts it is re-planned freely,
            # and a late decision starts it now (ending at the predicted end), not compressed
            start = max(end - round(self.decay_fraction * end), self.warmup_steps, steps_done)
            self.decay_anchor = (start, 0.0)
            self.end_step = max(end, start + 1)
            # say so once, at the logging step before it starts (it starts between logging steps)
            if self._announced or start >= steps_done + self._interval:
                return message
            self._announced = True
            return (message + "; " if message else "") + (
                f"learning-rate decay starts at step {start}, to end at step {self.end_step}"
            )
        # re-fit the decay: continue from the progress of the last step taken, to the new end
        anchor = max(steps_done, started[0])
        done = self._decay_progress(anchor - 1, started)
        self.decay_anchor = (anchor, done)
        # at least one more step, at the floor, unless the last one ran there already
        self.end_step = steps_done if done >= 1.0 else max(end, anchor + 1)
        return message


# Why a run stopped, in words: every stop but the planned end is a choice or an accident the
# user should see named, with how far the schedule got (status.json, console, reports).
STOP_REASONS = {
    "num_epochs": "the planned end",
    "max_steps": "the step cap (train.max_steps)",
    "max_minutes": "the time cap (train.max_minutes)",
    "early_stop": "early stopping (the validation loss stopped improving)",
    "signal": "a signal (resume with --resume latest)",
}


def percent_done(progress: float) -> str:
    """0.9983 → '99.8%' (never rounded up to a finished-looking 100%)."""
    return f"{math.floor(progress * 1000 + 1e-6) / 10:g}%"


def stop_summary(reason: str, progress: float) -> str:
    """'max_minutes (the time cap (train.max_minutes)), learning-rate schedule 100% done'."""
    return f"{reason} ({STOP_REASONS.get(reason, reason)}), learning-rate schedule {percent_done(progress)} done"
