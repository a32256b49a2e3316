"""How numbers with units read to a person (one spelling everywhere: console, dashboard, summaries)."""

from __future__ import annotations

import math


def format_duration(seconds: float | None, unknown: str = "–") -> str:
    """Seconds as "42s", "1m 15s", "1h 05m" or "2d 3h"; `unknown` for None, NaN or infinity."""
    if seconds is None or not math.isfinite(seconds):
        return unknown
    s = round(max(0.0, seconds))
    d, h, m = s // 86400, (s % 86400) // 3600, (s % 3600) // 60
    if d:
        return f"{d}d {h}h"
    if h:
        return f"{h}h {m:02d}m"
    if m:
        return f"{m}m {s % 60:02d}s"
    return f"{s}s"
