"""Benchmark the curate stage: wall time, MB/s, peak RSS, counts per status and reason.

    python bench/bench_curate.py [CORPUS] [--workers N] [--out DIR] [--json]

CORPUS defaults to ../shared/corpus (beside the repository). Every run starts from an
empty output folder, so the reuse shortcut never hides the work. Peak RSS is measured
over this process and its worker processes (psutil, sampled every 50 ms).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path

import psutil

from simone.config import preset
from rich.console import Console

from simone.data.curate import curate, print_summary

DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"


class PeakRSS:
    """Largest summed RSS of this process and its children, sampled in a thread."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = me.memory_info().rss
            for child in me.children(recursive=True):
                try:
                    total += child.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("corpus", nargs="?", default=str(DEFAULT_CORPUS))
    ap.add_argument("--workers", type=int, default=0, help="0: one per core")
    ap.add_argument("--out", default=None, help="output folder (default: a temporary one, removed after)")
    ap.add_argument("--json", action="store_true", help="print the numbers as one JSON object too")
    args = ap.parse_args()

    cfg = preset("cpu")
    cfg.curate.workers = args.workers
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_curate_"))
    shutil.rmtree(out / "data", ignore_errors=True)
    try:
        t0 = time.perf_counter()
        with PeakRSS() as rss:
            result = curate(Path(args.corpus), out / "data", cfg, progress=False)
        wall = time.perf_counter() - t0
        print_summary(result, Console())
        numbers = {
            "corpus": args.corpus, "files": result.files, "mb": round(result.bytes_in / 1e6, 1),
            "wall_s": round(wall, 2), "mb_per_s": round(result.bytes_in / 1e6 / wall, 2),
            "peak_rss_mb": round(rss.peak / 1e6), "workers": args.workers or psutil.cpu_count(),
            "status": result.status_counts, "timings": result.timings, "reasons": result.reason_counts,
            "train_docs": result.documents_train, "val_docs": result.documents_val,
            "train_words": result.words_train, "val_words": result.words_val,
        }
        print(f"\nwall {wall:.1f} s · {numbers['mb_per_s']} MB/s · peak RSS {numbers['peak_rss_mb']} MB "
              f"(this process + workers) · {numbers['workers']} workers")
        print("steps (s): " + ", ".join(f"{k} {v}" for k, v in result.timings.items()))
        print("status: " + ", ".join(f"{k} {v}" for k, v in result.status_counts.items()))
        print("reasons: " + ", ".join(f"{k} {v}" for k, v in result.reason_counts.items()))
        if args.json:
            print(json.dumps(numbers))
    finally:
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
