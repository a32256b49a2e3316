"""bench/bench_loop.py: the bare step and simone run's loop are both measured, on the same shape,
and the loop's rate comes from its own logging intervals (the compile interval left out)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from conftest import make_corpus

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "bench_loop.py"


@pytest.mark.slow
def test_loop_and_step_are_measured_side_by_side(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_loop", SCRIPT)
    bl = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bl)
    corpus = make_corpus(tmp_path / "corpus")
    report = bl.main(["--preset", "tiny", "--steps", "40", "--step-repeats", "10", "--rounds", "1",
                      "--corpus", str(corpus), "--work", str(tmp_path / "w")])
    loop, step = report["rounds"]["loop"][0], report["rounds"]["step"][0]
    # past the end of the tiny corpus's 2 epochs: the step count ends the loop, not the epochs
    assert loop["steps"] == 40 and loop["intervals"] == 40 // 5 - 1  # tiny logs every 5 steps
    assert step["steps"] == 10 and step["tokens_per_s"] > 0 and loop["tokens_per_s"] > 0
    # the step is timed like the loop: in windows of log_every (5) steps in a row
    assert step["window_steps"] == 5 and step["windows"] == 2 and step["single_step_tokens_per_s"] > 0
    assert report["ratio"] == pytest.approx(loop["tokens_per_s"] / step["tokens_per_s"])
    assert report["ratio_to_single_step"] == pytest.approx(loop["tokens_per_s"] / step["single_step_tokens_per_s"])
    assert report["cpu_model"] and "2x64" in report["shape"]
    assert json.loads((tmp_path / "w" / "loop.json").read_text())["ratio"] == report["ratio"]
