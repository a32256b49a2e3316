"""The training loop: `train(cfg, run, resume=None) -> TrainResult`.

One optimizer step is: set the scheduled learning rate, run `grad_accum` micro-batches forward
(under bf16 autocast where the device has it; fp16 with a grad scaler as the CUDA fallback)
and backward, clip the gradient norm, step the optimizer, and add the loss to on-device
counters. Around the steps: logging every `log_every` steps (the only regular host sync), then,
off the training clock, evaluation every `eval_every` steps and at each epoch end (per-domain
loss, bits per byte, perplexity) with early stopping, a seeded generation sample, checkpoints.

This file is the loop; what it is made of lives beside it. What changes as the run trains is
one `TrainState` (state.py: the model, optimizer, loader, schedule, early stopping, counters),
which state.py's functions start, checkpoint, resume and roll back. Side effects are callbacks
(callbacks.py: metrics rows, status.json and the heartbeat, signals, fault injection,
evaluation with early stopping, the console line, samples, checkpoints). Wrapping the model is
parallelize.py's, the autocast dtype and compiler check precision.py's.

Fault tolerance (docs: issue 8):
- Exact resume (state.py): a checkpoint holds everything the next step depends on, and resuming
  reproduces the uninterrupted run's losses bit for bit on a CPU (same thread count).
- Signals. SIGTERM / SIGINT set a flag; the loop finishes the current step, saves a
  checkpoint, marks status.json `stopped` and returns with stop_reason "signal".
- Non-finite steps, without a per-step host sync: a step is bad when the loss or the total
  gradient norm (a device tensor, computed for clipping) is not finite. A fused AdamW (CPU and
  CUDA) skips it on the device: handed `found_inf` (as GradScaler does), its kernel leaves
  parameters, moments and step count untouched (a non-fused optimizer reads the norm every
  step). Counters on the device, read at logging steps, report each bad step as a `nan_skip`
  event; `max_bad_steps` in a row roll the run back to the last good checkpoint with the
  learning rate times `rollback_lr_factor`; after `max_rollbacks` rollbacks the run fails.
- A heartbeat refreshes status.json every few seconds (callbacks.RunStatus); `RunLock` refuses a second.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch

from simone.checkpoint import CheckpointSaveError
from simone.config import Config, ModelConfig, TrainConfig
from simone.data.loader import BatchLoader
from simone.data.shards import TokenShard
from simone.data.tokenizer import Tokenizer, load_tokenizer
from simone.errors import SimoneError
from simone.faults import Faults
from simone.inference.shard_loss import evaluate_per_domain
from simone.lock import RunLock
from simone.model import LanguageModel, build_model
from simone.model.governance_heads import set_policy_domains, uses_policy
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
from simone.train.optim import TrainingOptimizer, new_optimizer, optimizer_skips_on_device, set_lr
from simone.train.parallelize import parallelize
from simone.train.precision import allow_tf32, autocast, autocast_dtype, grad_scaler
from simone.train.schedule import LRSchedule, percent_done, stop_summary
from simone.train.state import TrainState, roll_back, start_or_resume, zero_counters


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


def train(cfg: Config, run: RunDir, resume: str | None = None, clock: Callable[[], float] | None = None) -> TrainResult:
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


def settle_model_sizes(
    cfg: Config, tokenizer: Tokenizer, keep_larger_vocab: bool = False, log: Callable[[str], None] | None = None
) -> None:
    """Size the model from the run's trained tokenizer, once, before training (the pipeline
    and `python -m simone.train` call this; the trainer only checks): an embedding row per
    token id and a policy class per <|domain:NAME|> token. The vocabulary is the tokenizer's;
    with `keep_larger_vocab` (a run that already had its tokenizer) a config asking for more
    rows keeps them, so a run trained that way still resumes from its checkpoints."""
    if keep_larger_vocab and cfg.model.vocab_size < tokenizer.vocab_size and log is not None:
        log(
            f"model.vocab_size {cfg.model.vocab_size} < tokenizer's {tokenizer.vocab_size}: using {tokenizer.vocab_size}"
        )
    if not keep_larger_vocab or cfg.model.vocab_size < tokenizer.vocab_size:
        cfg.model.vocab_size = tokenizer.vocab_size
    set_policy_domains(cfg.model, tokenizer.domains)


def check_model_sizes(cfg: ModelConfig, run: RunDir, shard_vocab_size: int) -> list[str] | None:
    """Check that the model's sizes fit the run's tokenizer (`settle_model_sizes` set them before
    training; the trainer changes nothing); return the policy classes (the tokenizer's domains) or None."""
    if cfg.vocab_size < shard_vocab_size:
        raise ModelSizeError(
            f"{run.config}: model.vocab_size {cfg.vocab_size} is smaller than the tokenizer's "
            f"{shard_vocab_size} ({run.tokenizer}); settle the sizes before training "
            f"(settle_model_sizes)"
        )
    if not uses_policy(cfg):
        return None
    domains = load_tokenizer(run.tokenizer).domains
    if cfg.n_domains != len(domains) or not domains:
        raise ModelSizeError(
            f"{run.config}: model.n_domains {cfg.n_domains} but the tokenizer has {len(domains)} "
            f"<|domain:NAME|> token(s) ({run.tokenizer}); the policy head needs one class per "
            f"domain (settle_model_sizes)"
        )
    return domains


def window_control_ids(cfg: Config, run: RunDir) -> dict[str, int] | None:
    """Domain -> its `<|domain:NAME|>` token id, for the loader's window control tokens
    (None when `data.control_window_prob` is 0)."""
    if cfg.data.control_window_prob <= 0:
        return None
    tok = load_tokenizer(run.tokenizer)
    if not tok.domains:
        raise ModelSizeError(
            f"data.control_window_prob={cfg.data.control_window_prob} but the tokenizer "
            f"({run.tokenizer}) has no <|domain:NAME|> tokens"
        )
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
        "out_of_memory",
    )


