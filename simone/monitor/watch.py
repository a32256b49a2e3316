"""`RunWatch`: one run's live dashboard state, kept up to date from remembered file offsets.

Bounded downsampled series per metric, the last log lines, samples and events. A file is
never re-read from the start for an update, and a trailing half-written line is held back
until its newline arrives.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from simone.monitor.metrics_tail import FileTail, MetricsIndex, clean_json, line_start_before, parse_lines
from simone.monitor.runs import build_summary, checkpoint_rows, read_status, report_links
from simone.rundir import RunDir, read_json

LIVE_ROW_LIMIT = 5000  # more new rows than this in one refresh: clients reload instead
PREVIEW_BYTES = 48 << 20  # metrics files above this open from a sample, then go exact


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
        self.index = MetricsIndex(max_buckets, max_events)
        self.log: deque[str] = deque(maxlen=log_lines)
        self.samples: deque[dict] = deque(maxlen=max_samples)
        self.exact = True  # False while a big file is shown from its preview sample
        self._primed = False
        self._last_status_key: Any = None
        self._last_status_sent = 0.0
        self._last_ck_key: Any = None
        self._last_ck_check = 0.0
        self._config: tuple[float, Any] = (-1.0, None)
        self.last_used = time.time()

    # ------------------------------------------------------------------ priming

    def _prime(self) -> None:
        """First read: index metrics.jsonl, and keep only the tail of the log and samples."""
        size = self.metrics_tail.size()
        if size > PREVIEW_BYTES:
            self.exact = False
            self.index.sample_preview(self.metrics_tail.path, size)
            # newest rows exactly, so the header numbers and speed are right at once
            start = line_start_before(self.metrics_tail.path, size, 512 << 10)
            self.metrics_tail.skip_to(start)
            for lines in self.metrics_tail.read_chunks():
                rows, _ = parse_lines(lines)
                self.index.ingest(rows, want_points=False)
            threading.Thread(
                target=self._build_exact, args=(self.metrics_tail.offset,), daemon=True, name=f"index-{self.name}"
            ).start()
        else:
            self._read_metrics(publishing=False)
        for tail, keep in ((self.log_tail, 256 << 10), (self.samples_tail, 1 << 20)):
            size = tail.size()
            tail.skip_to(line_start_before(tail.path, size, keep))
        self._read_log(publishing=False)
        self._read_samples(publishing=False)
        self._primed = True

    def _build_exact(self, preview_end: int) -> None:
        """Index a big metrics file exactly (background), then swap it in and ask clients to reload."""
        index = MetricsIndex(self.max_buckets, self.max_events)
        tail = FileTail(self.metrics_tail.path)
        for lines in tail.read_chunks(until=preview_end):
            rows, bad = parse_lines(lines)
            index.bad_lines += bad
            index.ingest(rows, want_points=False)
        with self.lock:
            # catch up with what the live tail read meanwhile, then swap
            for lines in tail.read_chunks(until=self.metrics_tail.offset):
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
            self.index = MetricsIndex(self.max_buckets, self.max_events)
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

    def _read_config(self) -> Any:
        path = RunDir(self.root).config
        try:
            mtime = path.stat().st_mtime
        except OSError:
            return None
        if mtime != self._config[0]:
            self._config = (mtime, read_json(path))
        return self._config[1]

    def summary(self, now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        ix = self.index
        s = build_summary(
            self.root,
            read_status(self.root),
            self._read_config(),
            ix.last["train"],
            ix.last["eval"],
            list(ix.rate),
            ix.best_val,
            now,
            self.stall_after_s,
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
            ck = checkpoint_rows(self.root, self.index.val_by_step)
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
                "checkpoints": checkpoint_rows(self.root, self.index.val_by_step),
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
