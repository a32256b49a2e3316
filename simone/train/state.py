"""The train state: one typed `TrainState` holding everything of a run that changes as it trains
(model and optimizer, the loader's position, the schedule's plan, early stopping, the counters),
and the functions that start, checkpoint, resume and roll it back.

Exact resume depends on this file: everything the next step reads is saved by `save_train_checkpoint`
(with every rank's torch / numpy / python RNG states) and restored by `restore_train_state`, or the
resumed run's losses drift from the uninterrupted one. The functions change the `TrainState` they are
given and only read the run's fixed surroundings (`RunContext`); `callbacks.Checkpointing` says when.
A continued run (`train.init_from`) starts, and rolls back with no checkpoint yet, from its parent's weights.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from simone.checkpoint import (
    WEIGHTS,
    CheckpointError,
    check_state_fits,
    check_tokenizer,
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from simone.data.loader import BatchLoader
from simone.inference.load import LoadedModel, load_model
from simone.model import LanguageModel, build_model
from simone.rundir import sha256_file
from simone.train.distributed import (
    full_model_state,
    full_optimizer_state,
    gather_to_all,
    load_full_model_state,
    load_full_optimizer_state,
)
from simone.train.early_stopping import EarlyStopping
from simone.train.optim import TrainingOptimizer, new_optimizer
from simone.train.schedule import LRSchedule

TRAIN_STATE_SCHEMA = 1
# the TrainState fields a checkpoint holds as they are (its parts go as their state_dicts)
SAVED_FIELDS = ("step", "epochs_done", "tokens_seen", "lr_scale", "rollbacks", "last_val_loss", "best_checkpoint")
COUNTERS = ("loss_sum", "loss_count", "bad_since_log", "consecutive_bad")
RunContext = Any  # the Trainer, read only: cfg, run, env, device, faults, metrics, total_steps, ...


def zero_counters(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The COUNTERS at zero: the loss sum in float32, the step counts in int64."""
    loss_count, bad_since_log, consecutive_bad = (torch.zeros((), dtype=torch.int64, device=device) for _ in range(3))
    return torch.zeros((), dtype=torch.float32, device=device), loss_count, bad_since_log, consecutive_bad


