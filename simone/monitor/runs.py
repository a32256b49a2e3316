"""Reading run directories for the monitor: the runs under a root, their state and summaries,
checkpoints, report links and safe file paths.

Everything here only reads. A run directory is the contract of docs/ARCHITECTURE.md:
status.json (state + heartbeat), metrics.jsonl (train/eval/system/event rows), train.log,
samples.jsonl, checkpoints/, data/report.html, validation/report.{md,json}.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from simone.monitor.metrics_tail import clean_json, finite_number, tail_rows
from simone.rundir import RunDir, read_json, read_pointer
from simone.rundir import list_checkpoints as checkpoint_dirs

_CONTRACT = RunDir(Path("."))  # file names come from the run-directory contract
RUN_MARKERS = (_CONTRACT.status.name, _CONTRACT.config.name, _CONTRACT.metrics.name)  # what makes a run


def read_status(run_root: Path) -> dict:
    """status.json as a dict: {} when there is none yet, and state "unreadable" (with the
    reason as `error`) when it exists but is not a JSON object."""
    path = RunDir(run_root).status
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as e:
        return {"state": "unreadable", "error": f"{path}: cannot read ({e.strerror})"}
    try:
        status = json.loads(data)
    except RecursionError:
        return {"state": "unreadable", "error": f"{path}: JSON nested too deeply"}
    except ValueError as e:
        return {"state": "unreadable", "error": f"{path}: not valid JSON ({str(e)[:200]})"}
    if not isinstance(status, dict):
        return {"state": "unreadable", "error": f"{path}: not a JSON object"}
    return status


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / m).is_file() for m in RUN_MARKERS)


def list_run_dirs(runs_root: Path) -> list[Path]:
    """Run directories directly under `runs_root`, newest first. A child that is a symlink
    leading outside `runs_root` is not a run of this root and is left out."""
    root = runs_root.resolve()
    found: list[tuple[float, Path]] = []
    try:
        children = list(os.scandir(root))
    except OSError:
        return []
    for entry in children:
        if entry.name.startswith("."):
            continue
        path = Path(entry.path)
        try:
            if path.resolve().is_relative_to(root) and is_run_dir(path):
                found.append((_run_mtime(path), path))
        except OSError:
            continue
    found.sort(key=lambda p: (-p[0], p[1].name))
    return [p for _, p in found]


def _run_mtime(path: Path) -> float:
    best = 0.0
    for m in RUN_MARKERS:
        with contextlib.suppress(OSError):
            best = max(best, (path / m).stat().st_mtime)
    return best


def safe_file(run_root: Path, relpath: str) -> Path | None:
    """The file `relpath` inside `run_root`, or None if it is not a regular file there.

    Refuses absolute paths, `..` parts, NUL bytes and anything that resolves (through
    symlinks) outside the run directory."""
    if not relpath or "\x00" in relpath or "\\" in relpath:
        return None
    rel = Path(relpath)
    if rel.is_absolute() or relpath.startswith("/") or any(p in ("..", "") for p in rel.parts):
        return None
    try:
        root = run_root.resolve(strict=True)
        target = (root / rel).resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if not target.is_relative_to(root) or not target.is_file():
        return None
    return target


def _scalar(v: Any) -> Any:
    """A value from a run file as the summary shows it: text, a number or a flag; None for
    anything else (a nested list in a status field is not something to show)."""
    if v is None or isinstance(v, (str, bool, int)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    return None


def run_state(status: dict, now: float, stall_after_s: float) -> str:
    """running | stalled | finished | failed | stopped | unknown (no status.json yet) |
    unreadable (a status.json that is not a JSON object, see `read_status`)."""
    state = _scalar(status.get("state"))
    if not state:
        return "unknown"
    if state == "running":
        hb = finite_number(status.get("heartbeat"))
        if hb is None or now - hb > stall_after_s:
            return "stalled"
    return str(state)


def steps_per_second(points: list[tuple[float, float]]) -> float | None:
    """Speed from recent (t, step) pairs of train rows; None when unknown."""
    if len(points) < 2:
        return None
    (t0, s0), (t1, s1) = points[0], points[-1]
    if t1 <= t0 or s1 <= s0:
        return None
    return (s1 - s0) / (t1 - t0)


def build_summary(
    run_root: Path,
    status: dict,
    config: Any,
    last_train: dict | None,
    last_eval: dict | None,
    rate_points: list[tuple[float, float]],
    best_val: float | None,
    now: float,
    stall_after_s: float,
) -> dict[str, Any]:
    """The essentials of one run, as the run list, the header and `simone status` show them.
    `config` is config.json as read (used only if it is an object).

    Values read from run files pass through `_scalar` and arithmetic through `finite_number`, so a
    nested list or a 400-digit integer in status.json shows as nothing instead of raising."""
    state = run_state(status, now, stall_after_s)
    step = _scalar(status.get("step"))
    if last_train and (train_step := finite_number(last_train.get("step"))) is not None:
        status_step = finite_number(step)
        if status_step is None or train_step > status_step:
            step = last_train["step"]
    epoch = _scalar(status.get("epoch"))
    if epoch is None and last_train:
        epoch = _scalar(last_train.get("epoch"))
    total = _scalar(status.get("total_steps"))
    total_n, step_n = finite_number(total), finite_number(step)
    if total_n is None or total_n <= 0:
        total = total_n = None
    progress = None
    if total_n and step_n is not None:
        progress = max(0.0, min(1.0, step_n / total_n))
    sps = steps_per_second(rate_points)
    eta = None
    if state == "running" and sps and total_n and step_n is not None:
        eta = max(0.0, (total_n - step_n) / sps)
    elif state == "running":
        eta = finite_number(status.get("eta_s"))  # the trainer's own estimate, if it wrote one
    hb = finite_number(status.get("heartbeat"))
    cfg = config if isinstance(config, dict) else {}
    train_cfg = train if isinstance(train := cfg.get("train"), dict) else {}
    lt, le = last_train or {}, last_eval or {}
    return clean_json(
        {
            "name": run_root.name,
            "path": str(run_root),
            "state": state,
            "raw_state": _scalar(status.get("state")),
            "stage": _scalar(status.get("stage")),
            "step": step,
            "epoch": epoch,
            "num_epochs": _scalar(train_cfg.get("num_epochs")),
            "total_steps": total,
            "progress": progress,
            "steps_per_s": sps,
            "eta_s": eta,
            "heartbeat": hb,
            "heartbeat_age_s": (now - hb) if hb is not None else None,
            "stall_after_s": stall_after_s,
            **{key: _scalar(status.get(key)) for key in ("error", "stop_reason", "package", "host", "pid")},
            "preset": _scalar(cfg.get("preset")),
            "updated": _run_mtime(run_root) or None,
            **{key: _scalar(lt.get(key)) for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "tokens_seen")},
            "val_loss": _scalar(le.get("val_loss")),
            "val_bpb": _scalar(le.get("val_bpb")),
            "val_step": _scalar(le.get("step")),
            "best_val_loss": best_val,
            "server_time": now,
        }
    )


def unreadable_summary(run_root: Path, problem: str, now: float) -> dict[str, Any]:
    """The run-list entry of a run whose files could not be summarised (the others still list)."""
    return {
        "name": run_root.name,
        "path": str(run_root),
        "state": "unreadable",
        "error": problem,
        "updated": _run_mtime(run_root) or None,
        "server_time": now,
    }


def _tail_facts(metrics: Path) -> dict[str, Any]:
    """Last train/eval rows, recent speed and best validation loss from the file's tail."""
    rows = tail_rows(metrics, 256 << 10)
    train = [r for r in rows if r.get("kind") == "train"]
    evals = [r for r in rows if r.get("kind") == "eval"]
    rate = [
        (float(r["t"]), float(r["step"]))
        for r in train[-64:]
        if finite_number(r.get("t")) is not None and finite_number(r.get("step")) is not None
    ]
    vals = [v for v in (finite_number(r.get("val_loss")) for r in evals) if v is not None]
    return {
        "last_train": train[-1] if train else None,
        "last_eval": evals[-1] if evals else None,
        "rate": rate,
        "best_val": min(vals) if vals else None,
    }


