"""Reading metrics.jsonl (and the other JSON-lines files of a run): tails, parsed rows,
chartable points and the downsampled index of a whole file.

Everything here only reads. A trailing half-written line is held back until its newline
arrives, and a file is read in bounded pieces however big it is.
"""

from __future__ import annotations

import json
import math
import os
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from simone.monitor.downsample import MinMaxSeries

TRAIN_KEYS = ("loss", "lr", "grad_norm", "tokens_per_s", "mfu")
EVAL_KEYS = ("val_loss", "val_bpb", "val_ppl")
DOMAIN_KEYS = ("loss", "bpb")
SYSTEM_KEYS = ("cpu_percent", "ram_used_gb", "rss_gb", "disk_free_gb")
GPU_KEYS = ("util", "mem_used_gb", "temp_c", "power_w")

CHUNK_BYTES = 8 << 20  # read big files in pieces so memory stays flat
MAX_PENDING_BYTES = 16 << 20  # a "line" longer than this without a newline is dropped
PREVIEW_PROBES = 3000  # places a big file is sampled at for its first view
MAX_JSON_DEPTH = 64  # deeper values from run files are sent as null (no recursion limit hit later)

# What parsing a hostile file can raise: ValueError (bad JSON, bad UTF-8, an integer over
# Python's int-string limit) and RecursionError (deeply nested arrays/objects).
JSON_ERRORS = (ValueError, RecursionError)


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
    lines = data[:end].split(b"\n")
    return lines[1:] if start > 0 else lines  # the first line was cut by the seek


def tail_rows(path: Path, max_bytes: int = 256 << 10) -> list[dict]:
    """The JSON rows in the last `max_bytes` of a JSON-lines file."""
    return parse_lines(read_tail_lines(path, max_bytes))[0]


def finite_number(v: Any) -> float | None:
    """v as a finite float; None for anything else (text, a flag, NaN, a 400-digit integer)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        v = float(v)
    except OverflowError:  # an integer beyond float range (a 400-digit number)
        return None
    return v if math.isfinite(v) else None


def _column(rows: list[dict], key: str) -> np.ndarray:
    """rows[i][key] as float64, NaN where missing or not a number."""
    values = [r.get(key) for r in rows]
    try:
        arr = np.array(values, dtype=np.float64)
        if arr.ndim == 1 and not any(v is True or v is False for v in values):
            return arr
    except (TypeError, ValueError, OverflowError):
        pass
    return np.array([finite_number(v) if finite_number(v) is not None else np.nan for v in values], dtype=np.float64)


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
        x = finite_number(row.get("step"))
        if x is None:
            return out
        for k in TRAIN_KEYS if kind == "train" else EVAL_KEYS:
            y = finite_number(row.get(k))
            if y is not None:
                out.append((f"{kind}/{k}", x, y))
        per_domain = row.get("per_domain") if kind == "eval" else None
        if isinstance(per_domain, dict):
            for domain, vals in per_domain.items():
                if isinstance(vals, dict):
                    for k in DOMAIN_KEYS:
                        y = finite_number(vals.get(k))
                        if y is not None:
                            out.append((f"domain/{domain}/{k}", x, y))
    elif kind == "system":
        x = finite_number(row.get("t"))
        if x is None:
            return out
        for k in SYSTEM_KEYS:
            y = finite_number(row.get(k))
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
                    y = finite_number(g.get(k))
                    if y is not None:
                        out.append((f"gpu{idx}/{k}", x, y))
    return out


def _points_by_series(rows: list[dict]) -> dict[str, tuple[list[float], list[float]]]:
    """The chartable points of rows, gathered per series key: {key: (xs, ys)}."""
    cols: dict[str, tuple[list[float], list[float]]] = {}
    for row in rows:
        for key, x, y in flatten_row(row):
            xs, ys = cols.setdefault(key, ([], []))
            xs.append(x)
            ys.append(y)
    return cols


class FileTail:
    """New complete lines of a growing file, read from a remembered offset.

    A trailing partial line is held back until its newline arrives. If the file is
    replaced or truncated, `changed()` says so and `reset()` starts again from the top."""

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
            f = open(self.path, "rb")  # noqa: SIM115  # only the open's OSError means "nothing yet"; `with f` below
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


class MetricsIndex:
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
        for row in by_kind["train"][-(self.rate.maxlen or 64) :]:
            t, st = finite_number(row.get("t")), finite_number(row.get("step"))
            if t is not None and st is not None:
                if self.rate and st < self.rate[-1][1]:
                    self.rate.clear()  # a rollback: speed restarts from here
                self.rate.append((t, st))
        for row in by_kind["eval"]:
            v, st = finite_number(row.get("val_loss")), finite_number(row.get("step"))
            if v is not None:
                self.best_val = v if self.best_val is None else min(self.best_val, v)
                if st is not None and len(self.val_by_step) < 100_000:
                    self.val_by_step[int(st)] = v

        if want_points or len(rows) <= 256:
            cols = _points_by_series(rows)
            for key, (xs, ys) in cols.items():
                series = self._series(key)
                for x, y in zip(xs, ys):
                    series.add(x, y)
            return (cols if want_points else {}), new_events

        self._add_columns(by_kind["train"], "step", TRAIN_KEYS, "train")
        self._add_columns(by_kind["system"], "t", SYSTEM_KEYS, "system")
        # eval rows are few; GPUs are nested lists
        nested = by_kind["eval"] + [
            {"kind": "system", "t": r.get("t"), "gpus": r.get("gpus")} for r in by_kind["system"]
        ]
        for key, (xs, ys) in _points_by_series(nested).items():
            self._series(key).add_many(np.asarray(xs), np.asarray(ys))
        return {}, new_events

    def _series(self, key: str) -> MinMaxSeries:
        if key not in self.series:
            self.series[key] = MinMaxSeries(self.max_buckets)
        return self.series[key]

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
                lines.extend(f.read(4096).split(b"\n")[1:-1][:6])  # whole lines only
        rows, _ = parse_lines(lines)
        rows.sort(key=lambda r: finite_number(r.get("t")) or 0.0)
        self.ingest(rows, want_points=False)


def line_start_before(path: Path, size: int, keep: int) -> int:
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
