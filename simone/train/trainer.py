"""The training loop: `train(cfg, run, resume=None) -> TrainResult`.

One optimizer step is: set the scheduled learning rate, run `grad_accum` micro-batches forward
(under bf16 autocast where the device has it; fp16 with a grad scaler as the CUDA fallback)
and backward, clip the gradient norm, step AdamW, and add the loss to on-device counters.
Around the steps: logging every `log_every` steps (the only regular host sync), evaluation
every `eval_every` steps and at each epoch end (per-domain loss, bits per byte, perplexity),
early stopping, a seeded generation sample, and checkpoints (`checkpoint.py`).

Fault tolerance (docs: issue 8):
- Exact resume. A checkpoint holds everything the next step depends on: weights, optimizer,
  schedule position (the step and the rollback LR scale), the loader's position, the torch /
  numpy / python RNG states, early stopping and the loss counters of the current logging
  interval. Resuming reproduces the uninterrupted run's losses bit for bit on a CPU (same
  thread count).
- Signals. SIGTERM / SIGINT set a flag; the loop finishes the current step, saves a
  checkpoint, marks status.json `stopped` and returns with stop_reason "signal".
- Non-finite steps, without a per-step host sync. The total gradient norm computed for
  clipping is a device tensor; a step is bad when it (or the loss) is not finite. With a fused
  AdamW (CPU and CUDA) the bad step is skipped on the device: the optimizer is handed
  `found_inf` (the mechanism GradScaler uses), and its kernel leaves parameters, moments and
  step count untouched. Bad-step counters live on the device too and are read at logging
  steps: each bad step is reported there as a `nan_skip` event, and `max_bad_steps`
  consecutive bad steps roll the run back to the last good checkpoint with the learning rate
  multiplied by `rollback_lr_factor`; after `max_rollbacks` rollbacks the run fails. (A
  non-fused optimizer falls back to reading the norm every step.)
- Heartbeat. A background thread refreshes status.json (pid, step, heartbeat time) every few
  seconds and writes `system` metric rows; `RunLock` refuses a second process.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from simone.config import Config, ModelConfig
from simone.data.loader import BatchLoader
from simone.data.shards import TokenShard
from simone.data.tokenizer import load_tokenizer
from simone.errors import SimoneError
from simone.inference.evaluate import evaluate_per_domain
from simone.model import build_model
from simone.model.governance import LossTermMeter, set_policy_domains, uses_policy
from simone.rundir import RunDir
from simone.checkpoint import (
    WEIGHTS,
    CheckpointError,
    CheckpointSaveError,
    check_free_space,
    check_state_fits,
    check_tokenizer,
    estimate_checkpoint_bytes,
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from simone.train.distributed import (
    DistEnv,
    all_reduce_mean,
    any_rank,
    barrier,
    check_parallel,
    dist_env_from_environ,
    full_model_state,
    full_optimizer_state,
    gather_to_all,
    gradient_sync,
    init_distributed,
    load_full_model_state,
    load_full_optimizer_state,
    local_tensor,
    min_over_ranks,
    resolve_device,
    shutdown_distributed,
    split_batch,
    wrap_model,
)
from simone.train.early_stopping import EarlyStopping
from simone.faults import Faults
from simone.lock import RunLock
from simone.train.metrics import MetricsLogger, format_seconds, mfu, peak_flops
from simone.train.optim import build_optimizer, optimizer_skips_on_device, set_lr
from simone.train.schedule import LRSchedule, percent_done, stop_summary

SAMPLE_PROMPT = "In the beginning"
HEARTBEAT_S = 5.0
TRAIN_STATE_SCHEMA = 1
_OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


class TrainingError(SimoneError, RuntimeError):
    """The run stopped on an error it cannot recover from; status.json says `failed`."""

    def __init__(self, message: str, reason: str = "failed"):
        super().__init__(message)
        self.reason = reason


@dataclass
class TrainResult:
    steps: int
    epochs: int  # completed epochs
    best_val_loss: float | None
    final_val_loss: float | None
    best_checkpoint: str | None
    last_checkpoint: str | None
    tokens_seen: int
    tokens_per_s: float
    mfu: float | None
    seconds: float
    stop_reason: str  # num_epochs (the planned end) | max_steps | max_minutes | early_stop | signal
    schedule_progress: float = 0.0  # how far the learning-rate schedule got: 1.0 = at its floor


def train(cfg: Config, run: RunDir, resume: str | None = None,
          clock: Callable[[], float] | None = None) -> TrainResult:
    """Train on a prepared run directory; return what happened.

    Needs `run.tokenizer` and `run.data/{train,val}.bin + index.json`. `resume` is None (start
    fresh), "latest", "best" or a checkpoint directory. Under torchrun (WORLD_SIZE > 1) each
    process calls this; only rank 0 writes to the run directory. Raises TrainingError (after
    marking status.json `failed`) when the run cannot go on, RunLockedError when another live
    process owns the run directory, CheckpointError when the checkpoint to resume from is
    unusable or does not fit the config. `clock` (seconds, monotonic) times the run for the
    time cap and the schedule; tests pass a fake one.
    """
    env = dist_env_from_environ()
    lock = RunLock(run.root, warn=run.log_line) if env.is_main else contextlib.nullcontext()
    with lock:
        trainer = Trainer(cfg, run, env, clock=clock or time.monotonic)
        try:
            return trainer.fit(resume)
        finally:
            trainer.close()


# ----------------------------------------------------------------------------- helpers


def cpu_has_fast_bf16() -> bool:
    """Does this CPU multiply bf16 natively (AMX tiles or AVX512-BF16)? Emulated bf16 is slow."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def autocast_dtype(choice: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `train.dtype` on `device` (None: plain float32)."""
    if choice == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "cpu" and cpu_has_fast_bf16():
            return torch.bfloat16  # AMX / AVX512-BF16 matmuls: about 2x float32 (bench/bench_model.py)
        return None
    table = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if choice not in table:
        raise ValueError(f"train.dtype={choice!r}: choose auto, float32, bfloat16 or float16")
    dtype = table[choice]
    if dtype is torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("train.dtype=bfloat16 but this GPU has no bf16 support; use float16 or auto")
    return dtype