def optimizer_step(
    optimizer: TrainingOptimizer,
    scaler: torch.amp.GradScaler | None,
    model: torch.nn.Module,
    grad_clip: float,
    loss: torch.Tensor,
    skips_on_device: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip the gradient norm and step the optimizer unless the step is bad (a non-finite loss
    or norm); return (norm, finite) as device tensors. Where the optimizer `skips_on_device`
    (fused AdamW, no scaler) it is handed `found_inf`, so a bad step costs no host sync."""
    if scaler is not None:  # GradScaler reads only `param_groups` and `step()`: Muon + AdamW has both
        scaler.unscale_(cast(torch.optim.Optimizer, optimizer))
    max_norm = grad_clip if grad_clip and grad_clip > 0 else float("inf")
    grad_norm = local_tensor(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
    if scaler is not None:
        # fp16: overflowing gradients are the scaler's business; only a bad loss counts
        finite = torch.isfinite(loss)
        scaler.step(cast(torch.optim.Optimizer, optimizer))
        scaler.update()
    else:
        finite = torch.isfinite(grad_norm) & torch.isfinite(loss)
        if skips_on_device:  # fused AdamW skips on the device: its step reads `found_inf`, set as GradScaler does
            optimizer.found_inf = (~finite).float()  # type: ignore[union-attr]  # no optimizer type declares it
            optimizer.step()
            del optimizer.found_inf  # type: ignore[union-attr]
        elif bool(finite):  # non-fused optimizer: one host sync per step
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, finite


def build_model_and_optimizer(
    cfg: Config, parallel: str, env: DistEnv, device: torch.device, log: Callable[[str], None]
) -> tuple[LanguageModel, torch.nn.Module, TrainingOptimizer, torch.dtype | None, torch.amp.GradScaler | None]:
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


def train_loader(
    cfg: Config,
    run: RunDir,
    shard: TokenShard,
    env: DistEnv,
    device: torch.device,
    micro_batch: int,
    grad_accum: int,
    domain_classes: list[str] | None,
) -> BatchLoader:
    """This process's share of the training shard's batches (with domain labels for the policy head)."""
    return BatchLoader(
        shard,
        micro_batch,
        cfg.model.max_seq_len,
        cfg.train.seed,
        rank=env.rank,
        world_size=env.world_size,
        device=device,
        grad_accum=grad_accum,
        domain_classes=domain_classes,
        control_ids=window_control_ids(cfg, run),
        control_window_prob=cfg.data.control_window_prob,
        doc_aligned=cfg.train.doc_aligned,
    )


def lr_schedule(tc: TrainConfig, total_steps: int, clock: Callable[[], float]) -> LRSchedule:
    """The run's learning rate over its planned steps; under a time cap, planned by time (schedule.py)."""
    max_seconds = tc.max_minutes * 60 if tc.max_minutes is not None else None
    return LRSchedule(
        tc.lr, tc.warmup_steps, total_steps, tc.min_lr_ratio, max_seconds, tc.decay_fraction, clock, tc.lr_schedule
    )


class Trainer:
    """The loop of one training run (one process). What changes as it trains is `self.state`
    (state.TrainState); its side effects are callbacks, called through `hook`."""

    def __init__(self, cfg: Config, run: RunDir, env: DistEnv, clock: Callable[[], float] = time.monotonic):
        self.cfg, self.run, self.env = cfg, run, env
        tc = cfg.train
        self.faults = Faults.from_env()
        self.device = resolve_device(tc.device, env)
        init_distributed(env, self.device)
        allow_tf32(self.device)

        run.checkpoints.mkdir(parents=True, exist_ok=True)
        self.metrics = MetricsLogger(run, enabled=env.is_main)
        train_shard = TokenShard(run.data, "train")
        self.val_shard = TokenShard(run.data, "val")
        self.seq_len = cfg.model.max_seq_len

        # Keep the effective batch (batch_size x grad_accum sequences per step) whatever the
        # process count: the accumulation is divided over the processes, and what it cannot
        # absorb comes out of the micro-batch (distributed.split_batch; an error if neither can).
        self.micro_batch, self.grad_accum = split_batch(tc.batch_size, tc.grad_accum, env.world_size)
        parallel = check_parallel(tc.parallel)
        if parallel == "fsdp" and not env.distributed:
            self.metrics.log("train.parallel=fsdp needs several processes (torchrun); one process trains unsharded")
        self.sharded = parallel == "fsdp" and env.distributed
        # Governance: the policy head's classes are the tokenizer's domain control tokens, and
        # its labels (each input token's domain) come from the loader. None: no policy head.
        self.domain_classes = check_model_sizes(cfg.model, run, train_shard.vocab_size)
        self.loss_terms = LossTermMeter()  # the comprehensive loss's terms, logged per interval
        loader = train_loader(
            cfg, run, train_shard, env, self.device, self.micro_batch, self.grad_accum, self.domain_classes
        )
        self.steps_per_epoch = loader.batches_per_epoch // self.grad_accum
        self.total_steps = tc.num_epochs * self.steps_per_epoch
        if tc.max_steps is not None:
            self.total_steps = min(self.total_steps, tc.max_steps)
        self.tokens_per_step = self.micro_batch * self.seq_len * self.grad_accum * env.world_size
        schedule = lr_schedule(tc, self.total_steps, clock)
        # an evaluation reads eval_batches per domain forward only (about a third of a training
        # micro-batch each); doubled for the checkpoint written with it and for uncompiled code
        schedule.expect_evaluations(
            tc.eval_every, 2 * tc.eval_batches * max(1, len(self.val_shard.domains)) / (3 * self.grad_accum)
        )

        raw_model, self.model, optimizer, self.amp_dtype, scaler = build_model_and_optimizer(
            cfg, parallel, env, self.device, self.metrics.log
        )
        self._skips_on_device = optimizer_skips_on_device(optimizer) and scaler is None
        self.flops_per_token = raw_model.flops_per_token(self.seq_len)
        self.peak_flops = peak_flops(self.device, self.amp_dtype)
        early = EarlyStopping(tc.min_epochs, tc.num_epochs, tc.patience)
        self.state = TrainState(raw_model, optimizer, scaler, loader, schedule, early, *zero_counters(self.device))

        # this process only
        self.signal_received: int | None = None  # set by StopOnSignal / FaultInjection
        self.inject_nan = False  # set by FaultInjection before a step
        self._last_lr = tc.lr
        self._last_grad_norm = torch.zeros((), device=self.device)
        self.session_start = time.time()  # wall time for status.json; the cap is the schedule's clock
        schedule.start_session()
        self._session_tokens = 0
        self._log_clock = (time.perf_counter(), 0)  # (time, tokens) at the last log
        self.callbacks: list[Callback] = default_callbacks(self)

    @property
    def step(self) -> int:
        return self.state.step

    @property
    def loader(self) -> BatchLoader:
        return self.state.loader

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.amp_dtype, self.device)

    def hook(self, name: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, name)(self, *args)

    # ------------------------------------------------------------------ the run

    def fit(self, resume: str | None) -> TrainResult:
        s = self.state
        try:
            start_or_resume(s, self, resume)
            self.hook("on_train_start")
            while (stop_reason := self._stop_reason()) is None:
                try:
                    self.hook("on_step_start")
                    epoch_ended = self._train_step()
                except OUT_OF_MEMORY as e:
                    raise out_of_memory_error(self.cfg, self.micro_batch, self.grad_accum, e) from e
                s.step += 1
                self.hook("on_step_end")
                if epoch_ended:
                    s.epochs_done += 1
                    self.metrics.event("epoch_end", s.step, f"epoch {s.epochs_done} done", epoch=s.epochs_done)
                if self._logging_step():
                    self._log_and_check()
                with s.schedule.paused():  # not training: left out of the measured throughput
                    self.hook("on_pause", epoch_ended)  # evaluation first, then samples
                    self.hook("on_save_point", epoch_ended)  # checkpoints
            self._finish(stop_reason)
            barrier(self.env)  # leave together: a rank tearing down early can hang the others
        except TrainingError as e:
            self._fail(str(e), e.reason)
            raise
        except CheckpointSaveError as e:
            self._fail(str(e), "checkpoint_save")
            raise TrainingError(str(e), "checkpoint_save") from e
        except KeyboardInterrupt:  # a second Ctrl-C: no checkpoint, the last one stands
            self.metrics.event("stopped", s.step, "interrupted (second Ctrl-C) without a checkpoint")
            self.hook("on_train_end", {"state": "stopped", "step": s.step, "eta_s": None})
            raise
        except Exception as e:
            self._fail(f"{type(e).__name__}: {e}", "error")
            raise
        finally:
            self.hook("close")

        seconds = time.time() - self.session_start
        tokens_per_s = self._session_tokens / seconds if seconds > 0 else 0.0
        return TrainResult(
            steps=s.step,
            epochs=s.epochs_done,
            best_val_loss=None if math.isinf(s.early.best_loss) else s.early.best_loss,
            final_val_loss=s.last_val_loss,
            best_checkpoint=s.best_checkpoint,
            last_checkpoint=s.last_checkpoint,
            tokens_seen=s.tokens_seen,
            tokens_per_s=tokens_per_s,
            mfu=mfu(self.flops_per_token, tokens_per_s / max(1, self.env.world_size), self.peak_flops),
            seconds=seconds,
            stop_reason=stop_reason,
            schedule_progress=s.schedule.progress(s.step),
        )

    def _stop_reason(self) -> str | None:
        """Why to stop before the next step (agreed by all ranks), or None."""
        s, tc = self.state, self.cfg.train
        # Signals and the clock differ between ranks, so ranks must agree on them: a collective,
        # which (with NCCL) is a host sync, so under torchrun only on logging steps.
        agree_now = not self.env.distributed or self._logging_step()
        if agree_now and any_rank(self.signal_received is not None, self.env, self.device):
            return "signal"
        reason = s.early.should_stop(s.epochs_done)  # early stopping: Evaluation updates it
        if reason is not None:
            return reason
        if tc.max_steps is not None and s.step >= tc.max_steps:
            return "max_steps"
        if s.step >= self.total_steps:
            return "num_epochs"
        # the time cap: the time-planned decay has ended, or the clock says so (agreed over the ranks)
        if s.schedule.finished(s.step) or (agree_now and any_rank(s.schedule.out_of_time(), self.env, self.device)):
            return "max_minutes"
        return None

    def _logging_step(self) -> bool:
        return self.step % max(1, self.cfg.train.log_every) == 0

    # ------------------------------------------------------------------ one optimizer step

    def _train_step(self) -> bool:
        """Run one optimizer step (grad_accum micro-batches); return True if an epoch ended."""
        s = self.state
        lr = s.schedule.lr(s.step) * s.lr_scale
        set_lr(s.optimizer, lr)
        epoch_ended = False
        step_loss = torch.zeros((), device=self.device)
        for micro in range(self.grad_accum):
            governance = {}
            if self.domain_classes is not None:
                x, y, governance["domain_ids"] = s.loader.next_batch_with_domains()
            else:
                x, y = s.loader.next_batch()
            last = micro == self.grad_accum - 1
            with gradient_sync(self.model, s.model, last, self.env):
                with self.autocast():
                    _, loss = self.model(x, y, **governance)
                if self.cfg.model.governance:
                    self.loss_terms.add(s.model.loss_terms)
                if self.inject_nan:
                    loss = loss * float("nan")
                step_loss += loss.detach().float()
                scaled = loss / self.grad_accum
                (s.scaler.scale(scaled) if s.scaler is not None else scaled).backward()
            epoch_ended = epoch_ended or s.loader.epoch_done
        step_loss /= self.grad_accum

        grad_norm, finite = optimizer_step(
            s.optimizer, s.scaler, s.model, self.cfg.train.grad_clip, step_loss, self._skips_on_device
        )
        bad = (~finite).long()
        s.loss_sum += torch.where(finite, step_loss, torch.zeros_like(step_loss))
        s.loss_count += finite.long()
        s.bad_since_log += bad
        s.consecutive_bad = (s.consecutive_bad + bad) * bad
        self._last_grad_norm = grad_norm.detach()
        s.tokens_seen += self.tokens_per_step
        self._session_tokens += self.tokens_per_step
        self._last_lr = lr
        return epoch_ended

    def _log_and_check(self) -> None:
        """A logging step: read the device counters (one sync), report the interval (on_log), handle bad steps."""
        s = self.state
        loss_sum = all_reduce_mean(s.loss_sum, self.env)
        counters = (loss_sum, s.loss_count, s.bad_since_log, s.consecutive_bad, self._last_grad_norm)
        loss_sum_v, count, bad, consecutive, grad_norm = torch.stack([c.float() for c in counters]).tolist()
        bad, consecutive = int(bad), int(consecutive)
        now = time.perf_counter()
        t0, tok0 = self._log_clock
        dt = max(now - t0, 1e-9)
        tokens_per_s = (self._session_tokens - tok0) / dt
        steps_per_s = (self._session_tokens - tok0) / self.tokens_per_step / dt
        self._log_clock = (now, self._session_tokens)
        news = s.schedule.observe(s.step, agree=lambda x: min_over_ranks(x, self.env, self.device))
        if news:
            self.metrics.event("schedule", s.step, news, mode=s.schedule.mode, end_step=s.schedule.end_step)
        loss = loss_sum_v / count if count else None  # None (JSON null): every step skipped
        step_mfu = mfu(self.flops_per_token, tokens_per_s / self.env.world_size, self.peak_flops)
        stats = LogStats(s.step, s.epoch, loss, self._last_lr, grad_norm, tokens_per_s, steps_per_s, step_mfu)
        self.hook("on_log", stats)
        for counter in (s.loss_sum, s.loss_count, s.bad_since_log):  # bad steps in a row go on counting
            counter.zero_()
        if bad:
            self.metrics.event(
                "nan_skip",
                s.step,
                f"{bad} step(s) with a non-finite loss or gradient norm skipped since the last log",
                skipped=bad,
                consecutive=consecutive,
            )
        tc = self.cfg.train
        if consecutive >= tc.max_bad_steps:  # back to the last good checkpoint with a smaller lr, or fail
            if s.rollbacks >= tc.max_rollbacks:
                raise TrainingError(
                    f"{consecutive} consecutive steps with a non-finite loss or gradient norm at step {s.step}, "
                    f"after {s.rollbacks} rollback(s) (train.max_rollbacks={tc.max_rollbacks}); "
                    f"try a lower train.lr (now {tc.lr * s.lr_scale:.2e})",
                    "non_finite",
                )
            roll_back(s, self, consecutive)

    def _evaluate(self) -> dict[str, Any]:
        """Per-domain validation loss / bpb / perplexity of the model now (callbacks.Evaluation says when)."""
        tc = self.cfg.train
        return evaluate_per_domain(
            self.state.model,
            self.val_shard,
            self.seq_len,
            tc.batch_size,
            tc.eval_batches,
            device=self.device,
            autocast=self.autocast,
        )

    def _finish(self, reason: str) -> None:
        s = self.state
        self.hook("on_stop", reason)  # the last evaluation (unless signalled) and checkpoint
        progress = s.schedule.progress(s.step)
        end = {"stop_reason": reason, "schedule_progress": progress}
        if reason == "signal":
            sig = self.signal_received
            self.metrics.event(
                "stopped",
                s.step,
                f"stopped by signal {sig} at step {s.step}, learning-rate schedule "
                f"{percent_done(progress)} done; resume with --resume latest",
                signal=sig,
                **end,
            )
            self.hook("on_train_end", {"state": "stopped", "step": s.step, "eta_s": None, "signal": sig, **end})
        else:
            self.metrics.event(
                "finished", s.step, f"training stopped: {stop_summary(reason, progress)}, at step {s.step}", **end
            )
            self.hook("on_train_end", {"state": "finished", "step": s.step, "eta_s": 0, **end})

    def _fail(self, message: str, reason: str) -> None:
        self.metrics.event("failed", self.step, message, reason=reason)
        self.hook("on_train_end", {"state": "failed", "step": self.step, "error": message, "eta_s": None})

    def close(self) -> None:
        self.hook("close")
        self.metrics.close()
        self.state.loader.close()
        shutdown_distributed(self.env)
