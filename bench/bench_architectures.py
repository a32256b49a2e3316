"""The Llama-style model against the GPT-2 baseline at the same wall-clock budget (issue 3).

    python bench/bench_architectures.py --corpus ../shared/corpus --minutes 10
    python bench/bench_architectures.py --corpus ../shared/corpus --minutes 1 --out /tmp/arch

1. Prepares the corpus once (`simone prepare --preset PRESET`) into OUT/prepared
   (reused when OUT/prepared/data/index.json exists, unless --fresh).
2. Trains both architectures at the same time, each pinned to its own core (`taskset`,
   one torch thread) with `--max-minutes MINUTES`, into OUT/llama and OUT/gpt2; both run
   dirs link the prepared data/ and tokenizer/, so both see exactly the same tokens.
3. Validates both (`simone.inference.validation_report`: the same validation windows for both) and prints the
   table: validation bits-per-byte overall and per domain, training tokens/s, parameters,
   optimizer steps, tokens seen. Writes OUT/architectures.json.

Bits-per-byte (not loss) is the headline: it is what `simone validate` reports and it does
not depend on the tokenizer. On a shared machine the two runs also share memory bandwidth
and any load from other processes; the load average is printed with the table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ARCHES = ("llama", "gpt2")


def simone_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "simone", *args]


def prepare(corpus: Path, preset: str, prepared: Path, fresh: bool) -> None:
    if fresh:
        shutil.rmtree(prepared, ignore_errors=True)
    if (prepared / "data" / "index.json").exists() and (prepared / "tokenizer" / "tokenizer.json").exists():
        print(f"[arch] reusing {prepared}", flush=True)
        return
    print(f"[arch] prepare {corpus} → {prepared}", flush=True)
    t0 = time.perf_counter()
    subprocess.run(simone_cmd("prepare", "--data", str(corpus), "--preset", preset,
                              "--run-dir", str(prepared)), check=True)
    print(f"[arch] prepared in {time.perf_counter() - t0:.0f} s", flush=True)


def make_run_dir(prepared: Path, run_dir: Path) -> None:
    """A fresh run dir that links the prepared data/ and tokenizer/ (nothing is copied)."""
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    for name in ("data", "tokenizer"):
        (run_dir / name).symlink_to((prepared / name).resolve(), target_is_directory=True)


def start_training(arch: str, core: int | None, prepared: Path, run_dir: Path, minutes: float,
                   extra: list[str]) -> subprocess.Popen:
    cmd = simone_cmd("train", "--run-dir", str(run_dir), "--config", str(prepared / "config.json"),
                     "--set", f"model.arch={arch}", "--max-minutes", str(minutes), *extra)
    if core is not None and shutil.which("taskset"):
        cmd = ["taskset", "-c", str(core), *cmd]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    log = open(run_dir / "bench_train.out", "w", encoding="utf-8")  # noqa: SIM115 - closed by the child's exit
    print(f"[arch] {arch}: {' '.join(cmd)}", flush=True)
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def read_metrics(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    train = [r for r in rows if r.get("kind") == "train"]
    evals = [r for r in rows if r.get("kind") == "eval"]
    # The first logged interval includes start-up (and compilation); leave it out.
    speeds = [r["tokens_per_s"] for r in train[1:] or train if r.get("tokens_per_s")]
    mfus = [r["mfu"] for r in train[1:] or train if r.get("mfu") is not None]
    return {
        "steps": train[-1]["step"] if train else 0,
        "tokens_seen": train[-1].get("tokens_seen") if train else 0,
        "tokens_per_s": statistics.median(speeds) if speeds else None,
        "mfu": statistics.median(mfus) if mfus else None,
        "last_train_loss": train[-1]["loss"] if train else None,
        "trainer_val_bpb": evals[-1]["val_bpb"] if evals else None,
    }


def validate_run(run_dir: Path) -> dict:
    import torch

    from simone.inference.validation_report import validate

    torch.set_num_threads(1)
    report = validate(run_dir, out_dir=run_dir / "validation")
    return {"val_bpb": report.get("val_bpb"), "val_loss": report.get("val_loss"),
            "per_domain_bpb": {d: v.get("bpb") for d, v in (report.get("per_domain") or {}).items()},
            "params": report.get("params"), "ok": report.get("ok")}


def print_table(results: dict[str, dict], minutes: float) -> None:
    from rich.console import Console
    from rich.table import Table

    def fmt(v, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    table = Table(title=f"Llama-style vs GPT-2 baseline, {minutes:g} min each on one core",
                  caption=f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; "
                          f"val bpb from `simone validate` (lower is better)",
                  caption_justify="left")
    table.add_column("")
    for arch in results:
        table.add_column(arch, justify="right")
    lines = [("val bpb", "val_bpb", ".4f"), ("val loss", "val_loss", ".4f"),
             ("train tokens/s", "tokens_per_s", ",.0f"), ("MFU", "mfu", ".1%"),
             ("params", "params", ",d"), ("optimizer steps", "steps", ",d"),
             ("tokens seen", "tokens_seen", ",d"), ("last train loss", "last_train_loss", ".4f")]
    for label, key, spec in lines:
        table.add_row(label, *(fmt(r.get(key), spec) for r in results.values()))
    domains = sorted({d for r in results.values() for d in r.get("per_domain_bpb", {})})
    for d in domains:
        table.add_row(f"  bpb {d}", *(fmt(r.get("per_domain_bpb", {}).get(d), ".4f")
                                      for r in results.values()))
    Console(width=120).print(table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=Path("../shared/corpus"))
    ap.add_argument("--out", type=Path, default=Path("runs/bench-architectures"))
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--minutes", type=float, default=10.0, help="training budget per architecture")
    ap.add_argument("--fresh", action="store_true", help="prepare the data again")
    ap.add_argument("--sequential", action="store_true",
                    help="train one after the other (each may then use every core)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config override for both runs (repeatable)")
    args = ap.parse_args()

    out = args.out
    prepared = out / "prepared"
    prepare(args.corpus, args.preset, prepared, args.fresh)
    extra = [a for kv in args.overrides for a in ("--set", kv)]
    t0 = time.perf_counter()
    cores = list(range(os.cpu_count() or 1))
    procs = {}
    for i, arch in enumerate(ARCHES):
        make_run_dir(prepared, out / arch)
    if args.sequential:
        for arch in ARCHES:
            p = start_training(arch, None, prepared, out / arch, args.minutes, extra)
            if p.wait():
                sys.exit(f"[arch] {arch}: training failed (see {out / arch / 'bench_train.out'})")
    else:
        for i, arch in enumerate(ARCHES):
            core = cores[i % len(cores)] if len(cores) > 1 else None
            procs[arch] = start_training(arch, core, prepared, out / arch, args.minutes, extra)
        for arch, p in procs.items():
            if p.wait():
                sys.exit(f"[arch] {arch}: training failed (see {out / arch / 'bench_train.out'})")
    print(f"[arch] trained in {time.perf_counter() - t0:.0f} s; validating", flush=True)

    results = {}
    for arch in ARCHES:
        results[arch] = {**read_metrics(out / arch), **validate_run(out / arch)}
    print_table(results, args.minutes)
    summary = {"preset": args.preset, "minutes": args.minutes, "corpus": str(args.corpus),
               "load_average": os.getloadavg(), "results": results}
    (out / "architectures.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"[arch] wrote {out / 'architectures.json'}")


if __name__ == "__main__":
    main()
