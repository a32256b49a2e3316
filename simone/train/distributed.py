"""Process layout: one process, or several launched by `torchrun`.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK. With WORLD_SIZE > 1 the trainer joins a process
group (`nccl` on CUDA, `gloo` on CPU), wraps the model in DistributedDataParallel, gives each
rank its own slice of the data, and lets only rank 0 write anything to the run directory.
The model itself knows nothing about this.
"""

from __future__ import annotations

import os
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
    if env.distributed and dist.is_initialized():
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


def barrier(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.barrier()
