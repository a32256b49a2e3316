"""What a checkpoint carries besides the weights, and putting it back: the train-state dict
(step, schedule, optimizer, loader position, early stopping, the loss counters of the current
logging interval) and the torch / numpy / python RNG states of every rank.

Exact resume depends on this file: everything the next step reads must be saved here and
restored by `restore_train_state`, or the resumed run's losses drift from the uninterrupted one.
The functions take the `Trainer` (simone/train/trainer.py) whose fields they read and set.
"""

from __future__ import annotations

import random
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
from simone.model import build_model
from simone.train.distributed import (
    full_model_state,
    full_optimizer_state,
    gather_to_all,
    load_full_model_state,
    load_full_optimizer_state,
)
from simone.train.early_stopping import EarlyStopping
from simone.train.optim import new_optimizer

TRAIN_STATE_SCHEMA = 1


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's RNG states (torch, numpy, python; CUDA on a GPU) as checkpointable values."""
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
    """Put back what `rng_state` captured."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def zero_interval_counters(trainer: Any) -> None:
    """Device-side sums of the current logging interval (read only at logging steps)."""
    z = lambda dtype: torch.zeros((), dtype=dtype, device=trainer.device)  # noqa: E731
    trainer.loss_sum = z(torch.float32)
    trainer.loss_count = z(torch.int64)
    trainer.bad_since_log = z(torch.int64)
    trainer.consecutive_bad = z(torch.int64)


def train_state_dict(trainer: Any, rng_per_rank: list[dict[str, Any]],
                     optimizer_state: dict[str, Any]) -> dict[str, Any]:
    """The train state a checkpoint of `trainer` holds (its `train_state` entry)."""
    t = trainer
    return {
        "schema": TRAIN_STATE_SCHEMA,
        "step": t.step,
        "epochs_done": t.epochs_done,
        "tokens_seen": t.tokens_seen,
        "lr_scale": t.lr_scale,
        "rollbacks": t.rollbacks,
        "total_steps": t.total_steps,
        "schedule": t.schedule.state_dict(),  # the plan of a time-capped run
        "steps_per_epoch": t.steps_per_epoch,
        "world_size": t.env.world_size,
        "grad_accum": t.grad_accum,
        "optimizer": optimizer_state,
        "scaler": t.scaler.state_dict() if t.scaler is not None else None,
        "loader": t.loader.state_dict(),
        "early_stopping": t.early.state_dict(),
        "rng": rng_per_rank,  # one entry per rank: each has its own dropout stream
        "counters": {"loss_sum": t.loss_sum, "loss_count": t.loss_count,
                     "bad_since_log": t.bad_since_log, "consecutive_bad": t.consecutive_bad},
        "last_val_loss": t.last_val_loss,
        "best_checkpoint": t.best_checkpoint,
    }


def save_train_checkpoint(trainer: Any, best: bool = False) -> Path | None:
    """Checkpoint `trainer`: every rank hands over its RNGs and (under FSDP) its shards, rank 0
    writes the checkpoint and gets its path; the other ranks get None."""
    t = trainer
    rng_per_rank = gather_to_all(rng_state(t.device), t.env)
    # unsharded on rank 0 whatever the layout (collectives under FSDP), so any process
    # count can resume it
    model_state = full_model_state(t.raw_model)
    optimizer_state = full_optimizer_state(t.raw_model, t.optimizer)
    if not t.env.is_main:
        return None
    return save_checkpoint(t.run.checkpoints, t.step, model_state,
                           train_state_dict(t, rng_per_rank, optimizer_state), t.cfg.to_dict(),
                           best=best, keep=t.cfg.train.keep_checkpoints, faults=t.faults,
                           log=t.metrics.log, tokenizer=t.run.tokenizer)


def resume_train_state(trainer: Any, resume: str) -> None:
    """Continue from `resume` ("latest", "best" or a checkpoint directory); "latest" with no
    checkpoint yet starts fresh."""
    t = trainer
    which = resume if resume in ("latest", "best") else None
    target = t.run.root if which else Path(resume)
    try:
        ckpt = resolve_checkpoint(target, which or "latest", on_problem=t.report_bad_checkpoint)
    except CheckpointError as e:
        if which == "latest" and not list_checkpoints(t.run.checkpoints):
            t.metrics.log(f"{t.run.checkpoints}: no checkpoint to resume from; starting fresh")
            t.metrics.event("start", 0, "no checkpoint to resume from; starting fresh",
                            total_steps=t.total_steps)
            return
        raise e
    t.restore(ckpt)
    t.metrics.event("resume", t.step, f"resumed from {ckpt}", path=str(ckpt), total_steps=t.total_steps)


def restore_train_state(trainer: Any, ckpt: Path) -> None:
    """Load a verified checkpoint into `trainer`'s model, optimizer, loader, RNGs and counters."""
    t = trainer
    if t.env.is_main and t.run.tokenizer.exists():
        check_tokenizer(ckpt, t.run.tokenizer)  # never continue with another tokenizer
    model_state, state, _ = load_checkpoint(ckpt, verify=False)  # resolve_checkpoint verified it
    check_state_fits(t.raw_model, model_state, str(ckpt / WEIGHTS))
    load_full_model_state(t.raw_model, model_state)
    load_full_optimizer_state(t.raw_model, t.optimizer, state["optimizer"])
    if t.scaler is not None and state.get("scaler"):
        t.scaler.load_state_dict(state["scaler"])
    t.loader.load_state_dict(state["loader"])
    t.early.load_state_dict(state["early_stopping"])
    saved_world = len(state["rng"])
    if saved_world == t.env.world_size:
        set_rng_state(state["rng"][t.env.rank], t.device)
    else:
        # Another process count: weights, optimizer, schedule and data position carry over
        # (the loader converts its position between global batch sizes), but the dropout
        # streams cannot: fresh, still seeded ones. With dropout the losses then match the
        # uninterrupted run only approximately (float summation order differs too).
        torch.manual_seed(t.cfg.train.seed + t.env.rank + state["step"])
        t.metrics.log(f"{ckpt}: saved by {saved_world} process(es), resumed on {t.env.world_size}: "
                      f"same weights, optimizer, schedule and data position; new dropout streams")
    t.step = int(state["step"])
    t.epochs_done = int(state["epochs_done"])
    t.tokens_seen = int(state["tokens_seen"])
    t.lr_scale = float(state["lr_scale"])
    t.rollbacks = int(state["rollbacks"])
    t.schedule.load_state_dict(state.get("schedule"), steps_done=t.step)
    counters = state["counters"]
    t.loss_sum = counters["loss_sum"].to(t.device)
    t.loss_count = counters["loss_count"].to(t.device)
    t.bad_since_log = counters["bad_since_log"].to(t.device)
    t.consecutive_bad = counters["consecutive_bad"].to(t.device)
    t.last_val_loss = state.get("last_val_loss")
    t.best_checkpoint = state.get("best_checkpoint")
    t.last_checkpoint = ckpt.name


