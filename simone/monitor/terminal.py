"""`simone status [RUN]`: the dashboard's essentials in a terminal (for SSH without a browser).

Reads only status.json, config.json and the tail of metrics.jsonl, so it is instant on a
run of any size. Builds what to show; the CLI prints it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich import box
from rich.console import RenderableType
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from simone.monitor.runs import checkpoint_rows, is_run_dir, list_run_dirs, quick_summary
from simone.units import format_duration

STATE_STYLE = {
    "running": "bold green",
    "finished": "bold blue",
    "failed": "bold red",
    "stalled": "bold yellow",
    "stopped": "dim",
    "unknown": "dim",
}


def resolve_run(run: Path | str, runs_root: Path) -> Path | None:
    """A run given as a path, or as a name under `runs_root`."""
    return next((c for c in (Path(run), Path(runs_root) / str(run)) if is_run_dir(c)), None)


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def fmt_rate(v: float | None) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)  # a trainer wrote text where a number belongs: show it as it is
    if v >= 1e6:
        return f"{v / 1e6:.2f}M"
    if v >= 1e4:
        return f"{v / 1e3:.1f}k"
    return f"{v:.0f}"


def progress_bar(progress: float | None, width: int = 30) -> str:
    if progress is None:
        return "[" + " " * width + "]"
    filled = round(progress * width)
    return "[" + "#" * filled + "-" * (width - filled) + f"] {progress * 100:5.1f}%"


def status_lines(s: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) rows for one run, in reading order."""
    step = f"{_fmt(s.get('step'))}" + (f" / {s['total_steps']}" if s.get("total_steps") else "")
    epoch = _fmt(s.get("epoch"), 2) + (f" / {s['num_epochs']}" if s.get("num_epochs") else "")
    rows = [
        ("state", s["state"] + (f" (stage {s['stage']})" if s.get("stage") else "")),
        ("progress", progress_bar(s.get("progress"))),
        ("step", step),
        ("epoch", epoch),
        ("ETA", format_duration(s.get("eta_s")) if s["state"] == "running" else "–"),
        ("train loss", _fmt(s.get("loss"))),
        (
            "val loss",
            _fmt(s.get("val_loss"))
            + (f"  (best {_fmt(s.get('best_val_loss'))})" if s.get("best_val_loss") is not None else ""),
        ),
        ("val bits/byte", _fmt(s.get("val_bpb"), 3)),
        ("tokens/s", fmt_rate(s.get("tokens_per_s"))),
        ("MFU", f"{s['mfu'] * 100:.1f}%" if isinstance(s.get("mfu"), (int, float)) else "–"),
        ("preset", _fmt(s.get("preset"))),
        (
            "heartbeat",
            (format_duration(s.get("heartbeat_age_s")) + " ago") if s.get("heartbeat_age_s") is not None else "–",
        ),
    ]
    if s.get("stop_reason"):
        rows.append(("stopped because", str(s["stop_reason"])))
    if s.get("error"):
        rows.append(("error", str(s["error"])))
    if s.get("package"):
        rows.append(("package", str(s["package"])))
    return rows


def status_report(run: Path | None, runs_root: Path, stall_after_s: float = 60.0) -> tuple[int, list[RenderableType]]:
    """One run's essentials (RUN given) or a table of all runs under `runs_root`.

    Returns a process exit code (0, or 1 if the run was not found) and what to print, in
    order (strings are rich markup)."""
    now = time.time()
    if run is not None:
        path = resolve_run(run, runs_root)
        if path is None:
            return 1, [
                Text.from_markup(
                    f"simone status: {escape(str(run))}: not a run directory (no status.json, "
                    f"config.json or metrics.jsonl), and no run of that name under "
                    f"{escape(str(runs_root))}",
                    style="red",
                )
            ]
        s = quick_summary(path, now, stall_after_s)
        table = Table(show_header=False, box=None, pad_edge=False)
        table.add_column(style="dim", no_wrap=True)
        table.add_column()
        for label, value in status_lines(s):
            style = STATE_STYLE.get(s["state"], "") if label == "state" else ("red" if label == "error" else "")
            table.add_row(label, Text(value, style=style))
        ck = checkpoint_rows(path)
        if ck:
            best = next((c for c in ck if c["best"]), None)
            table.add_row(
                "checkpoints",
                f"{len(ck)} (latest step {ck[0]['step']}" + (f", best step {best['step']}" if best else "") + ")",
            )
        return 0, [Text(f"{s['name']}  ", style="bold") + Text(str(path), style="dim"), table]
    paths = list_run_dirs(Path(runs_root))
    if not paths:
        return 0, [f"no runs under {escape(str(runs_root))}"]
    table = Table(title=f"runs under {escape(str(runs_root))}", title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("run", min_width=12, overflow="fold")
    for col in ("state", "step", "progress", "ETA", "loss", "val loss", "tok/s"):
        table.add_column(col, no_wrap=True)
    for p in paths:
        s = quick_summary(p, now, stall_after_s)
        step = _fmt(s.get("step")) + (f"/{s['total_steps']}" if s.get("total_steps") else "")
        table.add_row(
            Text(s["name"]),
            Text(s["state"], style=STATE_STYLE.get(s["state"], "")),
            step,  # Text: a run name is not markup
            f"{s['progress'] * 100:.1f}%" if s.get("progress") is not None else "–",
            format_duration(s.get("eta_s")) if s["state"] == "running" else "–",
            _fmt(s.get("loss")),
            _fmt(s.get("val_loss")),
            fmt_rate(s.get("tokens_per_s")),
        )
    return 0, [table]
