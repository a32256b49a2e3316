"""`simone status`: the same essentials as the dashboard, in a terminal."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from simone.monitor.terminal import status_report
from tests.test_monitor_api import make_run


def render(run, root: Path) -> tuple[int, str]:
    console = Console(record=True, width=120, color_system=None)
    code, lines = status_report(run, root)
    console.print(*lines, sep="\n")
    return code, console.export_text()


def test_status_of_one_run_shows_state_progress_losses_speed_and_eta(tmp_path: Path) -> None:
    make_run(tmp_path, "live", "running", heartbeat_age=2, steps=25, total_steps=100)
    code, out = render("live", tmp_path)
    assert code == 0
    assert "running" in out and "25 / 100" in out and "25.0%" in out
    assert "1m 15s" in out  # 75 steps left at 1 step/s
    assert "2.5000" in out and "3.5000" in out  # train loss and val loss
    assert "1000" in out and "30.0%" in out  # tokens/s and MFU
    code, out = render(tmp_path / "live", tmp_path / "elsewhere")  # a path works too
    assert code == 0 and "25 / 100" in out


def test_status_shows_failure_and_stall(tmp_path: Path) -> None:
    make_run(tmp_path, "broke", "failed", error="data/val.bin: missing")
    make_run(tmp_path, "hung", "running", heartbeat_age=3600)
    _, out = render("broke", tmp_path)
    assert "failed" in out and "data/val.bin: missing" in out
    _, out = render("hung", tmp_path)
    assert "stalled" in out and "1h 00m ago" in out


def test_status_lists_all_runs_and_reports_missing_ones(tmp_path: Path) -> None:
    make_run(tmp_path, "a", "finished")
    make_run(tmp_path, "b", "running")
    code, out = render(None, tmp_path)
    assert code == 0 and "a" in out and "finished" in out and "running" in out
    code, out = render("nope", tmp_path)
    assert code == 1 and "not a run directory" in out


def test_status_shows_numbers_written_as_text_and_an_unreadable_status(tmp_path: Path) -> None:
    import time

    from simone.rundir import append_jsonl

    run = make_run(tmp_path, "odd", steps=5)
    append_jsonl(run.metrics, {"t": time.time(), "kind": "train", "step": 6, "loss": "n/a", "tokens_per_s": "fast"})
    broken = make_run(tmp_path, "broken", steps=5)
    broken.status.write_text("[" * 100_000)
    code, out = render(None, tmp_path)
    assert code == 0 and "fast" in out and "unreadable" in out
    code, out = render("odd", tmp_path)
    assert code == 0 and "fast" in out and "n/a" in out
    code, out = render("broken", tmp_path)
    assert code == 0 and "unreadable" in out and "nested too deeply" in out
