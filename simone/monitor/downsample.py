"""A metric series that stays small however long the run: bucketed min/max downsampling.

Raw points are grouped into buckets of `width` consecutive points; each bucket keeps its
lowest and its highest point, so a loss spike survives downsampling (a plain average or a
stride would hide it). When the buckets fill up, neighbours are merged in pairs and the
width doubles, so memory is bounded by `max_buckets` whatever the number of rows.
Points are added one at a time (live tailing) or as NumPy arrays (indexing a big file).
"""

from __future__ import annotations

import math

import numpy as np

# A closed bucket: (x of its lowest point, lowest y, x of its highest point, highest y).
Bucket = tuple[float, float, float, float]


class MinMaxSeries:
    """x/y points of one metric: fewer than `2 * max_buckets` buckets of at most two
    points each (plus the first and the newest raw point), so at most `4 * max_buckets + 4` however many were added."""

    def __init__(self, max_buckets: int = 600):
        self.max_buckets = max_buckets
        self.width = 1  # raw points per bucket; doubles when the buckets fill up
        self.count = 0  # raw points seen
        self._closed: list[Bucket] = []
        self._open_n = 0
        self._open: list[float] = [0.0, math.inf, 0.0, -math.inf]
        self._first: tuple[float, float] | None = None
        self._last: tuple[float, float] | None = None

    # ------------------------------------------------------------------ adding points

    def add(self, x: float, y: float) -> None:
        """Add one point; non-finite values (a NaN loss) are skipped."""
        if not (math.isfinite(x) and math.isfinite(y)):
            return
        b = self._open
        if y < b[1]:
            b[0], b[1] = x, y
        if y > b[3]:
            b[2], b[3] = x, y
        self._open_n += 1
        self.count += 1
        if self._first is None:
            self._first = (x, y)
        self._last = (x, y)
        if self._open_n >= self.width:
            self._close_open()

    def add_many(self, xs: np.ndarray, ys: np.ndarray) -> None:
        """Add many points at once (vectorised; same result as calling `add` in order)."""
        xs = np.asarray(xs, dtype=np.float64)
        ys = np.asarray(ys, dtype=np.float64)
        ok = np.isfinite(xs) & np.isfinite(ys)
        if not ok.all():
            xs, ys = xs[ok], ys[ok]
        n, i = len(xs), 0
        while i < n:
            if self._open_n or n - i < self.width:
                # top up the open bucket point by point (at most `width` points)
                take = min(self.width - self._open_n, n - i)
                for x, y in zip(xs[i : i + take].tolist(), ys[i : i + take].tolist()):
                    self.add(x, y)
                i += take
                continue
            room = 2 * self.max_buckets - len(self._closed)
            k = min((n - i) // self.width, max(room, 1))
            w = self.width
            bx = xs[i : i + k * w].reshape(k, w)
            by = ys[i : i + k * w].reshape(k, w)
            rows = np.arange(k)
            lo, hi = by.argmin(axis=1), by.argmax(axis=1)
            self._closed.extend(
                zip(bx[rows, lo].tolist(), by[rows, lo].tolist(), bx[rows, hi].tolist(), by[rows, hi].tolist())
            )
            self.count += k * w
            if self._first is None:
                self._first = (float(xs[i]), float(ys[i]))
            self._last = (float(xs[i + k * w - 1]), float(ys[i + k * w - 1]))
            i += k * w
            self._maybe_merge()

    def _close_open(self) -> None:
        self._closed.append(tuple(self._open))  # type: ignore[arg-type]
        self._open_n = 0
        self._open = [0.0, math.inf, 0.0, -math.inf]
        self._maybe_merge()

    def _maybe_merge(self) -> None:
        if len(self._closed) < 2 * self.max_buckets:
            return
        merged: list[Bucket] = []
        closed = self._closed
        for j in range(0, len(closed) - 1, 2):
            a, b = closed[j], closed[j + 1]
            lo = (a[0], a[1]) if a[1] <= b[1] else (b[0], b[1])
            hi = (a[2], a[3]) if a[3] >= b[3] else (b[2], b[3])
            merged.append((lo[0], lo[1], hi[0], hi[1]))
        if len(closed) % 2:
            merged.append(closed[-1])
        self._closed = merged
        self.width *= 2

    # ------------------------------------------------------------------ reading points

    @property
    def last(self) -> tuple[float, float] | None:
        return self._last

    def points(self) -> tuple[list[float], list[float]]:
        """The downsampled points in order, from the first raw point to the newest."""
        xs: list[float] = []
        ys: list[float] = []
        buckets = list(self._closed)
        if self._open_n:
            buckets.append(tuple(self._open))  # type: ignore[arg-type]
        for x_lo, y_lo, x_hi, y_hi in buckets:
            if x_lo == x_hi and y_lo == y_hi:
                xs.append(x_lo)
                ys.append(y_lo)
            elif x_lo <= x_hi:
                xs += (x_lo, x_hi)
                ys += (y_lo, y_hi)
            else:
                xs += (x_hi, x_lo)
                ys += (y_hi, y_lo)
        if self._first is not None and (not xs or (xs[0], ys[0]) != self._first):
            xs.insert(0, self._first[0])
            ys.insert(0, self._first[1])
        if self._last is not None and (not xs or (xs[-1], ys[-1]) != self._last):
            xs.append(self._last[0])
            ys.append(self._last[1])
        return xs, ys

    def __len__(self) -> int:
        return len(self._closed) + (1 if self._open_n else 0)
