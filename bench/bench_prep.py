"""Benchmark the data preparation: curate → tokenizer training → token shards.

    python bench/bench_prep.py --corpus ../shared/corpus
    python bench/bench_prep.py --corpus ../shared/corpus --preset h200 --out /tmp/bench_prep
    python bench/bench_prep.py --corpus /tmp/simone-jsonl-corpus --workers 1   # see make_jsonl_corpus.py

A thin wrapper over `simone.workflows.bench.bench_prep` (the same code as `simone bench prep`):
wall time, CPU time, cores used and peak RSS (this process and its workers, sampled every
20 ms) of each stage and in total. Every run starts fresh. `--workers N`: as `simone prepare
--workers N` (N processes curate and tokenize the shards, N threads train the tokenizer).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from simone.workflows.bench import bench_prep, tables


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=Path("../shared/corpus"))
    ap.add_argument("--out", type=Path, default=None,
                    help="keep the outputs here (default: a temporary folder, removed)")
    ap.add_argument("--preset", default="cpu", help="config preset (sets the vocabulary size)")
    ap.add_argument("--vocab-size", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--workers", type=int, default=None, help="default: one per core")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args()
    result = bench_prep(args.corpus, preset=args.preset, out_dir=args.out, threads=args.threads,
                        vocab_size=args.vocab_size, json_path=args.json, workers=args.workers)
    Console(width=150).print(*tables(result))


if __name__ == "__main__":
    main()
