"""Reading run directories for the monitor: state, summaries, safe paths and live tailing.

Everything here only reads. A run directory is the contract of docs/ARCHITECTURE.md:
status.json (state + heartbeat), metrics.jsonl (train/eval/system/event rows), train.log,
samples.jsonl, checkpoints/, data/report.html, validation/report.{md,json}.

`RunWatch` keeps one run's dashboard state up to date from remembered file offsets:
bounded downsampled series per metric, the last log lines, samples and events. A file is
never re-read from the start for an update, and a trailing half-written line is held back
until its newline arrives.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from simone.monitor.downsample import MinMaxSeries
from simone.rundir import RunDir, list_checkpoints as checkpoint_dirs, read_json, read_pointer

_CONTRACT = RunDir(Path("."))  # file names come from the run-directory contract
RUN_MARKERS = (_CONTRACT.status.name, _CONTRACT.config.name, _CONTRACT.metrics.name)  # what makes a run
TRAIN_KEYS = ("loss", "lr", "grad_norm", "tokens_per_s", "mfu")
EVAL_KEYS = ("val_loss", "val_bpb", "val_ppl")
DOMAIN_KEYS = ("loss", "bpb")
SYSTEM_KEYS = ("cpu_percent", "ram_used_gb", "rss_gb", "disk_free_gb")
GPU_KEYS = ("util", "mem_used_gb", "temp_c", "power_w")

CHUNK_BYTES = 8 << 20  # read big files in pieces so memory stays flat
MAX_PENDING_BYTES = 16 << 20  # a "line" longer than this without a newline is dropped
LIVE_ROW_LIMIT = 5000  # more new rows than this in one refresh: clients reload instead
PREVIEW_BYTES = 48 << 20  # metrics files above this open from a sample, then go exact
PREVIEW_PROBES = 3000
MAX_JSON_DEPTH = 64  # deeper values from run files are sent as null (no recursion limit hit later)


# ----------------------------------------------------------------------------- small readers


# What parsing a hostile file can raise: ValueError (bad JSON, bad UTF-8, an integer over
# Python's int-string limit) and RecursionError (deeply nested arrays/objects).
JSON_ERRORS = (ValueError, RecursionError)


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


def parse_lines(lines: list[bytes]) -> tuple[list[dict], int]:
    """Parse JSON lines one by one; returns (objects, number of bad lines).

    Line by line on purpose: parsing a batch joined with commas would accept two broken
    lines that happen to join into valid JSON (`{"a": 1}, {"b": [` + `2]}`)."""
    rows, bad = [], 0
    for ln in lines:
        if not ln.strip():
            continue
        try:
            r = json.loads(ln)
        except JSON_ERRORS:
            bad += 1
            continue
        if isinstance(r, dict):
            rows.append(r)
        else:
            bad += 1
    return rows, bad


def read_tail_lines(path: Path, max_bytes: int) -> list[bytes]:
    """The complete lines within the last `max_bytes` of a file (a half-written last line
    and the cut first line are left out)."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            start = max(0, size - max_bytes)
            f.seek(start)
            data = f.read(size - start)
    except OSError:
        return []
    end = data.rfind(b"\n")
    if end < 0:
        return []
    data = data[: end + 1]
    lines = data.split(b"\n")[:-1]
    if start > 0 and lines:
        lines = lines[1:]  # the first line was cut by the seek
    return lines


def tail_rows(path: Path, max_bytes: int = 256 << 10) -> list[dict]:
    """The JSON rows in the last `max_bytes` of a JSON-lines file."""
    return parse_lines(read_tail_lines(path, max_bytes))[0]


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        v = float(v)
    except OverflowError:  # an integer beyond float range (a 400-digit number)
        return None
    return v if math.isfinite(v) else None