def compiler_missing() -> str | None:
    """Why torch.compile cannot run here, or None. Inductor builds its CPU kernels, and
    Triton its GPU kernel launchers, with the system's C/C++ compiler; without one the first
    step would fail, so the trainer runs eager instead."""
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return None
    return "no C++ compiler (g++, c++, clang++ or $CXX) is on PATH"


def apply_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each transformer block's activations in the backward pass instead of storing
    them (less memory, ~1/3 more compute). Applied from outside, like compile and DDP: the
    block's `forward` is wrapped in place, so parameter names (and checkpoints) are unchanged."""
    from torch.utils.checkpoint import checkpoint

    for block in model.layers:
        def forward(*args: Any, _forward: Any = block.forward, **kwargs: Any) -> Any:
            if torch.is_grad_enabled():
                return checkpoint(_forward, *args, use_reentrant=False, **kwargs)
            return _forward(*args, **kwargs)

        block.forward = forward


def rng_state(device: torch.device) -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": random.getstate(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _si(x: float) -> str:
    """512000 → '512k', 1.9e9 → '1.9B'."""
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


def _duration(seconds: float) -> str:
    if seconds >= 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.0f} s"


# ----------------------------------------------------------------------------- the trainer


def policy_domains_for_run(cfg: ModelConfig, tokenizer_path) -> list[str] | None:
    """For the trainer: the policy classes (the tokenizer's domains, which also sizes
    `cfg.n_domains`), or None when the model has no policy head."""
    if not uses_policy(cfg):
        return None
    domains = load_tokenizer(tokenizer_path).domains
    set_policy_domains(cfg, domains)
    return domains


