"""Which torch device a name means: one meaning of "auto" for training, inference, the
benchmarks and the time estimates (model-free, so any layer can use it)."""

from __future__ import annotations

import platform
from pathlib import Path

import torch


def mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return mps is not None and mps.is_available()


def pick_device(name: str = "auto", local_rank: int | None = None) -> torch.device:
    """The device `name` means ("auto", "cpu", "cuda", "cuda:N", "mps").

    "auto": CUDA when a GPU is visible, else Apple MPS, else the CPU. With `local_rank`
    (a distributed run), "auto" and a bare "cuda" mean this rank's GPU. Availability of an
    explicitly named device is the caller's to check: each says what to do instead.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return _rank_gpu(local_rank)
        if mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return _rank_gpu(local_rank)
    return device


def _rank_gpu(local_rank: int | None) -> torch.device:
    if local_rank is None:
        return torch.device("cuda")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def _cpuinfo(field: str) -> str | None:
    """The first value of `field` in /proc/cpuinfo ("model name", "vendor_id"); None where it is not there."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.lower().startswith(field) and ":" in line:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_vendor() -> str:
    """The CPU's vendor ("AuthenticAMD", "GenuineIntel", ...; "" where /proc/cpuinfo does not say)."""
    return _cpuinfo("vendor_id") or ""


def cpu_model() -> str:
    """The CPU's model name ("AMD EPYC 7B13", "Intel(R) Xeon(R) ..."): every benchmark figure is
    reported beside it, because CPUs here differ by 2x (with or without AMX / bf16 units)."""
    return _cpuinfo("model name") or platform.processor() or platform.machine() or "unknown"
