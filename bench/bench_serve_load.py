"""`simone serve` under load: many clients at once, for a while, hostile requests mixed in.

    python bench/bench_serve_load.py                           # 16 clients, 60 s, random `cpu`-preset model
    python bench/bench_serve_load.py --clients 4 --seconds 3 --in-process
    python bench/bench_serve_load.py --model runs/NAME --json load.json

The server runs as deployed, in its own process (`python -m simone serve` on a free loopback
port, with the --max-queue / --max-body-bytes given here); `--in-process` serves from a thread
of this process instead (faster to start: the test suite's short run). C clients (asyncio +
httpx) loop until the time is up, each drawing its next request at random (seeded):

    stream     a streaming completion or chat, 1..32 new tokens, n 1..2
    complete   the same, not streamed (sometimes with logprobs)
    cancel     either, its client hanging up after 5..300 ms: the server must drop it
    oversized  a body over --max-body-bytes (must be 413) or a prompt past the context (400)

A 429 (the queue is full) is counted and its client waits the Retry-After. Meanwhile a thread
GETs /health every 50 ms. Reported: requests served, latency p50/p99 of served requests, the
429s, and /health's max and p99. Checked (`problems`, empty when all hold): every accepted
request got a complete answer (each choice finished; a stream ends with [DONE]), none failed
or hung (a 60 s timeout) and none got a 5xx, every oversized one was refused as it should be,
/health always answered within 100 ms, and the queue is empty once the clients stop (hung-up
requests left it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import WORDS, random_model  # noqa: E402

KINDS = {"stream": 0.35, "complete": 0.35, "cancel": 0.15, "oversized": 0.15}  # how often each is drawn
EXPECTED = {"stream": {"served", "429"}, "complete": {"served", "429"}, "cancel": {"served", "429", "hung up"},
            "oversized": {"refused"}}  # refused before the queue: never a 429
REQUEST_TIMEOUT_S = 60.0
HEALTH_EVERY_S = 0.05
HEALTH_LIMIT_S = 0.100


class Server:
    """`simone serve` over a model, in its own process or (in_process) a thread of this one."""

    def __init__(self, loaded, model_dir: Path | None, limits: dict[str, int], in_process: bool, work: Path):
        from simone.inference.serve import ServeLimits, model_name, start_background_server

        self.name = model_name(loaded.source)
        self.thread_server = self.process = None
        if in_process:
            self.thread_server = start_background_server(loaded, limits=ServeLimits(**limits))
            self.base = self.thread_server.url.removesuffix("/v1")
            return
        if model_dir is None:  # a random model: saved as a checkpoint folder for the other process
            model_dir = save_model_dir(loaded, work / self.name)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        flags = [f"--{k.replace('_', '-')}={v}" for k, v in limits.items()]
        self.log = open(work / "serve.log", "w")  # noqa: SIM115 — closed in stop()
        self.process = subprocess.Popen(  # nosec B603  # our own interpreter and arguments
            [sys.executable, "-m", "simone", "serve", "--model", str(model_dir), "--port", str(port),
             "--device", "cpu", *flags], stdout=self.log, stderr=subprocess.STDOUT)
        self.base = f"http://127.0.0.1:{port}"
        self._wait_until_up()

    def _wait_until_up(self, timeout: float = 120.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"simone serve exited with {self.process.returncode} (see {self.log.name})")
            try:
                if httpx.get(self.base + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError(f"simone serve did not answer /health within {timeout:.0f} s")

    def stop(self) -> None:
        if self.thread_server is not None:
            self.thread_server.stop()
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.log.close()


def save_model_dir(loaded, folder: Path) -> Path:
    """A checkpoint folder (weights, config, tokenizer) that `load_model` reads back."""
    from safetensors.torch import save_model

    folder.mkdir(parents=True, exist_ok=True)
    save_model(loaded.model, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(loaded.config.to_json())
    loaded.tokenizer.save(folder / "tokenizer.json")
    return folder


# ----------------------------------------------------------------------------- one client


def sse_complete(text: str, n: int) -> bool:
    """Every choice of a stream finished, no error event, and [DONE] last."""
    finished, lines = set(), [line for line in text.splitlines() if line.startswith("data: ")]
    if not lines or lines[-1] != "data: [DONE]":
        return False
    for line in lines[:-1]:
        chunk = json.loads(line[6:])
        if "error" in chunk:
            return False
        finished |= {c["index"] for c in chunk["choices"] if c.get("finish_reason")}
    return finished == set(range(n))


def json_complete(body: dict, n: int) -> bool:
    choices = body.get("choices", [])
    return (len(choices) == n and all(c.get("finish_reason") in ("stop", "length") for c in choices)
            and body.get("usage", {}).get("completion_tokens", -1) >= 0)


def make_request(kind: str, rng: random.Random, name: str, limits: dict[str, int]) -> tuple[str, dict, int]:
    """(path, body, n) of one request of this kind."""
    words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
    n = rng.choice([1, 1, 2])
    body = {"model": name, "n": n, "max_tokens": rng.randint(1, 32), "temperature": rng.choice([0, 0.8])}
    if kind == "oversized":
        if rng.random() < 0.5:
            body["prompt"] = "x" * limits["max_body_bytes"]  # with the rest, over the limit: 413
        else:
            body["prompt"] = " ".join(rng.choice(WORDS) for _ in range(2000))  # past the context: 400
        return "/v1/completions", body, n
    if rng.random() < 0.5:
        body["prompt"] = words
        if kind == "complete" and rng.random() < 0.3:
            body["logprobs"] = 2
        return "/v1/completions", body, n
    body["messages"] = [{"role": "user", "content": words}]
    return "/v1/chat/completions", body, n


async def one_request(client, kind: str, path: str, body: dict, n: int, rng: random.Random) -> tuple[str, float]:
    """Send one request; its outcome and how long it took."""
    stream = kind == "stream" or (kind == "cancel" and rng.random() < 0.5)
    if stream:
        body = {**body, "stream": True}
    t0 = time.perf_counter()

    async def send() -> str:
        if stream:
            async with client.stream("POST", path, json=body) as r:
                text = (await r.aread()).decode()
                status, complete = r.status_code, r.status_code == 200 and sse_complete(text, n)
        else:
            r = await client.post(path, json=body)
            status = r.status_code
            complete = status == 200 and json_complete(r.json(), n)
        if status == 200:
            return "served" if complete else "incomplete"
        if status == 429:
            return "429"
        if kind == "oversized" and status in (400, 413):  # never streamed
            wanted = "request_too_large" if status == 413 else "context_length_exceeded"
            return "refused" if r.json()["error"]["code"] == wanted else f"wrong {status}"
        return f"http {status}"

    try:
        if kind == "cancel":
            try:
                outcome = await asyncio.wait_for(send(), rng.uniform(0.005, 0.3))
            except asyncio.TimeoutError:
                outcome = "hung up"
        else:
            outcome = await asyncio.wait_for(send(), REQUEST_TIMEOUT_S)
    except asyncio.TimeoutError:
        outcome = "timed out"
    except Exception as e:  # noqa: BLE001 — counted and reported
        outcome = f"error {type(e).__name__}"
    return outcome, time.perf_counter() - t0


async def run_clients(base: str, name: str, clients: int, seconds: float, limits: dict[str, int],
                      seed: int) -> list[tuple[str, str, float]]:
    import httpx

    records: list[tuple[str, str, float]] = []  # kind, outcome, seconds
    deadline = time.monotonic() + seconds

    async def client(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        async with httpx.AsyncClient(base_url=base, timeout=REQUEST_TIMEOUT_S) as c:
            while time.monotonic() < deadline:
                kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
                path, body, n = make_request(kind, rng, name, limits)
                outcome, took = await one_request(c, kind, path, body, n, rng)
                records.append((kind, outcome, took))
                if outcome == "429":
                    await asyncio.sleep(1.0)  # the Retry-After

    await asyncio.gather(*(client(i) for i in range(clients)))
    return records


class HealthProbe(threading.Thread):
    """GETs /health every HEALTH_EVERY_S from its own thread; records how long each answer
    took, and when (seconds into the run)."""

    def __init__(self, base: str):
        super().__init__(daemon=True, name="health-probe")
        self.base, self.times, self.at, self.failures = base, [], [], 0
        self.stopping = threading.Event()

    def run(self) -> None:
        import httpx

        start = time.perf_counter()
        with httpx.Client(timeout=10) as c:
            while not self.stopping.wait(HEALTH_EVERY_S):
                t0 = time.perf_counter()
                try:
                    ok = c.get(self.base + "/health").status_code == 200
                except httpx.HTTPError:
                    ok = False
                self.times.append(time.perf_counter() - t0)
                self.at.append(t0 - start)
                self.failures += not ok


def queue_drains(base: str, timeout: float = 10.0) -> bool:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if httpx.get(base + "/health", timeout=5).json()["waiting"] == 0:
            return True
        time.sleep(0.1)
    return False


# ----------------------------------------------------------------------------- the run


def summarize(records: list[tuple[str, str, float]], probe: HealthProbe, drained: bool) -> dict:
    by_kind: dict[str, Counter] = defaultdict(Counter)
    for kind, outcome, _ in records:
        by_kind[kind][outcome] += 1
    served = np.array([t for _, outcome, t in records if outcome == "served"] or [float("nan")])
    health = np.array(probe.times or [float("nan")])
    problems = []
    for kind, outcomes in by_kind.items():
        for outcome, count in outcomes.items():
            if outcome not in EXPECTED[kind]:
                problems.append(f"{count} {kind} request(s): {outcome}")
    if probe.failures:
        problems.append(f"/health failed {probe.failures} time(s)")
    if float(np.nanmax(health)) > HEALTH_LIMIT_S:
        problems.append(f"/health took up to {np.nanmax(health) * 1000:.0f} ms (limit {HEALTH_LIMIT_S * 1000:.0f})")
    if not drained:
        problems.append("requests were still waiting after the clients stopped")
    return {
        "requests": len(records), "served": int(sum(o == "served" for _, o, _ in records)),
        "rejected_429": int(sum(o == "429" for _, o, _ in records)),
        "latency_p50_s": float(np.nanpercentile(served, 50)), "latency_p99_s": float(np.nanpercentile(served, 99)),
        "health_probes": len(probe.times), "health_max_s": float(np.nanmax(health)),
        "health_max_at_s": float(probe.at[int(np.argmax(health))]) if probe.at else None,
        "health_p99_s": float(np.nanpercentile(health, 99)),
        "over_100ms": int(sum(t > HEALTH_LIMIT_S for t in probe.times)),
        "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())}, "problems": problems, "ok": not problems,
    }


def print_report(result: dict) -> None:
    print(result["header"])
    print(f"requests {result['requests']}  served {result['served']}  429s {result['rejected_429']}  "
          f"latency p50 {result['latency_p50_s'] * 1000:.0f} ms  p99 {result['latency_p99_s'] * 1000:.0f} ms  "
          f"/health max {result['health_max_s'] * 1000:.1f} ms (at {result['health_max_at_s'] or 0:.1f} s)  "
          f"p99 {result['health_p99_s'] * 1000:.1f} ms "
          f"({result['health_probes']} probes, {result['over_100ms']} over 100 ms)")
    for kind, outcomes in result["by_kind"].items():
        print(f"  {kind:9s} " + "  ".join(f"{k}: {v}" for k, v in sorted(outcomes.items())))
    print("all checks hold" if result["ok"] else "PROBLEMS:\n  " + "\n  ".join(result["problems"]))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="run dir, checkpoint dir or .tar.gz (default: a random model)")
    ap.add_argument("--preset", default="cpu", help="shape of the random model")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--max-queue", type=int, default=8, help="the server's --max-queue (below --clients: 429s)")
    ap.add_argument("--max-body-bytes", type=int, default=64 * 1024, help="the server's --max-body-bytes")
    ap.add_argument("--in-process", action="store_true", help="serve from a thread of this process")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args(argv)

    import torch

    from simone.devices import cpu_model
    from simone.inference.load import load_model

    loaded = load_model(Path(args.model), device="cpu") if args.model else random_model(args.preset, "cpu")
    limits = {"max_queue": args.max_queue, "max_body_bytes": args.max_body_bytes}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-serve-load-") as work:
        server = Server(loaded, Path(args.model) if args.model else None, limits, args.in_process, Path(work))
        probe = HealthProbe(server.base)
        try:
            probe.start()
            records = asyncio.run(run_clients(server.base, server.name, args.clients, args.seconds, limits,
                                              args.seed))
            drained = queue_drains(server.base)
        finally:
            probe.stopping.set()
            probe.join(10)
            server.stop()
    m = loaded.config.model
    result = summarize(records, probe, drained)
    result["header"] = (f"simone serve under load: {args.clients} clients for {args.seconds:g} s, model "
                        f"{server.name} (dim {m.dim}, {m.n_layers} layers, context {m.max_seq_len}), "
                        f"{'in-process' if args.in_process else 'own process'}, max-queue {args.max_queue}; "
                        f"CPU {cpu_model()}, {os.cpu_count()} cores, load average {load_before:.1f} -> "
                        f"{os.getloadavg()[0]:.1f}, torch {torch.__version__}")
    result.update(clients=args.clients, seconds=args.seconds, limits=limits, in_process=args.in_process)
    print_report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
