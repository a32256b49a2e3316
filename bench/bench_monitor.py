"""Dashboard benchmark: a run with 1,000,000 metric rows; 50 live SSE clients.

    python bench/bench_monitor.py [--rows 1000000] [--clients 50] [--writes 20]

Prints medians of:
  * time to first full page data (GET /api/runs/RUN, cold server, then warm),
  * time until the exact (not sampled) index of the big file is ready,
  * update latency: a row appended to metrics.jsonl → its SSE message at each of 50 clients,
  * server memory (RSS) after opening the run and after appending 200,000 more rows.
The server runs in its own process (as `simone monitor` does), the clients in this one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

DOMAINS = ("biblical_classical", "educational", "philosophical", "technical")


def write_rows(path: Path, n: int, start_step: int = 0, t0: float | None = None) -> int:
    """Append `n` rows like a long run writes: train rows, a system row every 10, an eval
    row every 1000, an event now and then. Returns the last step written."""
    rng = random.Random(start_step)
    t = t0 if t0 is not None else time.time() - n * 0.5
    step = start_step
    with open(path, "a", encoding="utf-8") as f:
        lines = []
        for i in range(n):
            t += 0.5
            if i % 10 == 9:
                lines.append(json.dumps({"t": t, "kind": "system", "cpu_percent": rng.uniform(20, 90), "ram_used_gb": 40.0,
                                         "ram_total_gb": 128.0, "rss_gb": 9.5, "disk_free_gb": 500.0,
                                         "gpus": [{"index": 0, "name": "H200", "util": 97.0, "mem_used_gb": 90.0,
                                                   "mem_total_gb": 141.0, "temp_c": 65.0, "power_w": 600.0}]}))
            elif i % 1000 == 500:
                v = 2 + 8 * math.exp(-step / 2e5)
                lines.append(json.dumps({"t": t, "kind": "eval", "step": step, "epoch": step // 150000, "val_loss": v,
                                         "val_bpb": v / 3, "val_ppl": math.exp(min(v, 50)),
                                         "per_domain": {d: {"loss": v + k * 0.1, "bpb": (v + k * 0.1) / 3, "ppl": 1.0}
                                                        for k, d in enumerate(DOMAINS)}}))
            elif i % 50_000 == 25_001:
                lines.append(json.dumps({"t": t, "kind": "event", "event": "checkpoint", "step": step, "message": "saved"}))
            else:
                step += 1
                loss = 2 + 8 * math.exp(-step / 2e5) + rng.gauss(0, 0.05)
                lines.append(json.dumps({"t": t, "kind": "train", "step": step, "epoch": step // 150000, "loss": loss,
                                         "lr": 3e-4, "grad_norm": abs(rng.gauss(0.6, 0.2)), "tokens_per_s": 250000.0,
                                         "mfu": 0.45, "tokens_seen": step * 49152}))
            if len(lines) >= 20000:
                f.write("\n".join(lines) + "\n")
                lines = []
        if lines:
            f.write("\n".join(lines) + "\n")
    return step


def make_run(root: Path, rows: int) -> tuple[Path, int]:
    run = root / "big"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"preset": "h200", "train": {"num_epochs": 7}}))
    last = write_rows(run / "metrics.jsonl", rows)
    (run / "train.log").write_text("".join(f"step {s} loss 2.5\n" for s in range(0, last, 1000)))
    status = {"schema": 1, "state": "running", "stage": "train", "step": last, "epoch": 6,
              "total_steps": last + 50000, "pid": 1, "host": "bench", "heartbeat": time.time() + 3600}
    (run / "status.json").write_text(json.dumps(status))
    return run, last


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(root: Path, port: int) -> subprocess.Popen:
    code = f"from simone.monitor import serve; serve(runs_root={str(root)!r}, port={port})"
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/api/runs", timeout=1)
            return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not start")


async def sse_latency(base: str, run: Path, last_step: int, clients: int, writes: int) -> list[float]:
    """Each of `clients` follows the run; each write's latency is measured at every client."""
    arrivals: dict[int, list[float]] = {}
    ready = asyncio.Event()
    connected = 0

    async def client(c: httpx.AsyncClient) -> None:
        nonlocal connected
        async with c.stream("GET", f"{base}/api/stream/run/big") as resp:
            connected += 1
            if connected == clients:
                ready.set()
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                msg = json.loads(line[5:])
                if msg.get("type") == "metrics":
                    now = time.time()
                    for step in msg["points"].get("train/loss", [[]])[0]:
                        arrivals.setdefault(int(step), []).append(now)

    limits = httpx.Limits(max_connections=clients + 10)
    async with httpx.AsyncClient(timeout=None, limits=limits) as c:
        tasks = [asyncio.create_task(client(c)) for _ in range(clients)]
        await asyncio.wait_for(ready.wait(), 60)
        await asyncio.sleep(1.0)
        written: dict[int, float] = {}
        step = last_step
        with open(run / "metrics.jsonl", "a") as f:
            for _ in range(writes):
                step += 1
                written[step] = time.time()
                f.write(json.dumps({"t": written[step], "kind": "train", "step": step, "loss": 2.0, "lr": 3e-4}) + "\n")
                f.flush()
                await asyncio.sleep(0.5 + random.random() * 0.1)
        await asyncio.sleep(2.0)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    lat = []
    missing = 0
    for s, t in written.items():
        got = arrivals.get(s, [])
        missing += clients - len(got)
        lat.extend(a - t for a in got)
    if missing:
        print(f"  WARNING: {missing} (write, client) deliveries missing")
    return lat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--writes", type=int, default=20)
    ap.add_argument("--grow", type=int, default=200_000, help="rows appended to check memory stays flat")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="simone-bench-") as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        run, last = make_run(root, args.rows)
        size_mb = (run / "metrics.jsonl").stat().st_size / 1e6
        print(f"generated {args.rows:,} rows ({size_mb:.0f} MB) in {time.perf_counter() - t:.1f}s")
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        proc = start_server(root, port)
        try:
            with httpx.Client(timeout=120) as c:
                t = time.perf_counter()
                first = c.get(f"{base}/api/runs/big")
                cold = time.perf_counter() - t
                d = first.json()
                npoints = sum(len(v[0]) for v in d["series"].values())
                print(f"cold first page data: {cold:.2f}s ({len(first.content) / 1e3:.0f} KB, {len(d['series'])} series, "
                      f"{npoints:,} points, exact={d['summary']['exact']})")
                t = time.perf_counter()
                while not c.get(f"{base}/api/runs/big").json()["summary"]["exact"]:
                    time.sleep(0.2)
                exact = time.perf_counter() - t + cold
                print(f"exact index of all rows ready after: {exact:.2f}s")
                warm = []
                for _ in range(7):
                    t = time.perf_counter()
                    c.get(f"{base}/api/runs/big").json()
                    warm.append(time.perf_counter() - t)
                print(f"warm full page data: median {statistics.median(warm) * 1000:.0f} ms")
                rss_open = psutil.Process(proc.pid).memory_info().rss / 1e6
            lat = asyncio.run(sse_latency(base, run, last, args.clients, args.writes))
            lat.sort()
            print(f"update latency, {args.clients} SSE clients x {args.writes} writes: median "
                  f"{statistics.median(lat) * 1000:.0f} ms, p95 {lat[int(0.95 * (len(lat) - 1))] * 1000:.0f} ms, "
                  f"max {lat[-1] * 1000:.0f} ms ({len(lat)} deliveries)")
            with httpx.Client(timeout=120) as c:
                write_rows(run / "metrics.jsonl", args.grow, start_step=last + args.writes + 1, t0=time.time())
                for _ in range(3):
                    c.get(f"{base}/api/runs/big")
                rss_grown = psutil.Process(proc.pid).memory_info().rss / 1e6
            print(f"server RSS: {rss_open:.0f} MB after opening, {rss_grown:.0f} MB after {args.grow:,} more rows")
        finally:
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    main()
