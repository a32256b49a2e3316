"""`bench/gpu_check.sh --dry-run`: every step of the GPU check at the tiny shape on the CPU,
each under its own timeout, gathered into OUT/summary.json and OUT/summary.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_corpus

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def run_check(out: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(out), *args], env=full_env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_dry_run_writes_the_summaries_with_every_step(tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    done = run_check(tmp_path / "out", "--data", str(corpus))
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert {"schema", "mode", "machine", "steps", "headline"} <= set(summary)
    assert summary["mode"] == "dry-run" and summary["machine"]["cpu_model"]
    steps = summary["steps"]
    assert list(steps) == ["env", "bench_train", "run", "generate", "torchrun"]
    assert {s: steps[s]["status"] for s in steps} == dict.fromkeys(steps, "ok"), \
        (tmp_path / "out" / "steps.log").read_text()[-3000:]
    h = summary["headline"]
    for key in ("bench_train_tokens_per_s", "bench_train_mfu", "bench_train_peak_memory_mb", "run_tokens_per_s",
                "generate_tokens_per_s_batch1", "torchrun_tokens_per_s"):
        assert h[key] > 0, key
    assert h["run_expected_time"].startswith("expected:")
    md = (tmp_path / "out" / "summary.md").read_text()
    assert md.startswith("# GPU check (dry-run)") and "| bench_train | ok |" in md and "tokens/s" in md


def test_a_step_out_of_time_is_reported_and_the_rest_still_run(tmp_path):
    """A total of 20 s leaves no step its full share: the first ones are cut off by their
    timeout (or not run), and the summary still comes out, saying so."""
    done = run_check(tmp_path / "out", GPU_CHECK_TOTAL_S="22")
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    statuses = {name: step["status"] for name, step in summary["steps"].items()}
    assert "timeout" in statuses.values() or "not_run" in statuses.values(), statuses
    assert statuses["torchrun"] in ("not_run", "skipped", "timeout")
    assert "| torchrun |" in (tmp_path / "out" / "summary.md").read_text()
