"""Process layout: one process, or several launched by `torchrun`.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK. With WORLD_SIZE > 1 the trainer joins a process
group (`nccl` on CUDA, `gloo` on CPU), wraps the model in DistributedDataParallel, gives each
rank its own slice of the data, and lets only rank 0 write anything to the run directory.
The model itself knows nothing about this.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist


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
    """`auto` picks CUDA (this rank's GPU), then MPS, then CPU."""
    if preference == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", env.local_rank % torch.cuda.device_count())
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(preference)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"train.device={preference!r} but CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", env.local_rank % torch.cuda.device_count())
    return device


def init_distributed(env: DistEnv, device: torch.device) -> None:
    """Join the process group when there is more than one process (no-op otherwise)."""
    if not env.distributed or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


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
