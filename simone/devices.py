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


def cpu_vendor() -> str:
    """The CPU's vendor ("AuthenticAMD", "GenuineIntel", ...; "" where /proc/cpuinfo does not say)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.lower().startswith("vendor_id") and ":" in line:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_model() -> str:
    """The CPU's model name ("AMD EPYC 7B13", "Intel(R) Xeon(R) ..."): every benchmark figure is
    reported beside it, because CPUs here differ by 2x (with or without AMX / bf16 units)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.lower().startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"
