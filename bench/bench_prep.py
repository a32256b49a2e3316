"""Benchmark the data preparation stages: (curate →) tokenizer training → token shards.

    python bench/bench_prep.py --corpus /work/shared/corpus --out /tmp/bench_prep
    python bench/bench_prep.py --documents RUN/data/documents.jsonl --out /tmp/bench_prep

Reports wall time, CPU time / wall (≈ cores used) and peak RSS (sampled every 20 ms) of
each stage. With `--corpus`, documents.jsonl comes from `simone.data.curate.curate` when
that module exists, else from a naive reader (`--naive`): header block stripped, every
tenth file of a domain held out for validation. Each run starts fresh (no stage is
skipped by its stamp) unless `--keep` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import threading
import time
from pathlib import Path

import psutil

from simone.config import preset
from simone.data.shards import build_shards
from simone.tokenizer import train_tokenizer


class Measure:
    """Wall time, CPU time and peak RSS of the code inside a `with` block."""

    def __init__(self, name: str):
        self.name = name
        self.proc = psutil.Process()

    def __enter__(self) -> "Measure":
        self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self.cpu0 = sum(self.proc.cpu_times()[:2])
        self.t0 = time.perf_counter()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.t0
        self.cpu = sum(self.proc.cpu_times()[:2]) - self.cpu0
        self._stop.set()
        self._thread.join()
        print(f"{self.name:<10} wall {self.wall:7.2f} s   cpu {self.cpu:7.2f} s"
              f"   cpu/wall {self.cpu / max(self.wall, 1e-9):4.2f}"
              f"   peak RSS {self.peak / 2**20:7.0f} MiB", flush=True)

    def row(self) -> dict:
        return {"stage": self.name, "wall_s": round(self.wall, 3), "cpu_s": round(self.cpu, 3),
                "peak_rss_mib": round(self.peak / 2**20, 1)}


def naive_documents(corpus: Path, out: Path) -> Path:
    """documents.jsonl from a DOMAIN/SUBDOMAIN/*.txt tree without any cleaning."""
    files = sorted(corpus.rglob("*.txt"))
    seen_per_domain: dict[str, int] = {}
    with open(out, "w", encoding="utf-8") as f:
        for path in files:
            rel = path.relative_to(corpus)
            if len(rel.parts) < 3:
                continue
            domain, subdomain = rel.parts[0], rel.parts[1]
            raw = path.read_text(encoding="utf-8", errors="replace")
            head, sep, body = raw.partition("\n" + "=" * 20)
            text = body.split("\n", 1)[1] if sep and "\n" in body else raw
            k = seen_per_domain.get(domain, 0)
            seen_per_domain[domain] = k + 1
            row = {"id": str(rel), "path": str(rel), "domain": domain, "subdomain": subdomain,
                   "title": path.stem, "author": "", "split": "val" if k % 10 == 5 else "train",
                   "status": "ok", "quality_score": 1.0, "text": text.strip()}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--corpus", type=Path, help="corpus tree (curated first)")
    src.add_argument("--documents", type=Path, help="an existing documents.jsonl")
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_prep"))
    ap.add_argument("--preset", default="h200", help="config preset (sets the vocabulary size)")
    ap.add_argument("--vocab-size", type=int, default=None)
    ap.add_argument("--naive", action="store_true", help="skip curation: naive reader")
    ap.add_argument("--keep", action="store_true", help="keep earlier outputs (measures the skip path)")
    args = ap.parse_args()

    cfg = preset(args.preset)
    if args.vocab_size:
        cfg.tokenizer.vocab_size = args.vocab_size
    if not args.keep:
        shutil.rmtree(args.out, ignore_errors=True)
    data_dir = args.out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    print(f"cores {os.cpu_count()}  vocab {cfg.tokenizer.vocab_size}", flush=True)

    if args.documents:
        documents = args.documents
    else:
        try:
            if args.naive:
                raise ImportError
            from simone.data.curate import curate
        except ImportError:
            with Measure("naive-read") as m:
                documents = naive_documents(args.corpus, data_dir / "documents.jsonl")
        else:
            with Measure("curate") as m:
                curate(args.corpus, data_dir, cfg)
            documents = data_dir / "documents.jsonl"
        rows.append(m.row())
    print(f"documents  {documents}  {documents.stat().st_size / 2**20:.1f} MiB", flush=True)

    with Measure("tokenizer") as m:
        tok = train_tokenizer(documents, args.out / "tokenizer", cfg.tokenizer)
    rows.append(m.row())
    with Measure("shards") as m:
        index = build_shards(documents, tok, data_dir)
    rows.append(m.row())

    total = sum(r["wall_s"] for r in rows)
    peak = max(r["peak_rss_mib"] for r in rows)
    splits = {s: {k: v[k] for k in ("n_tokens", "n_bytes", "n_docs")} for s, v in index["splits"].items()}
    cpu = sum(r["cpu_s"] for r in rows)
    print(f"{'total':<10} wall {total:7.2f} s   cpu {cpu:7.2f} s   peak RSS {peak:7.0f} MiB"
          f"   vocab {tok.vocab_size}   (load average {os.getloadavg()[0]:.1f})", flush=True)
    for s, v in splits.items():
        bpt = v["n_bytes"] / max(v["n_tokens"], 1)
        print(f"  {s}: {v['n_docs']} docs, {v['n_tokens']:,} tokens, {bpt:.2f} bytes/token")
    summary = {"stages": rows, "total_wall_s": round(total, 3), "total_cpu_s": round(cpu, 3),
               "peak_rss_mib": peak, "vocab_size": tok.vocab_size, "splits": splits}
    (args.out / "bench_prep.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
