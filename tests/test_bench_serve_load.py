"""bench/bench_serve_load.py: a short run (4 clients, 2 s, the server in-process) serves, refuses
and drops what it should, and the bench's own checks flag what they exist to catch."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "bench_serve_load.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_serve_load", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_a_short_load_run_serves_every_kind_and_health_stays_fast(tmp_path):
    bench = load_bench()
    out = tmp_path / "load.json"
    result = bench.main(["--preset", "tiny", "--clients", "4", "--seconds", "2", "--in-process",
                         "--max-queue", "1", "--json", str(out)])
    assert result["ok"], result["problems"]
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    kinds = result["by_kind"]
    assert set(kinds) == {"stream", "complete", "cancel", "oversized"}
    assert kinds["stream"].get("served") and kinds["complete"].get("served") and kinds["cancel"].get("hung up")
    assert kinds["oversized"] == {"refused": sum(kinds["oversized"].values())}
    assert result["rejected_429"] > 0  # 4 clients, room for 1 waiting: the queue fills
    assert result["served"] + result["rejected_429"] <= result["requests"]
    assert result["health_probes"] >= 10 and result["health_max_s"] < 0.1
    assert 0 < result["latency_p50_s"] <= result["latency_p99_s"]


def test_the_checks_flag_lost_answers_failures_and_a_slow_health():
    bench = load_bench()

    class Probe:
        times, at, failures = [0.01, 0.25], [0.0, 0.05], 1

    records = [("stream", "served", 0.1), ("stream", "incomplete", 0.1), ("complete", "timed out", 60.0),
               ("cancel", "hung up", 0.1), ("oversized", "wrong 400", 0.01), ("complete", "http 500", 0.1)]
    result = bench.summarize(records, Probe(), drained=False)
    assert not result["ok"] and result["served"] == 1 and result["over_100ms"] == 1
    assert result["health_max_at_s"] == 0.05
    problems = "\n".join(result["problems"])
    for expected in ["1 stream request(s): incomplete", "1 complete request(s): timed out",
                     "1 oversized request(s): wrong 400", "1 complete request(s): http 500",
                     "/health failed 1 time(s)", "/health took up to 250 ms", "still waiting"]:
        assert expected in problems, expected
    assert "hung up" not in problems
