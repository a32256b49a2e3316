"""The training loop: `train(cfg, run, resume=None) -> TrainResult`.

One optimizer step is: set the scheduled learning rate, run `grad_accum` micro-batches forward
(under bf16 autocast where the device has it; fp16 with a grad scaler as the CUDA fallback)
and backward, clip the gradient norm, step AdamW, and add the loss to on-device counters.
Around the steps: logging every `log_every` steps (the only regular host sync), evaluation
every `eval_every` steps and at each epoch end (per-domain loss, bits per byte, perplexity),
early stopping, a seeded generation sample, and checkpoints (`checkpoint.py`).

This file is the loop; what it is made of lives beside it: side effects are callbacks
(`callbacks.py`: status.json and the heartbeat, signals, fault injection, the console line
and expected time, samples), the checkpointed train state and RNGs (saving, resuming, rolling
back) are `state.py`'s, wrapping the model (activation checkpointing, compile, FSDP2, DDP) is
`parallelize.py`'s, and the autocast dtype and compiler check are `precision.py`'s.

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
- Heartbeat. A background thread (callbacks.RunStatus) refreshes status.json (pid, step,
  heartbeat time) every few seconds and writes `system` metric rows; `RunLock` refuses a
  second process.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from simone.checkpoint import CheckpointSaveError, list_checkpoints
from simone.config import Config, ModelConfig
from simone.data.loader import BatchLoader
from simone.data.shards import TokenShard
from simone.data.tokenizer import Tokenizer, load_tokenizer
from simone.errors import SimoneError
from simone.faults import Faults
from simone.inference.evaluate import evaluate_per_domain
from simone.lock import RunLock
from simone.model import build_model
from simone.model.governance import set_policy_domains, uses_policy
from simone.rundir import RunDir
from simone.train.callbacks import OUT_OF_MEMORY, Callback, LogStats, default_callbacks
from simone.train.distributed import (
    DistEnv,
    all_reduce_mean,
    any_rank,
    barrier,
    check_parallel,
    dist_env_from_environ,
    gradient_sync,
    init_distributed,
    local_tensor,
    min_over_ranks,
    resolve_device,
    shutdown_distributed,
    split_batch,
)
from simone.train.early_stopping import EarlyStopping
from simone.train.metrics import LossTermMeter, MetricsLogger, mfu, peak_flops
from simone.train.optim import new_optimizer, optimizer_skips_on_device, set_lr
from simone.train.parallelize import parallelize
from simone.train.precision import allow_tf32, autocast, autocast_dtype, grad_scaler
from simone.train.schedule import LRSchedule, percent_done, stop_summary
from simone.train.state import (
    restore_train_state,
    resume_train_state,
    roll_back,
    save_train_checkpoint,
    zero_interval_counters,
)


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


class ModelSizeError(SimoneError, ValueError):
    """The config's model sizes do not fit the run's tokenizer (the pipeline settles them)."""


def settle_model_sizes(cfg: Config, tokenizer: Tokenizer, keep_larger_vocab: bool = False,
                       log: Callable[[str], None] | None = None) -> None:
    """Size the model from the run's trained tokenizer, once, before training (the pipeline
    and `python -m simone.train` call this; the trainer only checks): an embedding row per
    token id and a policy class per <|domain:NAME|> token. The vocabulary is the tokenizer's;
    with `keep_larger_vocab` (a run that already had its tokenizer) a config asking for more
    rows keeps them, so a run trained that way still resumes from its checkpoints."""
    if keep_larger_vocab and cfg.model.vocab_size < tokenizer.vocab_size and log is not None:
        log(f"model.vocab_size {cfg.model.vocab_size} < tokenizer's {tokenizer.vocab_size}: "
            f"using {tokenizer.vocab_size}")
    if not keep_larger_vocab or cfg.model.vocab_size < tokenizer.vocab_size:
        cfg.model.vocab_size = tokenizer.vocab_size
    set_policy_domains(cfg.model, tokenizer.domains)


def check_model_sizes(cfg: ModelConfig, run: RunDir, shard_vocab_size: int) -> list[str] | None:
    """Check that the model's sizes fit the run's tokenizer (`settle_model_sizes` set them
    before training; the trainer changes nothing) and
    return the policy classes (the tokenizer's domains), or None without a policy head."""
    if cfg.vocab_size < shard_vocab_size:
        raise ModelSizeError(f"{run.config}: model.vocab_size {cfg.vocab_size} is smaller than the tokenizer's "
                             f"{shard_vocab_size} ({run.tokenizer}); settle the sizes before training "
                             f"(settle_model_sizes)")
    if not uses_policy(cfg):
        return None
    domains = load_tokenizer(run.tokenizer).domains
    if cfg.n_domains != len(domains) or not domains:
        raise ModelSizeError(f"{run.config}: model.n_domains {cfg.n_domains} but the tokenizer has {len(domains)} "
                             f"<|domain:NAME|> token(s) ({run.tokenizer}); the policy head needs one class per "
                             f"domain (settle_model_sizes)")
    return domains


def window_control_ids(cfg: Config, run: RunDir) -> dict[str, int] | None:
    """Domain -> its `<|domain:NAME|>` token id, for the loader's window control tokens
    (None when `data.control_window_prob` is 0)."""
    if cfg.data.control_window_prob <= 0:
        return None
    tok = load_tokenizer(run.tokenizer)
    if not tok.domains:
        raise ModelSizeError(f"data.control_window_prob={cfg.data.control_window_prob} but the tokenizer "
                             f"({run.tokenizer}) has no <|domain:NAME|> tokens")
    return {d: tok.domain_token_id(d) for d in tok.domains}


def out_of_memory_error(cfg: Config, micro_batch: int, grad_accum: int, e: BaseException) -> TrainingError:
    """The error for a step that ran out of GPU memory: a smaller batch that keeps the effective one."""
    tc = cfg.train
    effective = tc.batch_size * tc.grad_accum
    half = max(1, tc.batch_size // 2)
    accum = max(1, effective // half)
    return TrainingError(
        f"out of GPU memory with train.batch_size={tc.batch_size} ({micro_batch} sequences per "
        f"process, seq_len {cfg.model.max_seq_len}, grad_accum {grad_accum}): try --set train.batch_size={half} "
        f"--set train.grad_accum={accum} to keep the effective batch of {effective} sequences ({e})",
        "out_of_memory")


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None, model: torch.nn.Module,
                   grad_clip: float, loss: torch.Tensor, skips_on_device: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip the gradient norm and step the optimizer unless the step is bad (a non-finite loss
    or norm); return (norm, finite) as device tensors. Where the optimizer `skips_on_device`
    (fused AdamW, no scaler) it is handed `found_inf`, so a bad step costs no host sync."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    max_norm = grad_clip if grad_clip and grad_clip > 0 else float("inf")
    grad_norm = local_tensor(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
    if scaler is not None:
        # fp16: overflowing gradients are the scaler's business; only a bad loss counts
        finite = torch.isfinite(loss)
        scaler.step(optimizer)
        scaler.update()
    else:
        finite = torch.isfinite(grad_norm) & torch.isfinite(loss)
        if skips_on_device:
            optimizer.found_inf = (~finite).float()  # fused AdamW skips on the device
            optimizer.step()
            del optimizer.found_inf
        elif bool(finite):  # non-fused optimizer: one host sync per step
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, finite


def build_model_and_optimizer(cfg: Config, parallel: str, env: DistEnv, device: torch.device,
                              log: Callable[[str], None]) -> tuple[torch.nn.Module, torch.nn.Module,
                                                                   torch.optim.Optimizer, torch.dtype | None,
                                                                   torch.amp.GradScaler | None]:
    """The seeded model (the same initial weights on every rank), it wrapped for training
    (parallelize.py), its optimizer, the autocast dtype and the fp16 grad scaler (or None)."""
    tc = cfg.train
    torch.manual_seed(tc.seed)
    raw_model = build_model(cfg.model).to(device)
    amp_dtype = autocast_dtype(tc.dtype, device)
    scaler = grad_scaler(amp_dtype, device)
    model = parallelize(raw_model, tc, parallel, env, device, log)
    optimizer = new_optimizer(raw_model, tc, device)  # after parallelize: FSDP2 replaces parameters
    torch.manual_seed(tc.seed + env.rank)  # dropout streams differ per rank
    return raw_model, model, optimizer, amp_dtype, scaler


class Trainer:
    """The loop of one training run (one process): model, optimizer, data and the counters a
    checkpoint carries. Side effects are callbacks (callbacks.py), the train state is
    state.py's, wrapping the model is parallelize.py's and the dtype precision.py's."""

    def __init__(self, cfg: Config, run: RunDir, env: DistEnv, clock: Callable[[], float] = time.monotonic):
        self.cfg, self.run, self.env = cfg, run, env
        tc = cfg.train
        self.faults = Faults.from_env()
        self.device = resolve_device(tc.device, env)
        init_distributed(env, self.device)
        allow_tf32(self.device)

        run.checkpoints.mkdir(parents=True, exist_ok=True)
        self.metrics = MetricsLogger(run, enabled=env.is_main)
        self.train_shard = TokenShard(run.data, "train")
        self.val_shard = TokenShard(run.data, "val")
        self.seq_len = cfg.model.max_seq_len

        # Keep the effective batch (batch_size x grad_accum sequences per step) whatever the
        # process count: the accumulation is divided over the processes, and what it cannot
        # absorb comes out of the micro-batch (distributed.split_batch; an error if neither can).
        self.micro_batch, self.grad_accum = split_batch(tc.batch_size, tc.grad_accum, env.world_size)
        self.parallel = check_parallel(tc.parallel)
        if self.parallel == "fsdp" and not env.distributed:
            self.metrics.log("train.parallel=fsdp needs several processes (torchrun); one process trains unsharded")
        self.sharded = self.parallel == "fsdp" and env.distributed
        # Governance: the policy head's classes are the tokenizer's domain control tokens, and
        # its labels (each input token's domain) come from the loader. None: no policy head.
        self.domain_classes = check_model_sizes(cfg.model, run, self.train_shard.vocab_size)
        self.loss_terms = LossTermMeter()  # the comprehensive loss's terms, logged per interval
        self.loader = BatchLoader(self.train_shard, self.micro_batch, self.seq_len, tc.seed, rank=env.rank,
                                  world_size=env.world_size, device=self.device, grad_accum=self.grad_accum,
                                  domain_classes=self.domain_classes,
                                  control_ids=window_control_ids(cfg, run),
                                  control_window_prob=cfg.data.control_window_prob)
        self.steps_per_epoch = self.loader.batches_per_epoch // self.grad_accum
        self.total_steps = tc.num_epochs * self.steps_per_epoch
        if tc.max_steps is not None:
            self.total_steps = min(self.total_steps, tc.max_steps)
        self.tokens_per_step = self.micro_batch * self.seq_len * self.grad_accum * env.world_size
        # cosine over the planned steps; under a time cap they do not fit, planned by time (schedule.py)
        self.schedule = LRSchedule(tc.lr, tc.warmup_steps, self.total_steps, tc.min_lr_ratio,
                                   max_seconds=tc.max_minutes * 60 if tc.max_minutes is not None else None,
                                   decay_fraction=tc.decay_fraction, clock=clock)
        # an evaluation reads eval_batches per domain forward only (about a third of a training
        # micro-batch each); doubled for the checkpoint written with it and for uncompiled code
        self.schedule.expect_evaluations(
            tc.eval_every, 2 * tc.eval_batches * max(1, len(self.val_shard.domains)) / (3 * self.grad_accum))

        self.raw_model, self.model, self.optimizer, self.amp_dtype, self.scaler = build_model_and_optimizer(
            cfg, self.parallel, env, self.device, self.metrics.log)
        self._skips_on_device = optimizer_skips_on_device(self.optimizer) and self.scaler is None
        self.early = EarlyStopping(tc.min_epochs, tc.num_epochs, tc.patience)
        self.flops_per_token = self.raw_model.flops_per_token(self.seq_len)
        self.peak_flops = peak_flops(self.device, self.amp_dtype)

        # counters that a checkpoint carries (state.py)
        self.step = self.epochs_done = self.tokens_seen = self.rollbacks = 0
        self.lr_scale = 1.0
        zero_interval_counters(self)
        self.last_val_loss: float | None = None
        self.best_checkpoint: str | None = None
        self.last_checkpoint: str | None = None

        # this process only
        self.signal_received: int | None = None  # set by StopOnSignal / FaultInjection
        self.inject_nan = False  # set by FaultInjection before a step
        self._last_lr = tc.lr
        self._last_grad_norm = torch.zeros((), device=self.device)
        self._last_saved_step = self._last_eval_step = -1
        self.session_start = time.time()  # wall time for status.json; the cap is the schedule's clock
        self.schedule.start_session()
        self._session_tokens = 0
        self._log_clock = (time.perf_counter(), 0)  # (time, tokens) at the last log
        self.callbacks: list[Callback] = default_callbacks(self)

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.amp_dtype, self.device)

    @property
    def epoch(self) -> float:
        """Epochs done, with the fraction of the current one."""
        return self.epochs_done + (0.0 if self.loader.epoch_done else self.loader.epoch_progress)

    def _call(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    # ------------------------------------------------------------------ the run

    def fit(self, resume: str | None) -> TrainResult:
        tc = self.cfg.train
        stop_reason = "max_steps"
        try:
            if resume is not None:
                resume_train_state(self, resume)
            else:
                self._start_fresh()
            self._call("on_train_start")
            while True:
                reason = self._stop_reason()
                if reason is not None:
                    stop_reason = reason
                    break
                try:
                    self._call("on_step_start")
                    epoch_ended = self._train_step()
                except OUT_OF_MEMORY as e:
                    raise out_of_memory_error(self.cfg, self.micro_batch, self.grad_accum, e) from e
                self.step += 1
                self._call("on_step_end")
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
                    self._call("on_pause", epoch_ended)
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
            self._call("on_train_end", {"state": "stopped", "step": self.step, "eta_s": None})
            raise
        except Exception as e:
            self._fail(f"{type(e).__name__}: {e}", "error")
            raise
        finally:
            self._call("close")

        seconds = time.time() - self.session_start
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
        # Signals and the clock differ between ranks, so ranks must agree on them: a collective,
        # which (with NCCL) is a host sync, so under torchrun only on logging steps.
        agree_now = not self.env.distributed or self._logging_step()
        if agree_now and any_rank(self.signal_received is not None, self.env, self.device):
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
                with self.autocast():
                    _, loss = self.model(x, y, **governance)
                if self.cfg.model.governance:
                    self.loss_terms.add(self.raw_model.loss_terms)
                if self.inject_nan:
                    loss = loss * float("nan")
                step_loss += loss.detach().float()
                scaled = loss / self.grad_accum
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            epoch_ended = epoch_ended or self.loader.epoch_done
        step_loss /= self.grad_accum

        grad_norm, finite = optimizer_step(self.optimizer, self.scaler, self.raw_model, tc.grad_clip, step_loss,
                                           self._skips_on_device)
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

    # ------------------------------------------------------------------ logging and bad steps

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
        news = self.schedule.observe(self.step, agree=lambda x: min_over_ranks(x, self.env, self.device))
        if news:
            self.metrics.event("schedule", self.step, news, mode=self.schedule.mode,
                               end_step=self.schedule.end_step)
        loss = loss_sum_v / count if count else None  # None (JSON null): every step skipped
        step_mfu = mfu(self.flops_per_token, tokens_per_s / self.env.world_size, self.peak_flops)
        epoch = self.epoch
        self.metrics.train(step=self.step, epoch=round(epoch, 4), loss=loss, lr=self._last_lr,
                           grad_norm=grad_norm, tokens_per_s=round(tokens_per_s, 1),
                           mfu=None if step_mfu is None else round(step_mfu, 5), tokens_seen=self.tokens_seen,
                           **self.loss_terms.read_and_reset())
        self._call("on_log", LogStats(self.step, epoch, loss, self._last_lr, grad_norm, tokens_per_s,
                                      steps_per_s, step_mfu))
        self.loss_sum.zero_()
        self.loss_count.zero_()
        self.bad_since_log.zero_()
        if bad:
            self.metrics.event("nan_skip", self.step, f"{int(bad)} step(s) with a non-finite loss or gradient "
                               f"norm skipped since the last log", skipped=int(bad),
                               consecutive=int(consecutive))
        if consecutive >= self.cfg.train.max_bad_steps:
            self._rollback(int(consecutive))

    def _rollback(self, consecutive: int) -> None:
        """Go back to the last good checkpoint with a smaller learning rate (state.roll_back), or fail."""
        tc = self.cfg.train
        if self.rollbacks >= tc.max_rollbacks:
            raise TrainingError(
                f"{consecutive} consecutive steps with a non-finite loss or gradient norm at step {self.step}, "
                f"after {self.rollbacks} rollback(s) (train.max_rollbacks={tc.max_rollbacks}); "
                f"try a lower train.lr (now {tc.lr * self.lr_scale:.2e})", "non_finite")
        roll_back(self, consecutive)

    def report_bad_checkpoint(self, message: str) -> None:
        self.metrics.event("checkpoint_corrupt", self.step, message)

    # ------------------------------------------------------------------ evaluation

    def _evaluate(self) -> bool:
        """Per-domain validation loss / bpb / perplexity; returns True if it is a new best."""
        tc = self.cfg.train
        ev = evaluate_per_domain(self.raw_model, self.val_shard, self.seq_len, tc.batch_size,
                                 tc.eval_batches, device=self.device, autocast=self.autocast)
        self._last_eval_step = self.step
        if ev["val_loss"] is None:
            return False
        val_loss = ev["val_loss"]
        per_domain = {d: {k: v[k] for k in ("loss", "bpb", "ppl")} for d, v in ev["per_domain"].items()}
        self.metrics.eval(step=self.step, epoch=round(self.epoch, 4), val_loss=val_loss, val_bpb=ev["val_bpb"],
                          val_ppl=ev["val_ppl"], per_domain=per_domain)
        self.last_val_loss = val_loss
        improved = self.early.update(val_loss, self.step, self.epochs_done)
        if self.early.stopped:
            self.metrics.event("early_stop", self.step, f"validation loss has not improved for "
                               f"{self.early.bad_evals} evaluations (best {self.early.best_loss:.4f} at step "
                               f"{self.early.best_step})")
        self._call("on_eval", ev, improved)
        return improved

    # ------------------------------------------------------------------ checkpoints

    def _save(self, best: bool = False) -> None:
        if self.step == self._last_saved_step and not best:
            return
        path = save_train_checkpoint(self, best)  # every rank gathers its part; rank 0 writes
        if path is not None:
            self.last_checkpoint = path.name
            if best:
                self.best_checkpoint = path.name
            self.metrics.event("checkpoint", self.step, f"saved {path.name}" + (" (best)" if best else ""),
                               path=str(path), best=best)
            self._call("on_checkpoint", path, best)
        barrier(self.env)
        self._last_saved_step = self.step

    def restore(self, ckpt: Path) -> None:
        """Put a verified checkpoint back (state.py); its step counts as saved and evaluated."""
        restore_train_state(self, ckpt)
        self._last_saved_step = self._last_eval_step = self.step

    # ------------------------------------------------------------------ end of run

    def _finish(self, reason: str) -> None:
        progress = self.schedule.progress(self.step)
        if reason == "signal":
            self._save()
            sig = self.signal_received
            self.metrics.event("stopped", self.step, f"stopped by signal {sig} at step {self.step}, "
                               f"learning-rate schedule {percent_done(progress)} done; resume with --resume latest",
                               signal=sig, stop_reason=reason, schedule_progress=progress)
            self._call("on_train_end", {"state": "stopped", "step": self.step, "eta_s": None, "signal": sig,
                                        "stop_reason": reason, "schedule_progress": progress})
            return
        improved = False
        if self._last_eval_step != self.step:
            improved = self._evaluate()
        self._save(best=improved)
        self.metrics.event("finished", self.step,
                           f"training stopped: {stop_summary(reason, progress)}, at step {self.step}",
                           stop_reason=reason, schedule_progress=progress)
        self._call("on_train_end", {"state": "finished", "step": self.step, "eta_s": 0, "stop_reason": reason,
                                    "schedule_progress": progress})

    def _fail(self, message: str, reason: str) -> None:
        self.metrics.event("failed", self.step, message, reason=reason)
        self._call("on_train_end", {"state": "failed", "step": self.step, "error": message, "eta_s": None})

    def close(self) -> None:
        self._call("close")
        self.metrics.close()
        self.loader.close()
        shutdown_distributed(self.env)
