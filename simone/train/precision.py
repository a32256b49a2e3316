"""Numeric precision for training: the autocast dtype, the fp16 grad scaler, and whether
`torch.compile` can run here (it needs a C++ compiler)."""

from __future__ import annotations

import contextlib
import os
import shutil

import torch


def allow_tf32(device: torch.device) -> None:
    """On a GPU, let float32 matmuls and convolutions use TF32 tensor cores (a 10-bit mantissa
    is plenty for training; the weights stay float32)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


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


def autocast(dtype: torch.dtype | None, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast to `dtype` on `device`, or nothing when `dtype` is None (float32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(dtype: torch.dtype | None, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16 on CUDA needs a loss scaler (its range is narrow); bf16 and float32 do not."""
    if dtype is torch.float16 and device.type == "cuda":
        return torch.amp.GradScaler("cuda")
    return None


def compiler_missing() -> str | None:
    """Why torch.compile cannot run here, or None. Inductor builds its CPU kernels, and
    Triton its GPU kernel launchers, with the system's C/C++ compiler; without one the first
    step would fail, so the trainer runs eager instead."""
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return None
    return "no C++ compiler (g++, c++, clang++ or $CXX) is on PATH"
