"""Where training numbers go: metrics.jsonl, TensorBoard, train.log and the terminal.

`MetricsLogger` writes one JSON object a line to `RUN/metrics.jsonl` (the format in
docs/ARCHITECTURE.md), mirrors scalars to TensorBoard under `RUN/tensorboard/`, and shows a
progress bar with an ETA when the terminal is interactive (plain log lines otherwise).
Only rank 0 constructs one with `enabled=True`; the others get a silent logger.

MFU (model FLOPs utilisation) = flops_per_token x tokens/s / peak FLOP/s of the device. GPU
peaks come from a table of dense bf16 numbers by device name; on a CPU the peak is measured
once per process with a short matmul probe in the training dtype.
"""

from __future__ import annotations

import functools
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm  # type: ignore[import-untyped]  # no stubs installed (types-tqdm)

from simone.rundir import RunDir, append_jsonl

# Dense (no sparsity) bf16 tensor-core peaks, FLOP/s, matched by substring of the device name,
# most specific first.
GPU_PEAK_FLOPS: list[tuple[str, float]] = [
    ("H200", 989e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("H800", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("A6000", 155e12),
    ("V100", 125e12),  # fp16
    ("T4", 65e12),  # fp16
]


def gpu_peak_flops(device_name: str) -> float | None:
    for key, peak in GPU_PEAK_FLOPS:
        if key.lower() in device_name.lower():
            return peak
    return None


@functools.cache
def cpu_peak_flops(dtype: torch.dtype = torch.float32, n: int = 1024, bursts: int = 8, burst_s: float = 0.015) -> float:
    """Measured matmul FLOP/s of this process's CPU threads in `dtype` (cached per process).

    The best of several short bursts, each timed by the shorter of its wall time and the
    CPU time this process got divided by its threads: another process sharing the cores (a
    test suite, a second run) stretches the wall time but not the CPU time, so it does not
    make the "peak" (MFU's denominator) too small; a probe timed by wall time alone under such
    load read a quarter of the idle peak and the runs it measured logged MFU over 400%.
    1024 x 1024 operands: on a 2-core AMD EPYC 512 x 512 read a third of what 1024 and the
    training step's own matmuls reach (the step's MFU read over 100%). Probe in the dtype
    training computes in: a bf16 run on a CPU with AMX measured against a float32 peak reads
    > 100%.
    """
    a = torch.randn(n, n, generator=torch.Generator().manual_seed(0)).to(dtype)
    b = torch.randn(n, n, generator=torch.Generator().manual_seed(1)).to(dtype)
    torch.mm(a, b)  # warm up
    threads = max(1, torch.get_num_threads())
    best, probe_start = 0.0, time.perf_counter()
    for burst in range(bursts):
        if burst >= 3 and time.perf_counter() - probe_start > 0.5:
            break  # slow matmuls (bf16 emulated without native units): three bursts will do
        reps, start, cpu_start = 0, time.perf_counter(), time.process_time()
        while True:
            torch.mm(a, b)
            reps += 1
            elapsed = time.perf_counter() - start
            if elapsed >= burst_s:
                break
        busy = (time.process_time() - cpu_start) / threads
        best = max(best, 2 * n**3 * reps / max(min(elapsed, busy), 1e-9))
    return best


def peak_flops(device: torch.device, dtype: torch.dtype | None = None) -> float | None:
    """Peak FLOP/s for MFU on `device` computing in `dtype` (None: float32); None where
    unknown (MFU is then not reported)."""
    if device.type == "cuda":
        return gpu_peak_flops(torch.cuda.get_device_name(device))
    if device.type == "cpu":
        return cpu_peak_flops(dtype or torch.float32)
    return None


def mfu(flops_per_token: float, tokens_per_s: float, peak: float | None) -> float | None:
    if not peak or tokens_per_s <= 0:
        return None
    return flops_per_token * tokens_per_s / peak


def train_rates(metrics_path: Path) -> list[float]:
    """The tokens/s of every logging interval in a run's metrics.jsonl (`MetricsLogger.train`
    rows), in order; the first holds compilation and warm-up."""
    rates = []
    if Path(metrics_path).exists():
        for line in Path(metrics_path).read_text(encoding="utf-8").splitlines():
            row = json.loads(line) if line.strip() else {}
            if row.get("kind") == "train" and row.get("tokens_per_s"):
                rates.append(float(row["tokens_per_s"]))
    return rates


class LossTermMeter:
    """Sums of `model.loss_terms` over a logging interval, kept on the device.

    `add(terms)` every micro-step (no sync); `read_and_reset()` at a logging step returns
    {name: mean} with one host transfer.
    """

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._count = 0

    def add(self, terms: dict[str, torch.Tensor] | None) -> None:
        if not terms:
            return
        for name, value in terms.items():
            value = value.detach().float()
            self._sums[name] = self._sums[name] + value if name in self._sums else value.clone()
        self._count += 1

    def read_and_reset(self) -> dict[str, float]:
        if not self._sums:
            return {}
        names = list(self._sums)
        values = torch.stack([self._sums[n] for n in names]).tolist()
        out = {n: v / self._count for n, v in zip(names, values)}
        self._sums, self._count = {}, 0
        return out


class MetricsLogger:
    """Append rows to metrics.jsonl / samples.jsonl / train.log; mirror to TensorBoard."""

    def __init__(
        self,
        run: RunDir,
        *,
        enabled: bool = True,
        tensorboard: bool = True,
        progress: bool | None = None,
        echo: bool = True,
    ):
        self.run = run
        self.enabled = enabled
        self.echo = echo and enabled
        self._lock = threading.Lock()  # the heartbeat thread writes system rows
        self._tb = None
        if enabled and tensorboard:
            try:  # deferred: TensorBoard is optional and slow to import
                from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415

                self._tb = SummaryWriter(log_dir=str(run.root / "tensorboard"))
            except Exception as e:
                self.log(f"TensorBoard disabled ({e})")
        interactive = sys.stderr.isatty() if progress is None else progress
        self._bar: tqdm | None = None
        self._show_bar = enabled and interactive

    # ---- rows
    def _append(self, path: Path, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self._lock:
            append_jsonl(path, row)

    def train(self, **row: Any) -> None:
        row = {"t": time.time(), "kind": "train", **row}
        self._append(self.run.metrics, row)
        self._scalars("train", row, ("loss", "lr", "grad_norm", "tokens_per_s", "mfu"), row["step"])

    def eval(self, **row: Any) -> None:
        row = {"t": time.time(), "kind": "eval", **row}
        self._append(self.run.metrics, row)
        self._scalars("val", row, ("val_loss", "val_bpb", "val_ppl"), row["step"])
        if self._tb is not None:
            for domain, d in row.get("per_domain", {}).items():
                for k in ("loss", "bpb"):
                    if d.get(k) is not None:
                        self._tb.add_scalar(f"val_{k}/{domain}", d[k], row["step"])
        self.log(f"eval step {row['step']}: val_loss {row['val_loss']:.4f} val_bpb {row['val_bpb']:.4f}")

    def event(self, event: str, step: int, message: str = "", **extra: Any) -> None:
        row = {"t": time.time(), "kind": "event", "event": event, "step": step, "message": message, **extra}
        self._append(self.run.metrics, row)
        if message:
            self.log(f"[{event}] step {step}: {message}")

    def system(self, snapshot: dict[str, Any]) -> None:
        self._append(self.run.metrics, {"t": time.time(), "kind": "system", **snapshot})

    def sample(self, step: int, epoch: int, prompt: str, text: str) -> None:
        self._append(self.run.samples, {"t": time.time(), "step": step, "epoch": epoch, "prompt": prompt, "text": text})
        self.log(f"sample step {step}: {prompt!r} -> {text[:200]!r}")

    def _scalars(self, prefix: str, row: dict[str, Any], keys: tuple[str, ...], step: int) -> None:
        if self._tb is None:
            return
        for k in keys:
            v = row.get(k)
            if isinstance(v, (int, float)):
                self._tb.add_scalar(f"{prefix}/{k}", v, step)

    # ---- human output
    @property
    def interactive(self) -> bool:
        """True when a progress bar is shown (a terminal, rank 0)."""
        return self._show_bar

    def log(self, message: str, echo: bool | None = None) -> None:
        """One line in train.log (and on the terminal unless `echo=False`)."""
        if not self.enabled:
            return
        with self._lock:
            self.run.log_line(message)
        if self.echo if echo is None else (echo and self.echo):
            if self._bar is not None:
                self._bar.write(message, file=sys.stderr)
            else:
                print(message, file=sys.stderr, flush=True)

    def progress(self, step: int, total: int, desc: str) -> None:
        """Move the progress bar to `step` of `total` (no-op when not interactive)."""
        if not self._show_bar:
            return
        if self._bar is None:
            self._bar = tqdm(total=total, initial=step, unit="step", dynamic_ncols=True, file=sys.stderr)
        self._bar.total = total
        self._bar.n = step
        self._bar.set_description_str(desc, refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None
