"""Process layout: one process, or several launched by `torchrun`.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK. With WORLD_SIZE > 1 the trainer joins a process
group (`nccl` on CUDA, `gloo` on CPU), wraps the model (`wrap_model`), gives each rank its own
slice of the data, and lets only rank 0 write anything to the run directory. The model itself
knows nothing about this.

Two ways to spread the model (`train.parallel`):
- "ddp": DistributedDataParallel, a full replica per process, gradients all-reduced.
- "fsdp": FSDP2 (`torch.distributed.fsdp.fully_shard`) on every transformer block and the
  root: parameters, gradients and optimizer moments are sharded over the processes and
  gathered block by block when used. Works with gloo on a CPU too (torch 2.13).

Checkpoints stay one format whatever the layout: `full_model_state` / `full_optimizer_state`
gather plain (unsharded) tensors on rank 0, keyed like a single process's `state_dict()`, and
`load_full_model_state` / `load_full_optimizer_state` put them back into any layout, so a run
saved by N processes resumes on M.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from simone.devices import pick_device
from simone.errors import SimoneError
from simone.model import LanguageModel
from simone.model.governance_heads import uses_policy
from simone.train.optim import MuonWithAdamW, TrainingOptimizer

# torch.distributed.fsdp and .checkpoint take about half a second each to import: imported where used
if TYPE_CHECKING:
    from torch.distributed.fsdp import FSDPModule

PARALLEL_MODES = ("ddp", "fsdp")


class DistributedConfigError(SimoneError, ValueError):
    """A batch layout or parallel mode that this process count cannot honour."""


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def dist_env_from_environ() -> DistEnv:
    return DistEnv(
        rank=int(os.environ.get("RANK", "0")),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
    )


def resolve_device(preference: str, env: DistEnv) -> torch.device:
    """The training device: `pick_device`'s meaning of the name (with "auto" and a bare
    "cuda" this rank's GPU), refusing a CUDA device this machine does not have."""
    if preference != "auto" and torch.device(preference).type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={preference!r} but CUDA is not available on this machine")
    return pick_device(preference, env.local_rank)


def init_distributed(env: DistEnv, device: torch.device, timeout_s: float | None = None) -> None:
    """Join the process group when there is more than one process (no-op otherwise).
    `timeout_s`: how long a collective may wait for the slowest rank (None: torch's default)."""
    if not env.distributed or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend="nccl" if device.type == "cuda" else "gloo",
        timeout=None if timeout_s is None else timedelta(seconds=timeout_s),
    )


def shutdown_distributed(env: DistEnv) -> None:
    """Leave the process group. Call on every rank after the last collective."""
    if env.distributed and dist.is_initialized():
        # gloo's worker thread releases the last collective's tensors after the caller has
        # returned, and needs the GIL for it; tearing the group down (which joins that thread
        # while holding the GIL) right away can deadlock (seen with torch 2.13 + gloo). A short
        # sleep releases the GIL and lets the worker go idle first.
        time.sleep(0.2)
        dist.destroy_process_group()