class SummaryCache:
    """Quick summaries of many runs; a run's metrics tail is re-read only when it grew."""

    def __init__(self) -> None:
        self._facts: dict[Path, tuple[tuple[int, int], dict[str, Any]]] = {}

    def summary(self, run_root: Path, now: float | None = None, stall_after_s: float = 60.0) -> dict[str, Any]:
        now = time.time() if now is None else now
        run = RunDir(run_root)
        metrics = run.metrics
        try:
            st = metrics.stat()
            key = (st.st_size, st.st_mtime_ns)
        except OSError:
            key = (-1, -1)
        cached = self._facts.get(run_root)
        if cached is None or cached[0] != key:
            cached = (key, _tail_facts(metrics))
            self._facts[run_root] = cached
        facts = cached[1]
        return build_summary(
            run_root,
            read_status(run_root),
            read_json(run.config),
            facts["last_train"],
            facts["last_eval"],
            facts["rate"],
            facts["best_val"],
            now,
            stall_after_s,
        )

    def forget_except(self, keep: list[Path]) -> None:
        keep_set = set(keep)
        self._facts = {p: facts for p, facts in self._facts.items() if p in keep_set}


def quick_summary(run_root: Path, now: float | None = None, stall_after_s: float = 60.0) -> dict[str, Any]:
    """A run's summary from status.json, config.json and the tail of metrics.jsonl only
    (cheap however big the run: used for the run list and `simone status`)."""
    return SummaryCache().summary(run_root, now, stall_after_s)