@dataclass
class TrainState:
    """What a run has done and where it is. A checkpoint holds the parts (as their state_dicts),
    the interval counters and SAVED_FIELDS; the rest is this session's."""

    model: LanguageModel  # unwrapped: the wrapped one (DDP, FSDP2, compile) shares its parameters
    optimizer: TrainingOptimizer  # replaced by a rollback to the initial weights
    scaler: torch.amp.GradScaler | None  # fp16 only
    loader: BatchLoader  # its position in the shuffled windows
    schedule: LRSchedule  # the plan of a time-capped run
    early: EarlyStopping  # the best validation loss and the patience used up
    # device-side sums of the current logging interval, read at logging steps only (no per-step sync)
    loss_sum: torch.Tensor
    loss_count: torch.Tensor
    bad_since_log: torch.Tensor  # non-finite steps since the last log
    consecutive_bad: torch.Tensor  # non-finite steps in a row: a rollback at train.max_bad_steps
    step: int = 0  # optimizer steps done
    epochs_done: int = 0
    tokens_seen: int = 0
    lr_scale: float = 1.0  # each rollback multiplies it by train.rollback_lr_factor
    rollbacks: int = 0
    last_val_loss: float | None = None
    best_checkpoint: str | None = None
    last_checkpoint: str | None = None  # restored as the name of the checkpoint itself
    last_eval_step: int = -1  # the steps last evaluated and saved: a restored step counts as both
    last_saved_step: int = -1

    @property
    def epoch(self) -> float:
        """Epochs done, with the fraction of the current one."""
        return self.epochs_done + (0.0 if self.loader.epoch_done else self.loader.epoch_progress)


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's RNG states (torch, numpy, python; CUDA on a GPU) as checkpointable values."""
    np_state = np.random.get_state(legacy=False)
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "cached_gaussian": float(np_state["gauss"]),
        },
        "python": random.getstate(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Put back what `rng_state` captured."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_train_checkpoint(state: TrainState, ctx: RunContext, best: bool = False) -> Path | None:
    """Checkpoint `state`: every rank hands over its RNGs and (under FSDP) its shards, rank 0
    writes the checkpoint and gets its path; the other ranks get None."""
    s = state
    rng_per_rank = gather_to_all(rng_state(ctx.device), ctx.env)
    # unsharded on rank 0 whatever the layout (collectives under FSDP), so any process count can resume it
    model_state, optimizer_state = full_model_state(s.model), full_optimizer_state(s.model, s.optimizer)
    if not ctx.env.is_main:
        return None
    train_state = {
        "schema": TRAIN_STATE_SCHEMA,
        **{name: getattr(s, name) for name in SAVED_FIELDS},
        # the layout it was saved with, for the record: any layout resumes it
        "total_steps": ctx.total_steps,
        "steps_per_epoch": ctx.steps_per_epoch,
        "world_size": ctx.env.world_size,
        "grad_accum": ctx.grad_accum,
        "schedule": s.schedule.state_dict(),
        "optimizer": optimizer_state,
        "scaler": s.scaler.state_dict() if s.scaler is not None else None,
        "loader": s.loader.state_dict(),
        "early_stopping": s.early.state_dict(),
        "rng": rng_per_rank,  # one entry per rank: each has its own dropout stream
        "counters": {name: getattr(s, name) for name in COUNTERS},
    }
    return save_checkpoint(
        ctx.run.checkpoints,
        s.step,
        model_state,
        train_state,
        ctx.cfg.to_dict(),
        best=best,
        keep=ctx.cfg.train.keep_checkpoints,
        faults=ctx.faults,
        log=ctx.metrics.log,
        tokenizer=ctx.run.tokenizer,
    )


def start_or_resume(state: TrainState, ctx: RunContext, resume: str | None) -> None:
    """Start fresh (`resume` None) or continue from `resume` ("latest", "best" or a checkpoint
    directory); "latest" with no checkpoint yet starts fresh."""
    if resume is None:
        if list_checkpoints(ctx.run.checkpoints):
            ctx.metrics.log(
                f"{ctx.run.checkpoints}: starting fresh; existing checkpoints will be replaced "
                f"(pass --resume latest to continue them)"
            )
        if ctx.cfg.train.init_from:
            start_from_parent(state, ctx)
        n_params = state.model.num_params()
        ctx.metrics.event(
            "start",
            state.step,
            f"training {n_params / 1e6:.2f}M parameters for up to {ctx.total_steps} steps on {ctx.device}",
            total_steps=ctx.total_steps,
            steps_per_epoch=ctx.steps_per_epoch,
            tokens_per_step=ctx.tokens_per_step,
            params=n_params,
            device=str(ctx.device),
            world_size=ctx.env.world_size,
        )
        return
    which = resume if resume in ("latest", "best") else None
    target = ctx.run.root if which else Path(resume)
    try:
        ckpt = resolve_checkpoint(
            target, which or "latest", on_problem=lambda m: ctx.metrics.event("checkpoint_corrupt", state.step, m)
        )
    except CheckpointError as e:
        if which == "latest" and not list_checkpoints(ctx.run.checkpoints):
            ctx.metrics.log(f"{ctx.run.checkpoints}: no checkpoint to resume from; starting fresh")
            if ctx.cfg.train.init_from:
                start_from_parent(state, ctx)
            ctx.metrics.event("start", 0, "no checkpoint to resume from; starting fresh", total_steps=ctx.total_steps)
            return
        raise e
    restore_train_state(state, ctx, ckpt)
    ctx.metrics.event("resume", state.step, f"resumed from {ckpt}", path=str(ckpt), total_steps=ctx.total_steps)


def parent_record(parent: LoadedModel) -> dict[str, Any]:
    """The lineage entry of a model a run starts from: its name, the sha256 `of` its package file
    (or of its checkpoint's weights), the path its weights are read from, and its own parent."""
    if parent.unpacked is not None:
        path, of = parent.source.resolve(), "package"
        name = path.name.removesuffix(".tar.gz").removesuffix(".tgz")
    else:
        path, of = parent.files["checkpoint"].resolve(), "weights"
        name = f"{path.parent.parent.name}/{path.name}" if path.parent.name == "checkpoints" else path.name
    sha256 = sha256_file(path if of == "package" else parent.weights)
    return {"name": name, "sha256": sha256, "of": of, "path": str(path), "parent": parent.config.train.parent}


def start_from_parent(state: TrainState, ctx: RunContext) -> None:
    """Load the parent's weights (`train.init_from`) into `state.model`: the parent the run's lineage
    names (the same sha256), sharing the run's tokenizer; the optimizer and schedule stay fresh."""
    tc = ctx.cfg.train
    # building the parent's model draws from the RNG: forked, so the run's seeded streams stay as they were
    with torch.random.fork_rng(devices=[]), load_model(Path(str(tc.init_from)), device="cpu") as parent:
        record = parent_record(parent)
        recorded = (tc.parent or {}).get("sha256", record["sha256"])
        if record["sha256"] != recorded:
            raise CheckpointError(
                f"{tc.init_from}: sha256 {record['sha256'][:16]}…, but {ctx.run.config} records the parent "
                f"{recorded[:16]}… (train.parent): the parent changed since this run began"
            )
        if sha256_file(parent.files["tokenizer"]) != sha256_file(ctx.run.tokenizer):
            raise CheckpointError(
                f"{ctx.run.tokenizer}: not the tokenizer of {tc.init_from}, whose weights it would decode"
            )
        weights = parent.model.state_dict()
        check_state_fits(state.model, weights, str(parent.weights))
        load_full_model_state(state.model, weights)
    ctx.metrics.event(
        "init_from",
        state.step,
        f"starting from the weights of {record['name']} (sha256 {record['sha256'][:12]}…)",
        parent=record["name"],
        sha256=record["sha256"],
    )


def restore_train_state(state: TrainState, ctx: RunContext, ckpt: Path) -> None:
    """Load a verified checkpoint into `state`: weights, optimizer, loader, RNGs and counters."""
    s, env = state, ctx.env
    if env.is_main and ctx.run.tokenizer.exists():
        check_tokenizer(ckpt, ctx.run.tokenizer)  # never continue with another tokenizer
    model_state, saved, _ = load_checkpoint(ckpt, verify=False)  # resolve_checkpoint verified it
    check_state_fits(s.model, model_state, str(ckpt / WEIGHTS))
    load_full_model_state(s.model, model_state)
    load_full_optimizer_state(s.model, s.optimizer, saved["optimizer"])
    if s.scaler is not None and saved.get("scaler"):
        s.scaler.load_state_dict(saved["scaler"])
    s.loader.load_state_dict(saved["loader"])
    s.early.load_state_dict(saved["early_stopping"])
    saved_world = len(saved["rng"])
    if saved_world == env.world_size:
        set_rng_state(saved["rng"][env.rank], ctx.device)
    else:
        # Another process count: weights, optimizer, schedule and data position carry over
        # (the loader converts its position between global batch sizes), but the dropout
        # streams cannot: fresh, still seeded ones. With dropout the losses then match the
        # uninterrupted run only approximately (float summation order differs too).
        torch.manual_seed(ctx.cfg.train.seed + env.rank + saved["step"])
        ctx.metrics.log(
            f"{ckpt}: saved by {saved_world} process(es), resumed on {env.world_size}: "
            f"same weights, optimizer, schedule and data position; new dropout streams"
        )
    for name in SAVED_FIELDS:
        setattr(s, name, saved.get(name))  # the last two came later: None in older checkpoints
    s.schedule.load_state_dict(saved.get("schedule"), steps_done=s.step)
    for name in COUNTERS:
        setattr(s, name, saved["counters"][name].to(ctx.device))
    s.last_checkpoint = ckpt.name
    s.last_saved_step = s.last_eval_step = s.step


def roll_back(state: TrainState, ctx: RunContext, consecutive: int) -> None:
    """After `consecutive` non-finite steps: back to the last good checkpoint (or, with none
    yet, step 0: the seeded initial weights, the loader at its start, a new optimizer, a fresh
    schedule and early stopping) with the learning rate times `train.rollback_lr_factor`.
    The trainer checks `train.max_rollbacks` first."""
    s, tc = state, ctx.cfg.train
    rollbacks, lr_scale = s.rollbacks + 1, s.lr_scale * tc.rollback_lr_factor
    bad_step = s.step
    try:
        ckpt = resolve_checkpoint(
            ctx.run.root, "latest", on_problem=lambda m: ctx.metrics.event("checkpoint_corrupt", s.step, m)
        )
    except CheckpointError:
        ckpt = None
    if ckpt is not None:
        restore_train_state(s, ctx, ckpt)
        target = ckpt.name
    else:
        torch.manual_seed(tc.seed)
        if tc.init_from:  # a continued run's initial weights are its parent's
            start_from_parent(s, ctx)
        else:
            load_full_model_state(s.model, build_model(ctx.cfg.model).state_dict())
        s.loader.load_state_dict({"epoch": 0, "position": 0})
        torch.manual_seed(tc.seed + ctx.env.rank)
        s.step = s.epochs_done = s.tokens_seen = 0
        s.schedule.reset()
        s.early = EarlyStopping(tc.min_epochs, tc.num_epochs, tc.patience)
        s.optimizer = new_optimizer(s.model, tc, ctx.device)
        s.loss_sum, s.loss_count, s.bad_since_log, s.consecutive_bad = zero_counters(ctx.device)
        target = "the initial weights (no checkpoint yet)"
    s.rollbacks, s.lr_scale = rollbacks, lr_scale
    ctx.metrics.event(
        "rollback",
        s.step,
        f"{consecutive} consecutive non-finite steps up to step {bad_step}: rolled back to "
        f"{target}, learning rate x{lr_scale:g} (rollback {rollbacks}/{tc.max_rollbacks})",
        rollbacks=rollbacks,
        lr_scale=lr_scale,
        from_step=bad_step,
    )