class Trainer:
    """Holds the model, optimizer, data and counters of one training run (one process)."""

    def __init__(self, cfg: Config, run: RunDir, env: DistEnv, clock: Callable[[], float] = time.monotonic):
        self.cfg, self.run, self.env = cfg, run, env
        tc = cfg.train
        self.faults = Faults.from_env()
        self.device = resolve_device(tc.device, env)
        init_distributed(env, self.device)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        run.checkpoints.mkdir(parents=True, exist_ok=True)
        self.metrics = MetricsLogger(run, enabled=env.is_main)
        self.train_shard = TokenShard(run.data, "train")
        self.val_shard = TokenShard(run.data, "val")
        if cfg.model.vocab_size < self.train_shard.vocab_size:
            self.metrics.log(f"model.vocab_size {cfg.model.vocab_size} < tokenizer's "
                             f"{self.train_shard.vocab_size}: using {self.train_shard.vocab_size}")
            cfg.model.vocab_size = self.train_shard.vocab_size
        self.seq_len = cfg.model.max_seq_len

        # Keep the effective batch (batch_size x grad_accum sequences per step) whatever the
        # process count: the accumulation is divided over the processes, and what it cannot
        # absorb comes out of the micro-batch (distributed.split_batch; an error if neither can).
        self.micro_batch, self.grad_accum = split_batch(tc.batch_size, tc.grad_accum, env.world_size)
        self.parallel = check_parallel(tc.parallel)
        if self.parallel == "fsdp" and not env.distributed:
            self.metrics.log("train.parallel=fsdp needs several processes (torchrun); one process trains unsharded")
        # Governance: the policy head's classes are the tokenizer's domain control tokens, and
        # its labels (each input token's domain) come from the loader. None: no policy head.
        self.domain_classes = policy_domains_for_run(cfg.model, run.tokenizer)
        self.loss_terms = LossTermMeter()  # the comprehensive loss's terms, logged per interval
        self.loader = BatchLoader(self.train_shard, self.micro_batch, self.seq_len, tc.seed, rank=env.rank,
                                  world_size=env.world_size, device=self.device, grad_accum=self.grad_accum,
                                  domain_classes=self.domain_classes)
        self.steps_per_epoch = self.loader.batches_per_epoch // self.grad_accum
        self.total_steps = tc.num_epochs * self.steps_per_epoch
        if tc.max_steps is not None:
            self.total_steps = min(self.total_steps, tc.max_steps)
        self.tokens_per_step = self.micro_batch * self.seq_len * self.grad_accum * env.world_size
        # cosine over the planned steps; under a time cap they do not fit, planned by time (schedule.py)
        self.schedule = LRSchedule(tc.lr, tc.warmup_steps, self.total_steps, tc.min_lr_ratio,
                                   max_seconds=tc.max_minutes * 60 if tc.max_minutes is not None else None,
                                   decay_fraction=tc.decay_fraction, clock=clock)

        torch.manual_seed(tc.seed)  # the same initial weights on every rank
        self.raw_model = build_model(cfg.model).to(self.device)
        self.amp_dtype = autocast_dtype(tc.dtype, self.device)
        self.scaler = (torch.amp.GradScaler("cuda") if self.amp_dtype is torch.float16
                       and self.device.type == "cuda" else None)
        if tc.activation_checkpointing:
            apply_activation_checkpointing(self.raw_model)
        # Applied from outside, in this order: activation checkpointing, sharding (FSDP2 shards
        # raw_model in place), compile, DDP. The optimizer comes last: FSDP2 replaces parameters.
        self.model: torch.nn.Module = self.raw_model
        if self.parallel == "fsdp":
            self.model = wrap_model(self.raw_model, env, self.device, "fsdp")
        if tc.compile:
            missing = compiler_missing()
            if missing:
                self.metrics.log(f"train.compile=true but {missing}; training runs eager")
            else:
                self.model = torch.compile(self.model)
        if self.parallel == "ddp":
            self.model = wrap_model(self.model, env, self.device, "ddp")
        self.optimizer = self._new_optimizer()
        torch.manual_seed(tc.seed + env.rank)  # dropout streams differ per rank

        self.early = EarlyStopping(tc.min_epochs, tc.num_epochs, tc.patience)
        self.flops_per_token = self.raw_model.flops_per_token(self.seq_len)
        self.peak_flops = peak_flops(self.device, self.amp_dtype)
        self._sharded = self.parallel == "fsdp" and env.distributed
        self.tokenizer = None
        if env.is_main or self._sharded:  # sharded: every rank takes part in generating samples
            from simone.data.tokenizer import load_tokenizer

            self.tokenizer = load_tokenizer(run.tokenizer)

        # counters that a checkpoint carries
        self.step = 0
        self.epochs_done = 0
        self.tokens_seen = 0
        self.lr_scale = 1.0
        self.rollbacks = 0
        self._last_lr = tc.lr
        self._zero_interval_counters()
        self.last_val_loss: float | None = None
        self.best_checkpoint: str | None = None
        self.last_checkpoint: str | None = None

        # this process only
        self._signal: int | None = None
        self._status_lock = threading.Lock()
        self._stop_heartbeat = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._old_handlers: dict[int, Any] = {}
        self._last_grad_norm = torch.zeros((), device=self.device)
        self._last_saved_step = -1
        self._last_eval_step = -1
        self._session_start = time.time()  # wall time for status.json; the cap is the schedule's clock
        self.schedule.start_session()
        self._session_tokens = 0
        self._log_clock = (time.perf_counter(), 0)  # (time, tokens) at the last log
        self._rate = (0.0, 0.0)  # (tokens/s, steps/s) over the last logging interval
        self._expected_reported = False
        self._session_first_step = 0  # set again on resume
        self._skips_on_device = optimizer_skips_on_device(self.optimizer) and self.scaler is None

    # ------------------------------------------------------------------ setup helpers

    def _new_optimizer(self) -> torch.optim.Optimizer:
        tc = self.cfg.train
        return build_optimizer(self.raw_model, tc.optimizer, lr=tc.lr, weight_decay=tc.weight_decay,
                               betas=(tc.beta1, tc.beta2), device_type=self.device.type,
                               fused=None if tc.fused_adamw else False, muon_lr_scale=tc.muon_lr_scale)

    def _zero_interval_counters(self) -> None:
        """Device-side sums of the current logging interval (read only at logging steps)."""
        z = lambda dtype: torch.zeros((), dtype=dtype, device=self.device)  # noqa: E731
        self.loss_sum = z(torch.float32)
        self.loss_count = z(torch.int64)
        self.bad_since_log = z(torch.int64)
        self.consecutive_bad = z(torch.int64)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    # ------------------------------------------------------------------ the run

    def fit(self, resume: str | None) -> TrainResult:
        tc = self.cfg.train
        stop_reason = "max_steps"
        try:
            if resume is not None:
                self._resume(resume)
            else:
                self._start_fresh()
            self._check_disk_at_start()
            self._write_status(state="running", error=None, step=self.step, total_steps=self.total_steps,
                               started=self._session_start, stop_reason=None,
                               schedule_progress=self.schedule.progress(self.step))
            self._session_first_step = self.step
            self._install_signal_handlers()
            self._start_heartbeat()
            while True:
                reason = self._stop_reason()
                if reason is not None:
                    stop_reason = reason
                    break
                try:
                    epoch_ended = self._train_step()
                except _OUT_OF_MEMORY as e:
                    raise self._oom_error(e) from e
                self.step += 1
                self.faults.step_delay()
                if epoch_ended:
                    self.epochs_done += 1
                    self.metrics.event("epoch_end", self.step, f"epoch {self.epochs_done} done",
                                       epoch=self.epochs_done)
                if self._logging_step():
                    self._log_and_check()
                improved = False
                with self.schedule.paused():  # not training: left out of the measured throughput
                    if (tc.eval_every and self.step % tc.eval_every == 0) or epoch_ended:
                        improved = self._evaluate()
                    if epoch_ended or (tc.sample_every and self.step % tc.sample_every == 0):
                        self._sample()
                    if improved or epoch_ended or (tc.checkpoint_every and self.step % tc.checkpoint_every == 0):
                        self._save(best=improved)
            self._finish(stop_reason)
            barrier(self.env)  # leave together: a rank tearing down early can hang the others
        except TrainingError as e:
            self._fail(str(e), e.reason)
            raise
        except CheckpointSaveError as e:
            self._fail(str(e), "checkpoint_save")
            raise TrainingError(str(e), "checkpoint_save") from e
        except KeyboardInterrupt:  # a second Ctrl-C: no checkpoint, the last one stands
            self.metrics.event("stopped", self.step, "interrupted (second Ctrl-C) without a checkpoint")
            self._write_status(state="stopped", step=self.step, eta_s=None)
            raise
        except Exception as e:
            self._fail(f"{type(e).__name__}: {e}", "error")
            raise
        finally:
            self._stop_heartbeat_thread()
            self._restore_signal_handlers()

        seconds = time.time() - self._session_start
        tokens_per_s = self._session_tokens / seconds if seconds > 0 else 0.0
        return TrainResult(
            steps=self.step, epochs=self.epochs_done,
            best_val_loss=None if math.isinf(self.early.best_loss) else self.early.best_loss,
            final_val_loss=self.last_val_loss, best_checkpoint=self.best_checkpoint,
            last_checkpoint=self.last_checkpoint, tokens_seen=self.tokens_seen,
            tokens_per_s=tokens_per_s, mfu=mfu(self.flops_per_token, tokens_per_s / max(1, self.env.world_size),
                                               self.peak_flops),
            seconds=seconds, stop_reason=stop_reason, schedule_progress=self.schedule.progress(self.step))

    def _start_fresh(self) -> None:
        if list_checkpoints(self.run.checkpoints):
            self.metrics.log(f"{self.run.checkpoints}: starting fresh; existing checkpoints will be replaced "
                             f"(pass --resume latest to continue them)")
        n_params = self.raw_model.num_params()
        self.metrics.event("start", self.step, f"training {n_params / 1e6:.2f}M parameters for up to "
                           f"{self.total_steps} steps on {self.device}", total_steps=self.total_steps,
                           steps_per_epoch=self.steps_per_epoch, tokens_per_step=self.tokens_per_step,
                           params=n_params, device=str(self.device), world_size=self.env.world_size)

    def _stop_reason(self) -> str | None:
        """Why to stop before the next step (agreed by all ranks), or None."""
        tc = self.cfg.train
        if self._signal is None and self.faults.sigterm_at(self.step):
            self._signal = int(signal.SIGTERM)
        # Signals and the clock differ between ranks, so ranks must agree on them: a collective,
        # which (with NCCL) is a host sync, so under torchrun only on logging steps.
        agree_now = not self.env.distributed or self._logging_step()
        if agree_now and any_rank(self._signal is not None, self.env, self.device):
            return "signal"
        reason = self.early.should_stop(self.epochs_done)
        if reason is not None:
            return reason
        if tc.max_steps is not None and self.step >= tc.max_steps:
            return "max_steps"
        if self.step >= self.total_steps:
            return "num_epochs"
        if self.schedule.finished(self.step):  # planned by time: its decay ended as the cap came
            return "max_minutes"
        if agree_now and any_rank(self.schedule.out_of_time(), self.env, self.device):
            return "max_minutes"
        return None

    def _logging_step(self) -> bool:
        return self.step % max(1, self.cfg.train.log_every) == 0

    # ------------------------------------------------------------------ one optimizer step

    def _train_step(self) -> bool:
        """Run one optimizer step (grad_accum micro-batches); return True if an epoch ended."""
        tc = self.cfg.train
        lr = self.schedule.lr(self.step) * self.lr_scale
        set_lr(self.optimizer, lr)
        poison = self.faults.nan_at(self.step + 1)
        if self.faults.oom_at(self.step + 1):
            raise _OUT_OF_MEMORY("CUDA out of memory (injected by SIMONE_FAULT_OOM_AT_STEP)")
        epoch_ended = False
        step_loss = torch.zeros((), device=self.device)
        for micro in range(self.grad_accum):
            governance = {}
            if self.domain_classes is not None:
                x, y, governance["domain_ids"] = self.loader.next_batch_with_domains()
            else:
                x, y = self.loader.next_batch()
            last = micro == self.grad_accum - 1
            with gradient_sync(self.model, self.raw_model, last, self.env):
                with self._autocast():
                    _, loss = self.model(x, y, **governance)
                if self.cfg.model.governance:
                    self.loss_terms.add(self.raw_model.loss_terms)
                if poison:
                    loss = loss * float("nan")
                step_loss += loss.detach().float()
                scaled = loss / self.grad_accum
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            epoch_ended = epoch_ended or self.loader.epoch_done
        step_loss /= self.grad_accum

        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        max_norm = tc.grad_clip if tc.grad_clip and tc.grad_clip > 0 else float("inf")
        grad_norm = local_tensor(torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), max_norm))
        if self.scaler is not None:
            # fp16: overflowing gradients are the scaler's business; only a bad loss counts
            finite = torch.isfinite(step_loss)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            finite = torch.isfinite(grad_norm) & torch.isfinite(step_loss)
            if self._skips_on_device:
                self.optimizer.found_inf = (~finite).float()  # fused AdamW skips on the device
                self.optimizer.step()
                del self.optimizer.found_inf
            elif bool(finite):  # non-fused optimizer: one host sync per step
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

        bad = (~finite).long()
        self.loss_sum += torch.where(finite, step_loss, torch.zeros_like(step_loss))
        self.loss_count += finite.long()
        self.bad_since_log += bad
        self.consecutive_bad = (self.consecutive_bad + bad) * bad
        self._last_grad_norm = grad_norm.detach()
        self.tokens_seen += self.tokens_per_step
        self._session_tokens += self.tokens_per_step
        self._last_lr = lr
        return epoch_ended

    def _oom_error(self, e: BaseException) -> TrainingError:
        tc = self.cfg.train
        effective = tc.batch_size * tc.grad_accum
        half = max(1, tc.batch_size // 2)
        accum = max(1, effective // half)
        return TrainingError(
            f"out of GPU memory with train.batch_size={tc.batch_size} ({self.micro_batch} sequences per "
            f"process, seq_len {self.seq_len}, grad_accum {self.grad_accum}): try --set train.batch_size={half} --set "
            f"train.grad_accum={accum} to keep the effective batch of {effective} sequences ({e})",
            "out_of_memory")

    # ------------------------------------------------------------------ logging and faults

    def _log_and_check(self) -> None:
        """A logging step: read the device counters (one sync), write a train row, handle bad steps."""
        loss_sum = all_reduce_mean(self.loss_sum, self.env)
        values = torch.stack([loss_sum, self.loss_count.float(), self.bad_since_log.float(),
                              self.consecutive_bad.float(), self._last_grad_norm.float()]).tolist()
        loss_sum_v, count, bad, consecutive, grad_norm = values
        now = time.perf_counter()
        t0, tok0 = self._log_clock
        dt = max(now - t0, 1e-9)
        tokens_per_s = (self._session_tokens - tok0) / dt
        steps_per_s = (self._session_tokens - tok0) / self.tokens_per_step / dt
        self._log_clock = (now, self._session_tokens)
        self._rate = (tokens_per_s, steps_per_s)
        news = self.schedule.observe(self.step, agree=lambda x: min_over_ranks(x, self.env, self.device))
        if news:
            self.metrics.event("schedule", self.step, news, mode=self.schedule.mode,
                               end_step=self.schedule.end_step)
        loss = loss_sum_v / count if count else None  # None (JSON null): every step skipped
        step_mfu = mfu(self.flops_per_token, tokens_per_s / self.env.world_size, self.peak_flops)
        epoch = self.epochs_done + (0.0 if self.loader.epoch_done else self.loader.epoch_progress)
        self.metrics.train(step=self.step, epoch=round(epoch, 4), loss=loss, lr=self._last_lr,
                           grad_norm=grad_norm, tokens_per_s=round(tokens_per_s, 1),
                           mfu=None if step_mfu is None else round(step_mfu, 5), tokens_seen=self.tokens_seen,
                           **self.loss_terms.read_and_reset())
        eta = self._eta_s()
        mfu_txt = "" if step_mfu is None else f" | mfu {step_mfu:.1%}"
        loss_txt = "skipped" if loss is None else f"{loss:.4f}"
        line = (f"step {self.step}/{self.total_steps} | epoch {epoch:.2f} | loss {loss_txt} | "
                f"lr {self._last_lr:.2e} | grad {grad_norm:.3f} | {tokens_per_s:,.0f} tok/s{mfu_txt} | "
                f"eta {format_seconds(eta)}")
        self.metrics.progress(self.step, self.total_steps, f"loss {loss_txt}")
        self.metrics.log(line, echo=not self.metrics.interactive)  # the bar shows it already
        self._report_expected_time(tokens_per_s)
        self._write_status(step=self.step, epoch=round(epoch, 4), total_steps=self.total_steps, eta_s=eta,
                           schedule_progress=self.schedule.progress(self.step))

        self.loss_sum.zero_()
        self.loss_count.zero_()
        self.bad_since_log.zero_()
        if bad:
            self.metrics.event("nan_skip", self.step, f"{int(bad)} step(s) with a non-finite loss or gradient "
                               f"norm skipped since the last log", skipped=int(bad),
                               consecutive=int(consecutive))
        if consecutive >= self.cfg.train.max_bad_steps:
            self._rollback(int(consecutive))

    def _report_expected_time(self, tokens_per_s: float) -> None:
        """Once a run: the measured throughput and what it means for the whole schedule
        ("expected: 512k tokens/s → 7 epochs of 1.9B tokens ≈ 7.2 h"): each preset's own short
        benchmark. Taken from the first logging interval that does not hold this session's
        first step (compile and allocator warm-up), or the first one when that is all there is."""
        if self._expected_reported or tokens_per_s <= 0:
            return
        warm = self.step - self.cfg.train.log_every >= self._session_first_step + 1
        if not warm and self.step + self.cfg.train.log_every <= self.total_steps:
            return  # a warm interval is still to come
        self._expected_reported = True
        epochs = self.cfg.train.num_epochs
        epoch_tokens = self.steps_per_epoch * self.tokens_per_step
        seconds = epochs * epoch_tokens / tokens_per_s
        message = (f"expected: {_si(tokens_per_s)} tokens/s → {epochs} epoch{'s' if epochs != 1 else ''} of "
                   f"{_si(epoch_tokens)} tokens ≈ {_duration(seconds)} on {self.env.world_size} process(es) "
                   f"({self.device.type})")
        self.metrics.event("expected_time", self.step, message, tokens_per_s=round(tokens_per_s, 1),
                           epochs=epochs, epoch_tokens=epoch_tokens, expected_s=round(seconds, 1),
                           world_size=self.env.world_size)

    def _eta_s(self) -> float | None:
        steps_per_s = self._rate[1]
        if steps_per_s <= 0:
            return None
        return max(0, self.schedule.end_step - self.step) / steps_per_s

    def _rollback(self, consecutive: int) -> None:
        """Go back to the last good checkpoint with a smaller learning rate, or fail."""
        tc = self.cfg.train
        if self.rollbacks >= tc.max_rollbacks:
            raise TrainingError(
                f"{consecutive} consecutive steps with a non-finite loss or gradient norm at step {self.step}, "
                f"after {self.rollbacks} rollback(s) (train.max_rollbacks={tc.max_rollbacks}); "
                f"try a lower train.lr (now {tc.lr * self.lr_scale:.2e})", "non_finite")
        rollbacks, lr_scale = self.rollbacks + 1, self.lr_scale * tc.rollback_lr_factor
        bad_step = self.step
        try:
            ckpt = resolve_checkpoint(self.run.root, "latest", on_problem=self._report_bad_checkpoint)
        except CheckpointError:
            ckpt = None
        if ckpt is not None:
            self._restore(ckpt)
            target = ckpt.name
        else:
            self._restore_initial()
            target = "the initial weights (no checkpoint yet)"
        self.rollbacks, self.lr_scale = rollbacks, lr_scale
        self.metrics.event("rollback", self.step,
                           f"{consecutive} consecutive non-finite steps up to step {bad_step}: rolled back to "
                           f"{target}, learning rate x{lr_scale:g} (rollback {rollbacks}/{tc.max_rollbacks})",
                           rollbacks=rollbacks, lr_scale=lr_scale, from_step=bad_step)

    def _restore_initial(self) -> None:
        """Back to step 0: the seeded initial weights, a fresh optimizer and loader."""
        torch.manual_seed(self.cfg.train.seed)
        fresh = build_model(self.cfg.model)
        load_full_model_state(self.raw_model, fresh.state_dict())
        self.optimizer = self._new_optimizer()
        self.loader.load_state_dict({"epoch": 0, "position": 0})
        torch.manual_seed(self.cfg.train.seed + self.env.rank)
        self.step = self.epochs_done = self.tokens_seen = 0
        self.schedule.reset()
        self._zero_interval_counters()
        self.early = EarlyStopping(self.cfg.train.min_epochs, self.cfg.train.num_epochs, self.cfg.train.patience)

    def _report_bad_checkpoint(self, message: str) -> None:
        self.metrics.event("checkpoint_corrupt", self.step, message)

    # ------------------------------------------------------------------ evaluation and samples

    def _evaluate(self) -> bool:
        """Per-domain validation loss / bpb / perplexity; returns True if it is a new best."""
        tc = self.cfg.train
        ev = evaluate_per_domain(self.raw_model, self.val_shard, self.seq_len, tc.batch_size,
                                 tc.eval_batches, device=self.device, autocast=self._autocast)
        self._last_eval_step = self.step
        if ev["val_loss"] is None:
            return False
        val_loss = ev["val_loss"]
        per_domain = {d: {k: v[k] for k in ("loss", "bpb", "ppl")} for d, v in ev["per_domain"].items()}
        epoch = self.epochs_done + (0.0 if self.loader.epoch_done else self.loader.epoch_progress)
        self.metrics.eval(step=self.step, epoch=round(epoch, 4), val_loss=val_loss, val_bpb=ev["val_bpb"],
                          val_ppl=ev["val_ppl"], per_domain=per_domain)
        self.last_val_loss = val_loss
        improved = self.early.update(val_loss, self.step, self.epochs_done)
        if self.early.stopped:
            self.metrics.event("early_stop", self.step, f"validation loss has not improved for "
                               f"{self.early.bad_evals} evaluations (best {self.early.best_loss:.4f} at step "
                               f"{self.early.best_step})")
        return improved

    @torch.no_grad()
    def _sample(self) -> None:
        """A seeded continuation of a fixed prompt, appended to samples.jsonl (rank 0)."""
        if self.tokenizer is None:  # ranks other than 0 (unless sharded: all must run the model)
            return
        tok = self.tokenizer
        ids = tok.encode(SAMPLE_PROMPT) or [tok.eod_id]
        idx = torch.tensor([ids], dtype=torch.long, device=self.device)
        gen = torch.Generator(device=self.device).manual_seed(self.cfg.train.seed)
        self.raw_model.eval()
        try:
            with self._autocast():
                new = [int(t) for t in self.raw_model.generate(
                    idx, self.cfg.train.sample_tokens, temperature=0.8, top_k=50, generator=gen)]
        finally:
            self.raw_model.train()
        epoch = self.epochs_done + (0.0 if self.loader.epoch_done else self.loader.epoch_progress)
        self.metrics.sample(self.step, round(epoch, 4), SAMPLE_PROMPT, tok.decode(new))

    # ------------------------------------------------------------------ checkpoints

    def _train_state(self, rng_per_rank: list[dict[str, Any]], optimizer_state: dict[str, Any]) -> dict[str, Any]:
        return {
            "schema": TRAIN_STATE_SCHEMA,
            "step": self.step,
            "epochs_done": self.epochs_done,
            "tokens_seen": self.tokens_seen,
            "lr_scale": self.lr_scale,
            "rollbacks": self.rollbacks,
            "total_steps": self.total_steps,
            "schedule": self.schedule.state_dict(),  # the plan of a time-capped run
            "steps_per_epoch": self.steps_per_epoch,
            "world_size": self.env.world_size,
            "grad_accum": self.grad_accum,
            "optimizer": optimizer_state,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "loader": self.loader.state_dict(),
            "early_stopping": self.early.state_dict(),
            "rng": rng_per_rank,  # one entry per rank: each has its own dropout stream
            "counters": {"loss_sum": self.loss_sum, "loss_count": self.loss_count,
                         "bad_since_log": self.bad_since_log, "consecutive_bad": self.consecutive_bad},
            "last_val_loss": self.last_val_loss,
            "best_checkpoint": self.best_checkpoint,
        }

    def _save(self, best: bool = False) -> None:
        if self.step == self._last_saved_step and not best:
            return
        rng_per_rank = gather_to_all(rng_state(self.device), self.env)
        # unsharded on rank 0 whatever the layout (collectives under FSDP), so any process
        # count can resume it
        model_state = full_model_state(self.raw_model)
        optimizer_state = full_optimizer_state(self.raw_model, self.optimizer)
        if self.env.is_main:
            path = save_checkpoint(self.run.checkpoints, self.step, model_state,
                                   self._train_state(rng_per_rank, optimizer_state), self.cfg.to_dict(), best=best,
                                   keep=self.cfg.train.keep_checkpoints, faults=self.faults,
                                   log=self.metrics.log, tokenizer=self.run.tokenizer)
            self.last_checkpoint = path.name
            if best:
                self.best_checkpoint = path.name
            self.metrics.event("checkpoint", self.step, f"saved {path.name}" + (" (best)" if best else ""),
                               path=str(path), best=best)
        barrier(self.env)
        self._last_saved_step = self.step

    def _resume(self, resume: str) -> None:
        which = resume if resume in ("latest", "best") else None
        target = self.run.root if which else Path(resume)
        try:
            ckpt = resolve_checkpoint(target, which or "latest", on_problem=self._report_bad_checkpoint)
        except CheckpointError as e:
            if which == "latest" and not list_checkpoints(self.run.checkpoints):
                self.metrics.log(f"{self.run.checkpoints}: no checkpoint to resume from; starting fresh")
                self.metrics.event("start", 0, "no checkpoint to resume from; starting fresh",
                                   total_steps=self.total_steps)
                return
            raise e
        self._restore(ckpt)
        self.metrics.event("resume", self.step, f"resumed from {ckpt}", path=str(ckpt),
                           total_steps=self.total_steps)

    def _restore(self, ckpt: Path) -> None:
        """Load a verified checkpoint into the model, optimizer, loader, RNGs and counters."""
        if self.env.is_main and self.run.tokenizer.exists():
            check_tokenizer(ckpt, self.run.tokenizer)  # never continue with another tokenizer
        model_state, state, _ = load_checkpoint(ckpt, verify=False)  # resolve_checkpoint verified it
        check_state_fits(self.raw_model, model_state, str(ckpt / WEIGHTS))
        load_full_model_state(self.raw_model, model_state)
        load_full_optimizer_state(self.raw_model, self.optimizer, state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.loader.load_state_dict(state["loader"])
        self.early.load_state_dict(state["early_stopping"])
        saved_world = len(state["rng"])
        if saved_world == self.env.world_size:
            set_rng_state(state["rng"][self.env.rank], self.device)
        else:
            # Another process count: weights, optimizer, schedule and data position carry over
            # (the loader converts its position between global batch sizes), but the dropout
            # streams cannot: fresh, still seeded ones. With dropout the losses then match the
            # uninterrupted run only approximately (float summation order differs too).
            torch.manual_seed(self.cfg.train.seed + self.env.rank + state["step"])
            self.metrics.log(f"{ckpt}: saved by {saved_world} process(es), resumed on {self.env.world_size}: "
                             f"same weights, optimizer, schedule and data position; new dropout streams")
        self.step = int(state["step"])
        self.epochs_done = int(state["epochs_done"])
        self.tokens_seen = int(state["tokens_seen"])
        self.lr_scale = float(state["lr_scale"])
        self.rollbacks = int(state["rollbacks"])
        self.schedule.load_state_dict(state.get("schedule"), steps_done=self.step)
        counters = state["counters"]
        self.loss_sum = counters["loss_sum"].to(self.device)
        self.loss_count = counters["loss_count"].to(self.device)
        self.bad_since_log = counters["bad_since_log"].to(self.device)
        self.consecutive_bad = counters["consecutive_bad"].to(self.device)
        self.last_val_loss = state.get("last_val_loss")
        self.best_checkpoint = state.get("best_checkpoint")
        self.last_checkpoint = ckpt.name
        self._last_saved_step = self.step
        self._last_eval_step = self.step

    def _check_disk_at_start(self) -> None:
        """Warn early if the disk cannot hold the checkpoints this run will keep."""
        if not self.env.is_main:
            return
        n_params = sum(p.numel() for p in self.raw_model.parameters())
        weights = 4 * n_params if self._sharded else estimate_checkpoint_bytes(self.raw_model.state_dict())
        per_ckpt = weights + 2 * 4 * n_params  # + AdamW moments
        needed = per_ckpt * (self.cfg.train.keep_checkpoints + 2)  # kept + best + one being written
        enough, free = check_free_space(self.run.checkpoints, needed)
        if not enough:
            self.metrics.event("disk_warning", self.step,
                               f"{self.run.checkpoints}: this run needs about {needed / 1e9:.2f} GB for checkpoints "
                               f"({per_ckpt / 1e6:.0f} MB each) but only {free / 1e9:.2f} GB are free")

    # ------------------------------------------------------------------ end of run

    def _finish(self, reason: str) -> None:
        progress = self.schedule.progress(self.step)
        if reason == "signal":
            self._save()
            self.metrics.event("stopped", self.step, f"stopped by signal {self._signal} at step {self.step}, "
                               f"learning-rate schedule {percent_done(progress)} done; resume with --resume latest",
                               signal=self._signal, stop_reason=reason, schedule_progress=progress)
            self._write_status(state="stopped", step=self.step, eta_s=None, signal=self._signal,
                               stop_reason=reason, schedule_progress=progress)
            return
        improved = False
        if self._last_eval_step != self.step:
            improved = self._evaluate()
        self._save(best=improved)
        self.metrics.event("finished", self.step,
                           f"training stopped: {stop_summary(reason, progress)}, at step {self.step}",
                           stop_reason=reason, schedule_progress=progress)
        self._write_status(state="finished", step=self.step, eta_s=0, stop_reason=reason,
                           schedule_progress=progress)

    def _fail(self, message: str, reason: str) -> None:
        self.metrics.event("failed", self.step, message, reason=reason)
        self._write_status(state="failed", step=self.step, error=message, eta_s=None)

    def close(self) -> None:
        self._stop_heartbeat_thread()
        self.metrics.close()
        self.loader.close()
        shutdown_distributed(self.env)

    # ------------------------------------------------------------------ status, heartbeat, signals

    def _write_status(self, **fields: Any) -> None:
        if not self.env.is_main:
            return
        with self._status_lock:
            self.run.write_status(stage="train", **fields)

    def _start_heartbeat(self) -> None:
        if not self.env.is_main:
            return
        sampler: Any = None
        try:
            from simone.train.system_stats import SystemSampler

            sampler = SystemSampler(self.run.root, gpus=self.device.type == "cuda")
        except Exception as e:  # noqa: BLE001 - system rows are optional; training is not
            self.run.log_line(f"system stats disabled ({type(e).__name__}: {e})")
        every = max(0.5, float(self.cfg.train.system_stats_every_s or HEARTBEAT_S))

        def beat() -> None:
            last_stats = 0.0
            while not self._stop_heartbeat.wait(min(HEARTBEAT_S, every)):
                try:
                    self._write_status(step=self.step, total_steps=self.total_steps)
                    if sampler is not None and time.time() - last_stats >= every:
                        last_stats = time.time()
                        self.metrics.system(sampler.snapshot())
                except Exception as e:  # noqa: BLE001 - the heartbeat must never kill training
                    self.run.log_line(f"heartbeat: {type(e).__name__}: {e}")
            if sampler is not None:
                sampler.close()

        self._heartbeat = threading.Thread(target=beat, name="simone-heartbeat", daemon=True)
        self._heartbeat.start()

    def _stop_heartbeat_thread(self) -> None:
        self._stop_heartbeat.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=10)
            self._heartbeat = None

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum: int, frame: Any) -> None:
            if self._signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C: stop now
            self._signal = signum

        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old_handlers[sig] = signal.signal(sig, handler)

    def _restore_signal_handlers(self) -> None:
        for sig, old in self._old_handlers.items():
            signal.signal(sig, old)
        self._old_handlers.clear()