def all_reduce_mean(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.distributed:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= env.world_size
    return t


def any_rank(flag: bool, env: DistEnv, device: torch.device) -> bool:
    """True if `flag` is true on any rank (a collective: call it on every rank together)."""
    if not env.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def min_over_ranks(x: float, env: DistEnv, device: torch.device) -> float:
    """The smallest of every rank's `x` (a collective: call it on every rank together)."""
    if not env.distributed:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return float(t.item())


def gather_to_all(obj: object, env: DistEnv) -> list:
    """`[obj of rank 0, obj of rank 1, ...]` on every rank (a collective)."""
    if not env.distributed:
        return [obj]
    out: list = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj: Any, env: DistEnv) -> Any:
    """Rank 0's `obj` on every rank (a collective; `obj` is ignored on the other ranks)."""
    if not env.distributed:
        return obj
    box = [obj if env.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ----------------------------------------------------------------------------- batch layout


def split_batch(batch_size: int, grad_accum: int, world_size: int) -> tuple[int, int]:
    """(micro-batch per process, accumulation steps) that keep the effective batch
    `batch_size * grad_accum` sequences per optimizer step on `world_size` processes.

    The accumulation is divided first (2 processes x 2 micro-batches of 12 = 1 x 4 x 12);
    what the accumulation cannot absorb comes out of the micro-batch (accumulation 1, batch 8
    on 2 processes: 4 sequences each). Raises DistributedConfigError when neither divides.
    """
    if world_size < 1 or batch_size < 1 or grad_accum < 1:
        raise DistributedConfigError("batch_size, grad_accum and the process count must be >= 1")
    share = math.gcd(grad_accum, world_size)
    rest = world_size // share  # processes left to spread over the micro-batch
    if batch_size % rest:
        effective = batch_size * grad_accum
        raise DistributedConfigError(
            f"train.batch_size={batch_size} x train.grad_accum={grad_accum} = {effective} sequences per step "
            f"cannot be split evenly over {world_size} processes; make train.grad_accum a multiple of "
            f"{world_size} (e.g. --set train.grad_accum={grad_accum * world_size // share} "
            f"--set train.batch_size={max(1, batch_size // rest)}) or use another process count"
        )
    return batch_size // rest, grad_accum // share


# ----------------------------------------------------------------------------- model layout


def check_parallel(mode: str) -> str:
    if mode not in PARALLEL_MODES:
        raise DistributedConfigError(f"train.parallel={mode!r}: choose one of {', '.join(PARALLEL_MODES)}")
    return mode


def wrap_model(model: torch.nn.Module, env: DistEnv, device: torch.device, mode: str) -> torch.nn.Module:
    """The module the training step calls: DDP around `model`, or `model` itself sharded in
    place by FSDP2 (one unit per transformer block, then the root for the embeddings and the
    output). Create the optimizer after this: FSDP2 swaps the parameters for sharded ones."""
    check_parallel(mode)
    if not env.distributed:
        return model
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard  # noqa: PLC0415  # deferred: slow, sharded runs only

        # parallelize.py shards the unwrapped model: a LanguageModel, whose blocks are its units
        for block in cast(LanguageModel, model).layers:
            fully_shard(block)
        fully_shard(model)
        return model
    return DDP(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=has_unreached_parameters(getattr(model, "cfg", None)),
    )


def has_unreached_parameters(cfg: Any) -> bool:
    """True when some parameters get no gradient from the training loss: a policy head whose
    loss weights are both 0 (it then only reads along). DDP must be told, or it waits for
    their gradients forever; finding them costs a graph walk per step, so only then."""
    return bool(cfg is not None and uses_policy(cfg) and cfg.policy_loss_weight == 0 and cfg.coherence_weight == 0)


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule  # noqa: PLC0415  # deferred: slow, sharded runs only

    return isinstance(model, FSDPModule)


def gradient_sync(model: torch.nn.Module, raw_model: torch.nn.Module, sync: bool, env: DistEnv):
    """Context for one micro-batch's backward: gradients are reduced across processes only
    when `sync` (the last micro-batch of a step); the others accumulate locally."""
    if is_sharded(raw_model):
        cast("FSDPModule", raw_model).set_requires_gradient_sync(not env.distributed or sync)
        return contextlib.nullcontext()
    return contextlib.nullcontext() if not env.distributed or sync else cast(DDP, model).no_sync()  # unsharded: DDP


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a replicated DTensor (e.g. FSDP2's total gradient norm)."""
    full = getattr(t, "full_tensor", None)
    return full() if full is not None else t


def _tied_names(model: torch.nn.Module) -> dict[str, str]:
    """{alias: first name} for parameters registered under two names (tied embeddings)."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def full_model_state(model: torch.nn.Module) -> dict[str, Any]:
    """The unsharded weights, like a single process's `state_dict()`. Under FSDP2 a
    collective (call on every rank) that leaves the tensors on rank 0's CPU and returns {}
    elsewhere; tied parameters come back as one tensor so the checkpoint stores them once."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # noqa: PLC0415  # deferred: slow, sharded runs only

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    for alias, name in _tied_names(model).items():
        if alias in state and name in state:
            state[alias] = state[name]
    return state


def load_full_model_state(model: torch.nn.Module, state: dict[str, Any]) -> None:
    """Load unsharded weights (every rank holds them) into `model`, sharded or not."""
    if not is_sharded(model):
        model.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict  # noqa: PLC0415  # deferred: slow, sharded runs only

    # Each tensor is scattered in the order of the dict, so every rank must use the same order:
    # the model's own (safetensors returns its tensors in an order that differs per process).
    ordered = {k: state[k] for k in model.state_dict() if k in state}
    ordered.update({k: v for k, v in state.items() if k not in ordered})  # strict loading reports extras
    set_model_state_dict(model, ordered, options=StateDictOptions(full_state_dict=True))


def _param_names(model: torch.nn.Module, optimizer: TrainingOptimizer) -> list[list[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]


def full_optimizer_state(model: torch.nn.Module, optimizer: TrainingOptimizer) -> dict[str, Any]:
    """The optimizer state as a single process's `optimizer.state_dict()` has it (parameters
    numbered in parameter-group order). Under FSDP2 a collective: the unsharded moments on
    rank 0's CPU, {} elsewhere. (Muon + AdamW never runs sharded: `build_optimizer` refuses it.)"""
    if not is_sharded(model) or isinstance(optimizer, MuonWithAdamW):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict  # noqa: PLC0415  # deferred: slow, sharded runs only

    by_name: dict[str, Any] = get_optimizer_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if not by_name:
        return {}
    number = {n: i for i, n in enumerate(n for group in _param_names(model, optimizer) for n in group)}
    groups = [{**g, "params": [number[n] for n in g["params"]]} for g in by_name["param_groups"]]
    return {"state": {number[n]: v for n, v in by_name["state"].items()}, "param_groups": groups}


def load_full_optimizer_state(model: torch.nn.Module, optimizer: TrainingOptimizer, state: dict[str, Any]) -> None:
    """Load a state saved by `full_optimizer_state` (any process count, any layout)."""
    if not is_sharded(model) or isinstance(optimizer, MuonWithAdamW):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict  # noqa: PLC0415  # deferred: slow, sharded runs only

    names = [n for group in _param_names(model, optimizer) for n in group]
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]
    by_name: dict[str, Any] = {"state": {names[i]: v for i, v in state["state"].items()}, "param_groups": groups}
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
