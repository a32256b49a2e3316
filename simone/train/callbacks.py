"""The trainer's side effects, OLMo-core's way: callbacks with a small interface that the
loop calls at fixed points, so the loop itself stays short.

    on_train_start  after resume / fresh start, before the first step
    on_step_start   before each optimizer step
    on_step_end     right after a step is counted, on the training clock
    on_log          at each logging step, with the interval's numbers (`LogStats`)
    on_pause        then, off the clock: evaluation (`Evaluation` comes first), samples
    on_eval         after each evaluation that measured a validation loss
    on_save_point   last in a step, off the clock: checkpoints (`Checkpointing`)
    on_checkpoint   after rank 0 saved a checkpoint
    on_stop         the loop stopped by its rule or a signal: the last evaluation and checkpoint
    on_train_end    with the final status.json fields (finished | stopped | failed)
    close           always, last (threads, signal handlers)

Each hook gets the `Trainer` (simone/train/trainer.py) and may read its fields and `state`
(`state.TrainState`); callbacks set only `signal_received`, `inject_nan` and the state's records
of evaluations and checkpoints. They run in the order `default_callbacks` lists them.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from simone.checkpoint import check_free_space, estimate_checkpoint_bytes
from simone.data.tokenizer import load_tokenizer
from simone.faults import Faults
from simone.train.distributed import barrier
from simone.train.state import save_train_checkpoint
from simone.train.system_stats import SystemSampler
from simone.units import format_duration

SAMPLE_PROMPT = "In the beginning"
HEARTBEAT_S = 5.0
OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


@dataclass
class LogStats:
    """One logging interval, as the train row of metrics.jsonl has it."""

    step: int
    epoch: float
    loss: float | None  # None: every step of the interval was skipped
    lr: float
    grad_norm: float
    tokens_per_s: float
    steps_per_s: float
    mfu: float | None


class Callback:
    """A side effect of training; every hook does nothing unless overridden."""

    def on_train_start(self, trainer: Any) -> None: ...
    def on_step_start(self, trainer: Any) -> None: ...
    def on_step_end(self, trainer: Any) -> None: ...
    def on_log(self, trainer: Any, stats: LogStats) -> None: ...
    def on_pause(self, trainer: Any, epoch_ended: bool) -> None: ...
    def on_eval(self, trainer: Any, results: dict[str, Any], improved: bool) -> None: ...
    def on_save_point(self, trainer: Any, epoch_ended: bool) -> None: ...
    def on_checkpoint(self, trainer: Any, path: Path, best: bool) -> None: ...
    def on_stop(self, trainer: Any, reason: str) -> None: ...
    def on_train_end(self, trainer: Any, status: dict[str, Any]) -> None: ...
    def close(self, trainer: Any) -> None: ...


def default_callbacks(trainer: Any) -> list[Callback]:
    """The callbacks every run has, in order: rows before status and console, evaluation first."""
    return [
        MetricsRows(),
        RunStatus(),
        StopOnSignal(),
        FaultInjection(trainer.faults),
        Evaluation(),
        ConsoleLog(),
        Samples(trainer),
        Checkpointing(),
    ]


def eta_s(trainer: Any, steps_per_s: float) -> float | None:
    """Seconds to the end of the schedule at `steps_per_s`, or None before a rate is known."""
    if steps_per_s <= 0:
        return None
    return max(0, trainer.state.schedule.end_step - trainer.step) / steps_per_s


# ----------------------------------------------------------------------------- metrics rows and status.json


class MetricsRows(Callback):
    """The loop's rows of metrics.jsonl: a train row at each logging step (with the comprehensive
    loss's terms over the interval), an eval row after each evaluation (and the early stop it called)."""

    def on_log(self, trainer: Any, stats: LogStats) -> None:
        trainer.metrics.train(
            step=stats.step,
            epoch=round(stats.epoch, 4),
            loss=stats.loss,
            lr=stats.lr,
            grad_norm=stats.grad_norm,
            tokens_per_s=round(stats.tokens_per_s, 1),
            mfu=None if stats.mfu is None else round(stats.mfu, 5),
            tokens_seen=trainer.state.tokens_seen,
            **trainer.loss_terms.read_and_reset(),
        )

    def on_eval(self, trainer: Any, results: dict[str, Any], improved: bool) -> None:
        s, metrics = trainer.state, trainer.metrics
        per_domain = {d: {k: v[k] for k in ("loss", "bpb", "ppl")} for d, v in results["per_domain"].items()}
        metrics.eval(
            step=s.step,
            epoch=round(s.epoch, 4),
            val_loss=results["val_loss"],
            val_bpb=results["val_bpb"],
            val_ppl=results["val_ppl"],
            per_domain=per_domain,
        )
        if s.early.stopped:
            metrics.event(
                "early_stop",
                s.step,
                f"validation loss has not improved for {s.early.bad_evals} "
                f"evaluations (best {s.early.best_loss:.4f} at step {s.early.best_step})",
            )