def reset_train_state(trainer: Any) -> None:
    """Back to step 0 (a rollback with no checkpoint yet): the seeded initial weights, the
    loader at its start, a fresh schedule and early stopping (`roll_back` builds a new optimizer
    and zeroes the interval counters)."""
    t, tc = trainer, trainer.cfg.train
    torch.manual_seed(tc.seed)
    load_full_model_state(t.raw_model, build_model(t.cfg.model).state_dict())
    t.loader.load_state_dict({"epoch": 0, "position": 0})
    torch.manual_seed(tc.seed + t.env.rank)
    t.step = t.epochs_done = t.tokens_seen = 0
    t.schedule.reset()
    t.early = EarlyStopping(tc.min_epochs, tc.num_epochs, tc.patience)


def roll_back(trainer: Any, consecutive: int) -> None:
    """After `consecutive` non-finite steps: back to the last good checkpoint (or, with none
    yet, the seeded initial weights) with the learning rate times `train.rollback_lr_factor`.
    The trainer checks `train.max_rollbacks` first."""
    t, tc = trainer, trainer.cfg.train
    rollbacks, lr_scale = t.rollbacks + 1, t.lr_scale * tc.rollback_lr_factor
    bad_step = t.step
    try:
        ckpt = resolve_checkpoint(t.run.root, "latest", on_problem=t.report_bad_checkpoint)
    except CheckpointError:
        ckpt = None
    if ckpt is not None:
        t.restore(ckpt)
        target = ckpt.name
    else:
        reset_train_state(t)  # back to step 0: the seeded initial weights, the loader at its start
        t.optimizer = new_optimizer(t.raw_model, tc, t.device)
        zero_interval_counters(t)
        target = "the initial weights (no checkpoint yet)"
    t.rollbacks, t.lr_scale = rollbacks, lr_scale
    t.metrics.event("rollback", t.step,
                    f"{consecutive} consecutive non-finite steps up to step {bad_step}: rolled back to "
                    f"{target}, learning rate x{lr_scale:g} (rollback {rollbacks}/{tc.max_rollbacks})",
                    rollbacks=rollbacks, lr_scale=lr_scale, from_step=bad_step)
