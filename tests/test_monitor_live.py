"""Live updates over server-sent events from a real uvicorn server, and the big-file path."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest

from simone.monitor import start_background_monitor
from simone.monitor import watch as runs_mod
from simone.monitor.watch import RunWatch
from simone.rundir import append_jsonl
from tests.test_monitor_api import make_run


def read_events(resp: httpx.Response, until, timeout: float = 5.0) -> list[dict]:
    """SSE `data:` messages until `until(messages)` is true (or the timeout)."""
    got: list[dict] = []
    deadline = time.monotonic() + timeout
    for line in resp.iter_lines():
        if line.startswith("data:"):
            got.append(json.loads(line[5:]))
            if until(got):
                return got
        if time.monotonic() > deadline:
            break
    return got


@pytest.fixture
def server(tmp_path: Path):
    root = tmp_path / "runs"
    root.mkdir()
    make_run(root, "r", steps=10)
    mon = start_background_monitor(runs_root=root, port=0)
    yield mon, root
    mon.stop()


def test_new_rows_logs_and_samples_are_pushed_within_a_second(server) -> None:
    mon, root = server
    run = root / "r"
    with httpx.Client(base_url=mon.url, timeout=10) as c:
        snap = c.get("/api/runs/r").json()
        assert snap["series"]["train/loss"][0][-1] == 10
        with c.stream("GET", "/api/stream/run/r", params={"since": snap["seq"]}) as resp:
            assert resp.headers["content-type"].startswith("text/event-stream")
            written = []

            def write_later() -> None:
                time.sleep(0.3)
                written.append(time.monotonic())
                append_jsonl(run / "metrics.jsonl", {"t": time.time(), "kind": "train", "step": 11, "loss": 0.9, "lr": 1e-3})
                with open(run / "train.log", "a") as f:
                    f.write("step 11 <b>done</b>\n")
                append_jsonl(run / "samples.jsonl", {"t": time.time(), "step": 11, "epoch": 0, "prompt": "A", "text": "A b"})

            threading.Thread(target=write_later).start()
            types = lambda ms: {m["type"] for m in ms}  # noqa: E731
            msgs = read_events(resp, lambda ms: {"metrics", "log", "samples"} <= types(ms))
            arrived = time.monotonic()
    assert {"metrics", "log", "samples"} <= types(msgs)
    metrics = next(m for m in msgs if m["type"] == "metrics")
    assert metrics["points"]["train/loss"] == [[11], [0.9]]
    assert next(m for m in msgs if m["type"] == "log")["lines"] == ["step 11 <b>done</b>"]
    assert next(m for m in msgs if m["type"] == "samples")["samples"][0]["text"] == "A b"
    assert arrived - written[0] < 1.5
    seqs = [m["seq"] for m in msgs if "seq" in m]
    assert seqs == sorted(seqs) and seqs[0] == snap["seq"] + 1  # nothing missed, nothing repeated


def test_reconnect_resumes_after_last_event_id(server) -> None:
    mon, root = server
    with httpx.Client(base_url=mon.url, timeout=10) as c:
        seq = c.get("/api/runs/r").json()["seq"]
        for step in (11, 12):
            append_jsonl(root / "r" / "metrics.jsonl", {"t": time.time(), "kind": "train", "step": step, "loss": 1.0})
        with c.stream("GET", "/api/stream/run/r", params={"since": seq}) as resp:
            first = read_events(resp, lambda ms: any(m["type"] == "metrics" for m in ms))
        last_id = max(m["seq"] for m in first)
        append_jsonl(root / "r" / "metrics.jsonl", {"t": time.time(), "kind": "train", "step": 13, "loss": 1.0})
        with c.stream("GET", "/api/stream/run/r", headers={"Last-Event-ID": str(last_id)}) as resp:
            again = read_events(resp, lambda ms: any(m["type"] == "metrics" for m in ms))
    steps_first = [x for m in first if m["type"] == "metrics" for x in m["points"]["train/loss"][0]]
    steps_again = [x for m in again if m["type"] == "metrics" for x in m["points"]["train/loss"][0]]
    assert steps_first == [11, 12] and steps_again == [13]


def test_run_list_stream_reports_state_changes(server) -> None:
    mon, root = server
    with httpx.Client(base_url=mon.url, timeout=10) as c:
        with c.stream("GET", "/api/stream/runs") as resp:
            def finish_later() -> None:
                time.sleep(0.3)
                st = json.loads((root / "r" / "status.json").read_text())
                st.update(state="failed", error="CUDA out of memory")
                (root / "r" / "status.json").write_text(json.dumps(st))

            threading.Thread(target=finish_later).start()
            msgs = read_events(resp, lambda ms: any(r["state"] == "failed" for m in ms for r in m.get("runs", [])), timeout=6)
    assert msgs[0]["runs"][0]["state"] == "running"
    assert msgs[-1]["runs"][0]["state"] == "failed" and msgs[-1]["runs"][0]["error"] == "CUDA out of memory"


def test_real_server_refuses_a_rebound_host_name(server) -> None:
    """Over a real socket, as a DNS-rebinding page would reach it: same address, foreign name."""
    mon, root = server
    (root / "r" / "data" / "documents.jsonl").write_text('{"text": "THE WHOLE CORPUS"}\n')
    port = httpx.URL(mon.url).port
    with httpx.Client(base_url=mon.url, timeout=10) as c:
        for url in ("/", "/api/runs", "/api/runs/r/files/data/documents.jsonl"):
            r = c.get(url, headers={"Host": f"attacker.example:{port}"})
            assert r.status_code == 421 and "CORPUS" not in r.text, url
        r = c.get("/api/runs/r/files/data/documents.jsonl", headers={"Host": f"localhost:{port}"})
        assert r.status_code == 200 and "CORPUS" in r.text
        assert c.get("/api/runs/r/files/data/documents.jsonl").status_code == 200  # Host 127.0.0.1:port


def test_big_metrics_file_opens_from_a_sample_then_goes_exact(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(runs_mod, "PREVIEW_BYTES", 50_000)
    run = make_run(tmp_path, "big", steps=3000)  # ~400 KB of rows
    published: list[dict] = []
    watch = RunWatch(run.root, publish=published.append, max_buckets=100)
    snap = watch.snapshot()
    assert snap["summary"]["step"] == 3000  # the newest rows are exact from the start
    deadline = time.monotonic() + 10
    while not watch.exact and time.monotonic() < deadline:
        time.sleep(0.05)
    assert watch.exact and {"type": "resync", "reason": "exact index ready"} in published
    xs, ys = watch.snapshot()["series"]["train/loss"]
    assert xs[0] == 1 and xs[-1] == 3000 and len(xs) <= 4 * 100 + 4
    assert min(ys) == pytest.approx(5.0 - 3000 * 0.1) and max(ys) == pytest.approx(4.9)
    assert watch.index.rows == 3000 + 2