class RunStatus(Callback):
    """status.json (rank 0): `running` at the start, refreshed at logging steps and every few
    seconds by a heartbeat thread (which also writes `system` metric rows), and the final state."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # the heartbeat thread writes too
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def write(self, trainer: Any, **fields: Any) -> None:
        if not trainer.env.is_main:
            return
        with self._lock:
            trainer.run.write_status(stage="train", **fields)

    def on_train_start(self, trainer: Any) -> None:
        self.write(
            trainer,
            state="running",
            error=None,
            step=trainer.step,
            total_steps=trainer.total_steps,
            started=trainer.session_start,
            stop_reason=None,
            schedule_progress=trainer.state.schedule.progress(trainer.step),
        )
        if trainer.env.is_main:
            self._start_heartbeat(trainer)

    def on_log(self, trainer: Any, stats: LogStats) -> None:
        self.write(
            trainer,
            step=trainer.step,
            epoch=round(stats.epoch, 4),
            total_steps=trainer.total_steps,
            eta_s=eta_s(trainer, stats.steps_per_s),
            schedule_progress=trainer.state.schedule.progress(trainer.step),
        )

    def on_train_end(self, trainer: Any, status: dict[str, Any]) -> None:
        self.write(trainer, **status)

    def close(self, trainer: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _start_heartbeat(self, trainer: Any) -> None:
        sampler: Any = None
        try:
            sampler = SystemSampler(trainer.run.root, gpus=trainer.device.type == "cuda")
        except Exception as e:
            trainer.run.log_line(f"system stats disabled ({type(e).__name__}: {e})")
        every = max(0.5, float(trainer.cfg.train.system_stats_every_s or HEARTBEAT_S))

        def beat() -> None:
            last_stats = 0.0
            while not self._stop.wait(min(HEARTBEAT_S, every)):
                try:
                    self.write(trainer, step=trainer.step, total_steps=trainer.total_steps)
                    if sampler is not None and time.time() - last_stats >= every:
                        last_stats = time.time()
                        trainer.metrics.system(sampler.snapshot())
                except Exception as e:
                    trainer.run.log_line(f"heartbeat: {type(e).__name__}: {e}")
            if sampler is not None:
                sampler.close()

        self._thread = threading.Thread(target=beat, name="simone-heartbeat", daemon=True)
        self._thread.start()


# ----------------------------------------------------------------------------- signals and faults


class StopOnSignal(Callback):
    """SIGTERM / SIGINT ask the loop to stop after the current step (it saves a checkpoint);
    a second Ctrl-C stops at once, without one."""

    def __init__(self) -> None:
        self._old_handlers: dict[int, Any] = {}

    def on_train_start(self, trainer: Any) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum: int, frame: Any) -> None:
            if trainer.signal_received is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C: stop now
            trainer.signal_received = signum

        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old_handlers[sig] = signal.signal(sig, handler)

    def close(self, trainer: Any) -> None:
        for sig, old in self._old_handlers.items():
            signal.signal(sig, old)
        self._old_handlers.clear()


class FaultInjection(Callback):
    """The SIMONE_FAULT_* hooks of the loop (simone/faults.py): a NaN loss or an out-of-memory
    error at a step, a delay after each step, a simulated SIGTERM once a step is done. (Save
    faults are the checkpoint writer's: the trainer hands it the same `Faults`.)"""

    def __init__(self, faults: Faults):
        self.faults = faults

    def on_train_start(self, trainer: Any) -> None:
        self._sigterm(trainer)

    def on_step_start(self, trainer: Any) -> None:
        trainer.inject_nan = self.faults.nan_at(trainer.step + 1)
        if self.faults.oom_at(trainer.step + 1):
            raise OUT_OF_MEMORY("CUDA out of memory (injected by SIMONE_FAULT_OOM_AT_STEP)")

    def on_step_end(self, trainer: Any) -> None:
        self.faults.step_delay()
        self._sigterm(trainer)

    def _sigterm(self, trainer: Any) -> None:
        if trainer.signal_received is None and self.faults.sigterm_at(trainer.step):
            trainer.signal_received = int(signal.SIGTERM)


# ----------------------------------------------------------------------------- console


def _si(x: float) -> str:
    """512000 → '512k', 1.9e9 → '1.9B'."""
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


class ConsoleLog(Callback):
    """The progress bar and the log line of each logging step (loss, lr, tokens/s, MFU, ETA),
    and once a run the expected time of the whole schedule at the measured throughput."""

    def __init__(self) -> None:
        self._expected_reported = False
        self._first_step = 0  # this session's first step (a resumed run starts later)

    def on_train_start(self, trainer: Any) -> None:
        self._first_step = trainer.step

    def on_log(self, trainer: Any, stats: LogStats) -> None:
        mfu_txt = "" if stats.mfu is None else f" | mfu {stats.mfu:.1%}"
        loss_txt = "skipped" if stats.loss is None else f"{stats.loss:.4f}"
        line = (
            f"step {trainer.step}/{trainer.total_steps} | epoch {stats.epoch:.2f} | loss {loss_txt} | "
            f"lr {stats.lr:.2e} | grad {stats.grad_norm:.3f} | {stats.tokens_per_s:,.0f} tok/s{mfu_txt} | "
            f"eta {format_duration(eta_s(trainer, stats.steps_per_s), '?')}"
        )
        trainer.metrics.progress(trainer.step, trainer.total_steps, f"loss {loss_txt}")
        trainer.metrics.log(line, echo=not trainer.metrics.interactive)  # the bar shows it already
        self._report_expected_time(trainer, stats.tokens_per_s)

    def _report_expected_time(self, trainer: Any, tokens_per_s: float) -> None:
        """Once a run: the measured throughput and what it means for the whole schedule
        ("expected: 512k tokens/s → 7 epochs of 1.9B tokens ≈ 7.2 h"): each preset's own short
        benchmark. Taken from the first logging interval that does not hold this session's
        first step (compile and allocator warm-up), or the first one when that is all there is."""
        if self._expected_reported or tokens_per_s <= 0:
            return
        log_every = trainer.cfg.train.log_every
        warm = trainer.step - log_every >= self._first_step + 1
        if not warm and trainer.step + log_every <= trainer.total_steps:
            return  # a warm interval is still to come
        self._expected_reported = True
        epochs = trainer.cfg.train.num_epochs
        epoch_tokens = trainer.steps_per_epoch * trainer.tokens_per_step
        seconds = epochs * epoch_tokens / tokens_per_s
        message = (
            f"expected: {_si(tokens_per_s)} tokens/s → {epochs} epoch{'s' if epochs != 1 else ''} of "
            f"{_si(epoch_tokens)} tokens ≈ {format_duration(seconds)} on {trainer.env.world_size} process(es) "
            f"({trainer.device.type})"
        )
        trainer.metrics.event(
            "expected_time",
            trainer.step,
            message,
            tokens_per_s=round(tokens_per_s, 1),
            epochs=epochs,
            epoch_tokens=epoch_tokens,
            expected_s=round(seconds, 1),
            world_size=trainer.env.world_size,
        )


# ----------------------------------------------------------------------------- samples


class Samples(Callback):
    """A seeded continuation of a fixed prompt, appended to samples.jsonl at each epoch end and
    every `train.sample_every` steps (rank 0; under FSDP every rank runs the sharded model)."""

    def __init__(self, trainer: Any):
        self.tokenizer = None
        if trainer.env.is_main or trainer.sharded:
            self.tokenizer = load_tokenizer(trainer.run.tokenizer)

    def on_pause(self, trainer: Any, epoch_ended: bool) -> None:
        every = trainer.cfg.train.sample_every
        if epoch_ended or (every and trainer.step % every == 0):
            self.sample(trainer)

    @torch.no_grad()
    def sample(self, trainer: Any) -> None:
        t, tok = trainer, self.tokenizer
        if tok is None:  # ranks other than 0 (unless sharded: all must run the model)
            return
        ids = tok.encode(SAMPLE_PROMPT) or [tok.eod_id]
        idx = torch.tensor([ids], dtype=torch.long, device=t.device)
        gen = torch.Generator(device=t.device).manual_seed(t.cfg.train.seed)
        model = t.state.model
        model.eval()
        try:
            with t.autocast():
                tokens = model.generate(idx, t.cfg.train.sample_tokens, temperature=0.8, top_k=50, generator=gen)
                new = [int(x) for x in tokens]
        finally:
            model.train()
        t.metrics.sample(t.step, round(t.state.epoch, 4), SAMPLE_PROMPT, tok.decode(new))


# ----------------------------------------------------------------------------- evaluation and checkpoints


class Evaluation(Callback):
    """Validation loss per domain (`Trainer._evaluate`, every rank) every `train.eval_every` steps,
    at each epoch end and at the end of a finished run, with early stopping: each result updates
    the state's `EarlyStopping` (the loop's stop rule reads it) and goes to `on_eval`."""

    def on_pause(self, trainer: Any, epoch_ended: bool) -> None:
        every = trainer.cfg.train.eval_every
        if epoch_ended or (every and trainer.step % every == 0):
            self.evaluate(trainer)

    def on_stop(self, trainer: Any, reason: str) -> None:
        if reason != "signal" and trainer.state.last_eval_step != trainer.step:
            self.evaluate(trainer)

    def evaluate(self, trainer: Any) -> None:
        s = trainer.state
        results = trainer._evaluate()
        s.last_eval_step = s.step
        if results["val_loss"] is None:
            return
        s.last_val_loss = results["val_loss"]
        improved = s.early.update(results["val_loss"], s.step, s.epochs_done)
        trainer.hook("on_eval", results, improved)


class Checkpointing(Callback):
    """Checkpoints (all ranks take part, rank 0 writes) every `train.checkpoint_every` steps, at each
    epoch end, after a new best evaluation (also `best`) and when the loop stops by its rule or a
    signal, never twice a step; at the start, a warning if the disk cannot hold what the run keeps."""

    def __init__(self) -> None:
        self.best = False  # this step's evaluation was a new best

    def on_train_start(self, trainer: Any) -> None:
        if not trainer.env.is_main:
            return
        n_params = sum(p.numel() for p in trainer.state.model.parameters())
        weights = 4 * n_params if trainer.sharded else estimate_checkpoint_bytes(trainer.state.model.state_dict())
        per_ckpt = weights + 2 * 4 * n_params  # + AdamW moments
        needed = per_ckpt * (trainer.cfg.train.keep_checkpoints + 2)  # kept + best + one being written
        enough, free = check_free_space(trainer.run.checkpoints, needed)
        if not enough:
            trainer.metrics.event(
                "disk_warning",
                trainer.step,
                f"{trainer.run.checkpoints}: this run needs about {needed / 1e9:.2f} GB for checkpoints "
                f"({per_ckpt / 1e6:.0f} MB each) but only {free / 1e9:.2f} GB are free",
            )

    def on_eval(self, trainer: Any, results: dict[str, Any], improved: bool) -> None:
        self.best = improved

    def on_save_point(self, trainer: Any, epoch_ended: bool) -> None:
        every = trainer.cfg.train.checkpoint_every
        if self.best or epoch_ended or (every and trainer.step % every == 0):
            self.save(trainer)

    def on_stop(self, trainer: Any, reason: str) -> None:
        self.save(trainer)

    def save(self, trainer: Any) -> None:
        s, best = trainer.state, self.best
        self.best = False
        if s.step == s.last_saved_step and not best:
            return
        path = save_train_checkpoint(s, trainer, best)
        if path is not None:
            s.last_checkpoint = path.name
            if best:
                s.best_checkpoint = path.name
            trainer.metrics.event(
                "checkpoint", s.step, f"saved {path.name}" + (" (best)" if best else ""), path=str(path), best=best
            )
            trainer.hook("on_checkpoint", path, best)
        barrier(trainer.env)
        s.last_saved_step = s.step