def checkpoint_rows(run_root: Path, val_by_step: dict[int, float] | None = None) -> list[dict[str, Any]]:
    """checkpoints/step_N directories, newest first: step, size, validation loss, pointers."""
    ck = RunDir(run_root).checkpoints
    pointers = {name: read_pointer(ck, name) for name in ("latest", "best")}
    out = []
    for path in reversed(checkpoint_dirs(ck)):
        step = int(path.name.split("_", 1)[1])
        size = 0
        try:
            for f in os.scandir(path):
                if f.is_file(follow_symlinks=False):
                    size += f.stat().st_size
        except OSError:
            pass
        manifest = read_json(path / "MANIFEST.json")
        complete = isinstance(manifest, dict)
        val = None
        if complete:
            val = finite_number(manifest.get("val_loss"))
            if val is None and isinstance(manifest.get("metrics"), dict):
                val = finite_number(manifest["metrics"].get("val_loss"))
        if val is None and val_by_step:
            val = val_by_step.get(step)
        out.append(
            {
                "name": path.name,
                "step": step,
                "size_bytes": size,
                "val_loss": val,
                "complete": complete,
                "latest": pointers["latest"] == path.name,
                "best": pointers["best"] == path.name,
            }
        )
    return out


def report_links(run_root: Path, base_url: str) -> list[dict[str, str]]:
    """Links to the reports and files a user wants beside the charts (only those present)."""
    run = RunDir(run_root)
    wanted = [
        (run.data / "report.html", "Curation report"),
        (run.validation / "report.md", "Validation report"),
        (run.validation / "report.json", "Validation report (JSON)"),
        (run.config, "Resolved config"),
        (run.status, "status.json"),
        (run.log, "Full training log"),
    ]
    links = []
    for path, label in wanted:
        if path.is_file():
            rel = path.relative_to(run.root).as_posix()
            links.append({"label": label, "href": f"{base_url}/{rel}", "path": rel})
    return links
