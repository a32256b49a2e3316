"""The machine's vital signs for `kind=system` rows of metrics.jsonl.

CPU, RAM, the trainer's own memory and free disk come from `psutil`; GPU utilisation,
memory, temperature and power from NVIDIA's NVML (`nvidia-ml-py`). NVML is optional: with
no NVIDIA GPU or driver the `gpus` list is empty, never an error.

The trainer keeps one `SystemSampler` for the whole run (NVML is initialised once, and
CPU percentages are measured between two calls) and appends, every
`train.system_stats_every_s` seconds:

    append_jsonl(run.metrics, {"t": time.time(), "kind": "system", **sampler.snapshot()})
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import psutil

GB = 1024**3


def _nvml() -> Any | None:
    """The initialised `pynvml` module, or None when NVML is unavailable."""
    try:
        import pynvml  # noqa: PLC0415  # deferred: optional; only machines with NVIDIA GPUs have NVML

        pynvml.nvmlInit()
    except Exception:
        return None
    return pynvml


class SystemSampler:
    """Samples system and GPU stats; create once, call `snapshot()` every few seconds."""

    def __init__(self, disk_path: str | Path = ".", gpus: bool = True):
        self.disk_path = str(disk_path)
        self.process = psutil.Process(os.getpid())
        self.nvml = _nvml() if gpus else None
        self._handles: list[tuple[int, Any, str]] = []
        if self.nvml is not None:
            try:
                for i in range(self.nvml.nvmlDeviceGetCount()):
                    h = self.nvml.nvmlDeviceGetHandleByIndex(i)
                    name = self.nvml.nvmlDeviceGetName(h)
                    self._handles.append((i, h, name.decode() if isinstance(name, bytes) else str(name)))
            except Exception:
                self._handles = []
        psutil.cpu_percent(interval=None)  # prime: the first real value covers the interval since now

    def snapshot(self, cpu_interval: float | None = None) -> dict[str, Any]:
        """The `kind=system` row fields (without `t` and `kind`). CPU percent covers the time
        since the previous call, or blocks `cpu_interval` seconds to measure it."""
        vm = psutil.virtual_memory()
        try:
            rss = self.process.memory_info().rss
        except psutil.Error:
            rss = 0
        try:
            disk_free = psutil.disk_usage(self.disk_path).free
        except OSError:
            disk_free = None
        return {
            "cpu_percent": psutil.cpu_percent(interval=cpu_interval),
            "ram_used_gb": round((vm.total - vm.available) / GB, 3),
            "ram_total_gb": round(vm.total / GB, 3),
            "rss_gb": round(rss / GB, 3),
            "disk_free_gb": round(disk_free / GB, 3) if disk_free is not None else None,
            "gpus": [] if self.nvml is None else [_gpu(self.nvml, i, h, name) for i, h, name in self._handles],
        }

    def close(self) -> None:
        if self.nvml is not None:
            with contextlib.suppress(Exception):  # shutting NVML down is best effort
                self.nvml.nvmlShutdown()
            self.nvml = None
            self._handles = []

    def __enter__(self) -> SystemSampler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _gpu(nv: Any, index: int, handle: Any, name: str) -> dict[str, Any]:
    """The row of one GPU, through the `pynvml` module `nv`."""
    out: dict[str, Any] = {"index": index, "name": name}
    # each query on its own: some boards do not report power or temperature
    try:
        out["util"] = float(nv.nvmlDeviceGetUtilizationRates(handle).gpu)
    except Exception:
        out["util"] = None
    try:
        mem = nv.nvmlDeviceGetMemoryInfo(handle)
        out["mem_used_gb"] = round(mem.used / GB, 3)
        out["mem_total_gb"] = round(mem.total / GB, 3)
    except Exception:
        out["mem_used_gb"] = out["mem_total_gb"] = None
    try:
        out["temp_c"] = float(nv.nvmlDeviceGetTemperature(handle, nv.NVML_TEMPERATURE_GPU))
    except Exception:
        out["temp_c"] = None
    try:
        out["power_w"] = round(nv.nvmlDeviceGetPowerUsage(handle) / 1000.0, 1)
    except Exception:
        out["power_w"] = None
    return out


def system_snapshot(disk_path: str | Path = ".") -> dict[str, Any]:
    """One-off `kind=system` row fields. For repeated sampling keep a `SystemSampler`
    (this initialises NVML each call, and its CPU percentage covers no interval)."""
    with SystemSampler(disk_path) as sampler:
        return sampler.snapshot(cpu_interval=0.1)