def _scalar(v: Any) -> Any:
    """A value from a run file as the summary shows it: text, a number or a flag; None for
    anything else (a nested list in a status field is not something to show)."""
    if v is None or isinstance(v, (str, bool, int)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    return None


def _column(rows: list[dict], key: str) -> np.ndarray:
    """rows[i][key] as float64, NaN where missing or not a number."""
    values = [r.get(key) for r in rows]
    try:
        arr = np.array(values, dtype=np.float64)
        if arr.ndim == 1 and not any(v is True or v is False for v in values):
            return arr
    except (TypeError, ValueError, OverflowError):
        pass
    return np.array([_number(v) if _number(v) is not None else np.nan for v in values], dtype=np.float64)


def clean_json(obj: Any, _depth: int = 0) -> Any:
    """Replace NaN/Infinity (valid in our JSON-lines, invalid for browsers) by None, and
    anything nested deeper than MAX_JSON_DEPTH by None (so encoding it cannot recurse)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (dict, list, tuple)) and _depth >= MAX_JSON_DEPTH:
        return None
    if isinstance(obj, dict):
        return {str(k): clean_json(v, _depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_json(v, _depth + 1) for v in obj]
    return obj


def flatten_row(row: dict) -> list[tuple[str, float, float]]:
    """The chartable points of one metrics row: (series key, x, y).

    train/eval rows are plotted against `step`, system rows against time `t`."""
    kind = row.get("kind")
    out: list[tuple[str, float, float]] = []
    if kind == "train" or kind == "eval":
        x = _number(row.get("step"))
        if x is None:
            return out
        for k in TRAIN_KEYS if kind == "train" else EVAL_KEYS:
            y = _number(row.get(k))
            if y is not None:
                out.append((f"{kind}/{k}", x, y))
        per_domain = row.get("per_domain") if kind == "eval" else None
        if isinstance(per_domain, dict):
            for domain, vals in per_domain.items():
                if isinstance(vals, dict):
                    for k in DOMAIN_KEYS:
                        y = _number(vals.get(k))
                        if y is not None:
                            out.append((f"domain/{domain}/{k}", x, y))
    elif kind == "system":
        x = _number(row.get("t"))
        if x is None:
            return out
        for k in SYSTEM_KEYS:
            y = _number(row.get(k))
            if y is not None:
                out.append((f"system/{k}", x, y))
        gpus = row.get("gpus")
        if isinstance(gpus, list):
            for j, g in enumerate(gpus):
                if not isinstance(g, dict):
                    continue
                idx = g.get("index")
                if not isinstance(idx, int) or isinstance(idx, bool):
                    idx = j
                for k in GPU_KEYS:
                    y = _number(g.get(k))
                    if y is not None:
                        out.append((f"gpu{idx}/{k}", x, y))
    return out


# ----------------------------------------------------------------------------- paths


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
            if not path.resolve().is_relative_to(root) or not is_run_dir(path):
                continue
            found.append((_run_mtime(path), path))
        except OSError:
            continue
    found.sort(key=lambda p: (-p[0], p[1].name))
    return [p for _, p in found]


def _run_mtime(path: Path) -> float:
    best = 0.0
    for m in RUN_MARKERS:
        try:
            best = max(best, (path / m).stat().st_mtime)
        except OSError:
            pass
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


# ----------------------------------------------------------------------------- state


def run_state(status: dict, now: float, stall_after_s: float) -> str:
    """running | stalled | finished | failed | stopped | unknown (no status.json yet) |
    unreadable (a status.json that is not a JSON object, see `read_status`)."""
    state = _scalar(status.get("state"))
    if not state:
        return "unknown"
    if state == "running":
        hb = _number(status.get("heartbeat"))
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
    config: dict | None,
    last_train: dict | None,
    last_eval: dict | None,
    rate_points: list[tuple[float, float]],
    best_val: float | None,
    now: float,
    stall_after_s: float,
) -> dict[str, Any]:
    """The essentials of one run, as the run list, the header and `simone status` show them.

    Values read from run files pass through `_scalar` and arithmetic through `_number`, so a
    nested list or a 400-digit integer in status.json shows as nothing instead of raising."""
    state = run_state(status, now, stall_after_s)
    step = _scalar(status.get("step"))
    train_step = _number(last_train.get("step")) if last_train else None
    if train_step is not None:
        status_step = _number(step)
        if status_step is None or train_step > status_step:
            step = last_train["step"]  # type: ignore[index]
    epoch = _scalar(status.get("epoch"))
    if epoch is None and last_train:
        epoch = _scalar(last_train.get("epoch"))
    total = _scalar(status.get("total_steps"))
    total_n, step_n = _number(total), _number(step)
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
        eta = _number(status.get("eta_s"))  # the trainer's own estimate, if it wrote one
    hb = _number(status.get("heartbeat"))
    cfg = config or {}
    train_cfg = cfg.get("train") if isinstance(cfg.get("train"), dict) else {}
    lt, le = last_train or {}, last_eval or {}
    return clean_json({
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
        "error": _scalar(status.get("error")),
        "stop_reason": _scalar(status.get("stop_reason")),
        "package": _scalar(status.get("package")),
        "host": _scalar(status.get("host")),
        "pid": _scalar(status.get("pid")),
        "preset": _scalar(cfg.get("preset")),
        "updated": _run_mtime(run_root) or None,
        "loss": _scalar(lt.get("loss")),
        "lr": _scalar(lt.get("lr")),
        "grad_norm": _scalar(lt.get("grad_norm")),
        "tokens_per_s": _scalar(lt.get("tokens_per_s")),
        "mfu": _scalar(lt.get("mfu")),
        "tokens_seen": _scalar(lt.get("tokens_seen")),
        "val_loss": _scalar(le.get("val_loss")),
        "val_bpb": _scalar(le.get("val_bpb")),
        "val_step": _scalar(le.get("step")),
        "best_val_loss": best_val,
        "server_time": now,
    })


def unreadable_summary(run_root: Path, problem: str, now: float) -> dict[str, Any]:
    """The run-list entry of a run whose files could not be summarised (the others still list)."""
    return {"name": run_root.name, "path": str(run_root), "state": "unreadable",
            "error": problem, "updated": _run_mtime(run_root) or None, "server_time": now}


def _tail_facts(metrics: Path) -> dict[str, Any]:
    """Last train/eval rows, recent speed and best validation loss from the file's tail."""
    rows = tail_rows(metrics, 256 << 10)
    train = [r for r in rows if r.get("kind") == "train"]
    evals = [r for r in rows if r.get("kind") == "eval"]
    rate = [
        (float(r["t"]), float(r["step"])) for r in train[-64:]
        if _number(r.get("t")) is not None and _number(r.get("step")) is not None
    ]
    vals = [v for v in (_number(r.get("val_loss")) for r in evals) if v is not None]
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
        config = read_json(run.config)
        return build_summary(
            run_root, read_status(run_root),
            config if isinstance(config, dict) else None,
            facts["last_train"], facts["last_eval"], facts["rate"], facts["best_val"],
            now, stall_after_s,
        )

    def forget_except(self, keep: list[Path]) -> None:
        keep_set = set(keep)
        for p in [p for p in self._facts if p not in keep_set]:
            del self._facts[p]


def quick_summary(run_root: Path, now: float | None = None, stall_after_s: float = 60.0) -> dict[str, Any]:
    """A run's summary from status.json, config.json and the tail of metrics.jsonl only
    (cheap however big the run: used for the run list and `simone status`)."""
    return SummaryCache().summary(run_root, now, stall_after_s)


def list_checkpoints(run_root: Path, val_by_step: dict[int, float] | None = None) -> list[dict[str, Any]]:
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
            val = _number(manifest.get("val_loss"))
            if val is None and isinstance(manifest.get("metrics"), dict):
                val = _number(manifest["metrics"].get("val_loss"))
        if val is None and val_by_step:
            val = val_by_step.get(step)
        out.append({
            "name": path.name, "step": step, "size_bytes": size, "val_loss": val,
            "complete": complete,
            "latest": pointers["latest"] == path.name, "best": pointers["best"] == path.name,
        })
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


# ----------------------------------------------------------------------------- tailing


class FileTail:
    """New complete lines of a growing file, read from a remembered offset.

    A trailing partial line is held back until its newline arrives. If the file is
    replaced or truncated, `read_new` reports a reset and starts again from the top."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self._pending = b""
        self._skipping = False  # inside an overlong line: drop up to its newline
        self._ino: int | None = None
        self.dropped_lines = 0

    def size(self) -> int:
        try:
            return self.path.stat().st_size
        except OSError:
            return 0

    def skip_to(self, offset: int) -> None:
        """Continue from `offset` (the start of a line) without reading what is before."""
        try:
            self._ino = self.path.stat().st_ino
        except OSError:
            self._ino = None
        self.offset = offset
        self._pending, self._skipping = b"", False

    def changed(self) -> bool:
        """True if the file was replaced or truncated since the last read."""
        try:
            st = self.path.stat()
        except OSError:
            return False
        return (self._ino is not None and st.st_ino != self._ino) or st.st_size < self.offset

    def reset(self) -> None:
        self.offset, self._pending, self._skipping, self._ino = 0, b"", False, None

    def read_chunks(self, chunk_bytes: int = CHUNK_BYTES, until: int | None = None) -> Iterator[list[bytes]]:
        """Yield lists of new complete lines, at most about `chunk_bytes` at a time."""
        try:
            f = open(self.path, "rb")
        except OSError:
            return
        with f:
            st = os.fstat(f.fileno())
            self._ino = st.st_ino
            end = st.st_size if until is None else min(until, st.st_size)
            f.seek(self.offset)
            while self.offset < end:
                data = f.read(min(chunk_bytes, end - self.offset))
                if not data:
                    break
                self.offset += len(data)
                if self._skipping:  # the rest of a dropped line is not a line of its own
                    nl = data.find(b"\n")
                    if nl < 0:
                        continue
                    data, self._skipping = data[nl + 1 :], False
                data = self._pending + data
                cut = data.rfind(b"\n")
                if cut < 0:
                    self._pending = data
                    if len(self._pending) > MAX_PENDING_BYTES:
                        self._pending, self._skipping = b"", True
                        self.dropped_lines += 1
                    continue
                self._pending = data[cut + 1 :]
                yield data[:cut].split(b"\n")

    @property
    def has_partial_line(self) -> bool:
        return bool(self._pending) or self._skipping


class _MetricsIndex:
    """The parsed content of metrics.jsonl: downsampled series and the newest rows."""

    def __init__(self, max_buckets: int, max_events: int):
        self.max_buckets = max_buckets
        self.series: dict[str, MinMaxSeries] = {}
        self.events: deque[dict] = deque(maxlen=max_events)
        self.val_by_step: dict[int, float] = {}
        self.rows = 0
        self.bad_lines = 0
        self.last: dict[str, dict | None] = {"train": None, "eval": None, "system": None}
        self.rate: deque[tuple[float, float]] = deque(maxlen=64)
        self.best_val: float | None = None

    def ingest(self, rows: list[dict], want_points: bool) -> tuple[dict[str, tuple[list, list]], list[dict]]:
        """Add rows; returns the new points per series and the new events (for live pushes).

        Many rows at once (indexing a file) take a column-wise NumPy path; a few rows (live
        tailing) go row by row and also return their points for the clients."""
        new_events: list[dict] = []
        by_kind: dict[str, list[dict]] = {"train": [], "eval": [], "system": []}
        for row in rows:
            kind = row.get("kind")
            group = by_kind.get(kind)  # type: ignore[arg-type]
            if group is not None:
                group.append(row)
            elif kind == "event":
                ev = clean_json(row)
                self.events.append(ev)
                new_events.append(ev)
        self.rows += len(rows)
        for kind, group in by_kind.items():
            if group:
                self.last[kind] = group[-1]
        for row in by_kind["train"][-(self.rate.maxlen or 64):]:
            t, st = _number(row.get("t")), _number(row.get("step"))
            if t is not None and st is not None:
                if self.rate and st < self.rate[-1][1]:
                    self.rate.clear()  # a rollback: speed restarts from here
                self.rate.append((t, st))
        for row in by_kind["eval"]:
            v, st = _number(row.get("val_loss")), _number(row.get("step"))
            if v is not None:
                self.best_val = v if self.best_val is None else min(self.best_val, v)
                if st is not None and len(self.val_by_step) < 100_000:
                    self.val_by_step[int(st)] = v

        cols: dict[str, tuple[list[float], list[float]]] = {}
        if want_points or len(rows) <= 256:
            for row in rows:
                for key, x, y in flatten_row(row):
                    c = cols.get(key)
                    if c is None:
                        c = cols[key] = ([], [])
                    c[0].append(x)
                    c[1].append(y)
            for key, (xs, ys) in cols.items():
                series = self._series(key)
                for x, y in zip(xs, ys):
                    series.add(x, y)
            return (cols if want_points else {}), new_events

        self._add_columns(by_kind["train"], "step", TRAIN_KEYS, "train")
        self._add_columns(by_kind["system"], "t", SYSTEM_KEYS, "system")
        for row in by_kind["eval"] + [{"kind": "system", "t": r.get("t"), "gpus": r.get("gpus")} for r in by_kind["system"]]:
            for key, x, y in flatten_row(row):  # eval rows are few; GPUs are nested lists
                c = cols.get(key)
                if c is None:
                    c = cols[key] = ([], [])
                c[0].append(x)
                c[1].append(y)
        for key, (xs, ys) in cols.items():
            self._series(key).add_many(np.asarray(xs), np.asarray(ys))
        return {}, new_events

    def _series(self, key: str) -> MinMaxSeries:
        s = self.series.get(key)
        if s is None:
            s = self.series[key] = MinMaxSeries(self.max_buckets)
        return s

    def _add_columns(self, rows: list[dict], x_key: str, keys: tuple[str, ...], prefix: str) -> None:
        if not rows:
            return
        xs = _column(rows, x_key)
        for k in keys:
            ys = _column(rows, k)
            if np.isfinite(ys).any():
                self._series(f"{prefix}/{k}").add_many(xs, ys)

    def sample_preview(self, path: Path, size: int) -> None:
        """Fill the series from evenly spaced probes of a big file (a quick first view)."""
        probes = np.linspace(0, size, PREVIEW_PROBES, endpoint=False).astype(np.int64)
        lines: list[bytes] = []
        with open(path, "rb") as f:
            for pos in probes.tolist():
                f.seek(pos)
                data = f.read(4096)
                parts = data.split(b"\n")
                lines.extend(parts[1:-1][:6])  # whole lines only
        rows, _ = parse_lines(lines)
        rows.sort(key=lambda r: _number(r.get("t")) or 0.0)
        self.ingest(rows, want_points=False)


class RunWatch:
    """One run's live dashboard state, refreshed from remembered file offsets.

    `refresh()` reads what was appended since the last call and returns the messages to
    push to clients; `snapshot()` returns everything a page needs to draw the run.
    Thread-safe: the server refreshes from a worker thread while requests read."""

    def __init__(
        self,
        root: Path,
        stall_after_s: float = 60.0,
        max_buckets: int = 600,
        log_lines: int = 500,
        max_samples: int = 20,
        max_events: int = 200,
        publish: Callable[[dict], None] | None = None,
    ):
        self.root = root
        self.name = root.name
        self.stall_after_s = stall_after_s
        self.max_buckets, self.max_events = max_buckets, max_events
        self.publish = publish  # used by the background exact indexing of big files
        self.lock = threading.RLock()
        run = RunDir(root)
        self.metrics_tail = FileTail(run.metrics)
        self.log_tail = FileTail(run.log)
        self.samples_tail = FileTail(run.samples)
        self.index = _MetricsIndex(max_buckets, max_events)
        self.log: deque[str] = deque(maxlen=log_lines)
        self.samples: deque[dict] = deque(maxlen=max_samples)
        self.exact = True  # False while a big file is shown from its preview sample
        self._primed = False
        self._last_status_key: Any = None
        self._last_status_sent = 0.0
        self._last_ck_key: Any = None
        self._last_ck_check = 0.0
        self._config: tuple[float, dict | None] = (-1.0, None)
        self.last_used = time.time()

    # ------------------------------------------------------------------ priming

    def _prime(self) -> None:
        """First read: index metrics.jsonl, and keep only the tail of the log and samples."""
        size = self.metrics_tail.size()
        if size > PREVIEW_BYTES:
            self.exact = False
            self.index.sample_preview(self.metrics_tail.path, size)
            # newest rows exactly, so the header numbers and speed are right at once
            start = _line_start_before(self.metrics_tail.path, size, 512 << 10)
            self.metrics_tail.skip_to(start)
            for lines in self.metrics_tail.read_chunks():
                rows, _ = parse_lines(lines)
                self.index.ingest(rows, want_points=False)
            threading.Thread(target=self._build_exact, args=(self.metrics_tail.offset,), daemon=True, name=f"index-{self.name}").start()
        else:
            self._read_metrics(publishing=False)
        for tail, keep in ((self.log_tail, 256 << 10), (self.samples_tail, 1 << 20)):
            size = tail.size()
            tail.skip_to(_line_start_before(tail.path, size, keep))
        self._read_log(publishing=False)
        self._read_samples(publishing=False)
        self._primed = True

    def _build_exact(self, preview_end: int) -> None:
        """Index a big metrics file exactly (background), then swap it in and ask clients to reload."""
        index = _MetricsIndex(self.max_buckets, self.max_events)
        tail = FileTail(self.metrics_tail.path)
        for lines in tail.read_chunks(until=preview_end):
            rows, bad = parse_lines(lines)
            index.bad_lines += bad
            index.ingest(rows, want_points=False)
        with self.lock:
            # catch up with what the live tail read meanwhile, then swap
            live_end = self.metrics_tail.offset
            for lines in tail.read_chunks(until=live_end):
                rows, bad = parse_lines(lines)
                index.bad_lines += bad
                index.ingest(rows, want_points=False)
            index.last = self.index.last
            index.rate = self.index.rate
            self.index, self.metrics_tail, self.exact = index, tail, True
        if self.publish:
            self.publish({"type": "resync", "reason": "exact index ready"})

    # ------------------------------------------------------------------ reading

    def _read_metrics(self, publishing: bool) -> list[dict]:
        msgs: list[dict] = []
        if self.metrics_tail.changed():
            self.metrics_tail.reset()
            self.index = _MetricsIndex(self.max_buckets, self.max_events)
            msgs.append({"type": "resync", "reason": "metrics.jsonl was replaced"})
            publishing = False
        for lines in self.metrics_tail.read_chunks():
            rows, bad = parse_lines(lines)
            self.index.bad_lines += bad
            live = publishing and len(rows) <= LIVE_ROW_LIMIT
            if publishing and not live:
                msgs.append({"type": "resync", "reason": f"{len(rows)} new rows at once"})
                publishing = False
            points, events = self.index.ingest(rows, want_points=live)
            if live and (points or events):
                msgs.append({"type": "metrics", "points": points, "events": events})
        return msgs

    def _read_log(self, publishing: bool) -> list[dict]:
        if self.log_tail.changed():
            self.log_tail.reset()
            self.log.clear()
        new: list[str] = []
        for lines in self.log_tail.read_chunks():
            text = [ln.decode("utf-8", errors="replace").rstrip("\r") for ln in lines]
            self.log.extend(text)
            if publishing:
                new.extend(text[-self.log.maxlen :] if self.log.maxlen else text)
        if publishing and new:
            return [{"type": "log", "lines": new[-(self.log.maxlen or len(new)) :]}]
        return []

    def _read_samples(self, publishing: bool) -> list[dict]:
        if self.samples_tail.changed():
            self.samples_tail.reset()
            self.samples.clear()
        new: list[dict] = []
        for lines in self.samples_tail.read_chunks():
            rows, _ = parse_lines(lines)
            rows = [clean_json(r) for r in rows]
            self.samples.extend(rows)
            new.extend(rows)
        if publishing and new:
            return [{"type": "samples", "samples": new[-(self.samples.maxlen or len(new)) :]}]
        return []

    def _read_config(self) -> dict | None:
        path = RunDir(self.root).config
        try:
            mtime = path.stat().st_mtime
        except OSError:
            return None
        if mtime != self._config[0]:
            cfg = read_json(path)
            self._config = (mtime, cfg if isinstance(cfg, dict) else None)
        return self._config[1]

    def summary(self, now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        ix = self.index
        s = build_summary(
            self.root, read_status(self.root), self._read_config(),
            ix.last["train"], ix.last["eval"], list(ix.rate), ix.best_val, now, self.stall_after_s,
        )
        s["rows"] = ix.rows
        s["bad_lines"] = ix.bad_lines
        s["partial_line"] = self.metrics_tail.has_partial_line
        s["exact"] = self.exact
        return s

    def refresh(self) -> list[dict]:
        """Read what was appended since last time; returns the messages for live clients."""
        with self.lock:
            self.last_used = time.time()
            if not self._primed:
                self._prime()
                return []
            msgs = self._read_metrics(True) + self._read_log(True) + self._read_samples(True)
            now = time.time()
            summary = self.summary(now)
            key = {k: v for k, v in summary.items() if k not in ("heartbeat_age_s", "server_time", "updated")}
            if key != self._last_status_key or now - self._last_status_sent > 5 or msgs:
                self._last_status_key, self._last_status_sent = key, now
                msgs.append({"type": "status", "summary": summary})
            if now - self._last_ck_check < 2.0:
                return msgs
            self._last_ck_check = now
            ck = list_checkpoints(self.root, self.index.val_by_step)
            ck_key = [(c["name"], c["complete"], c["latest"], c["best"], c["val_loss"]) for c in ck]
            if ck_key != self._last_ck_key:
                self._last_ck_key = ck_key
                msgs.append({"type": "checkpoints", "checkpoints": ck})
            return msgs

    def snapshot(self, base_url: str = "") -> dict[str, Any]:
        """Everything the page draws for this run (series already downsampled)."""
        with self.lock:
            self.refresh_and_publish()
            series = {k: s.points() for k, s in self.index.series.items()}
            return {
                "summary": self.summary(),
                "series": series,
                "events": list(self.index.events),
                "log": list(self.log),
                "samples": list(self.samples),
                "checkpoints": list_checkpoints(self.root, self.index.val_by_step),
                "links": report_links(self.root, base_url),
            }

    def refresh_and_publish(self) -> None:
        """Bring the state up to date and publish what is new, under the lock, so a snapshot
        taken under the same lock and the messages after it never overlap or leave a gap."""
        with self.lock:
            msgs = self.refresh()
            if self.publish:
                for m in msgs:
                    self.publish(m)

    def series_points(self, keys: list[str]) -> dict[str, tuple[list, list]]:
        with self.lock:
            self.refresh_and_publish()
            return {k: self.index.series[k].points() for k in keys if k in self.index.series}


def _line_start_before(path: Path, size: int, keep: int) -> int:
    """Offset of the first line start at or after `size - keep` (0 if the file is small)."""
    if size <= keep:
        return 0
    start = size - keep
    try:
        with open(path, "rb") as f:
            f.seek(start - 1)
            data = f.read(min(keep + 1, 1 << 20))
    except OSError:
        return 0
    nl = data.find(b"\n")
    return size if nl < 0 else start + nl
