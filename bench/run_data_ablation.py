"""Issue 24's experiment as one command: does a consistent corpus make a more consistent model?

    python bench/run_data_ablation.py                 # print the command
    python bench/run_data_ablation.py --run           # run it (about 2 hours on 2 CPU cores)
    python bench/run_data_ablation.py --run --resume  # continue it: finished runs are reused

The same model (the `cpu` preset's plain Llama-style model), the same tokenizer (trained once on
the curated corpus) and the same 2.5M training tokens (a step count, never minutes) on each of:
the curated corpus (`curated`, the reference), the corpus with curation off (`raw`), and the
curated corpus with contradictions injected into 10%, 30% and 60% of its training documents
(`c10`, `c30`, `c60`: negation, antonym and entity flips), and into 30% with negations only
(`c30neg`: does contradiction of one kind weaken the others?); 3 seeds each. Every run is read on
the same held-out documents (val and held-out bpb) and scored on the consistency suite built
once from them: minimal pairs per kind (balanced for length), last-word cloze, distinct-2.
No steering (`--samples-per-domain 0`): the data, not the steering, is under test.
The result is OUT/ablation.{md,json,svg}; the svg ends with the dose-response charts.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

DATA_VARIANTS = ["raw=raw", "c10=contradict:0.1", "c30=contradict:0.3", "c60=contradict:0.6",
                 "c30neg=contradict:0.3:negation"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    root = Path(__file__).resolve().parents[1]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", action="store_true", help="run it (without: print the command)")
    p.add_argument("--resume", action="store_true", help="reuse the runs OUT already finished")
    p.add_argument("--corpus", type=Path, default=root.parent / "shared" / "corpus")
    p.add_argument("--out", type=Path, default=root / "runs" / "data_ablation")
    p.add_argument("--preset", default="cpu")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--tokens-per-variant", dest="tokens_per_variant", type=int, default=2_500_000)
    p.add_argument("--heldout-batches", dest="heldout_batches", type=int, default=25,
                   help="held-out batches per domain (the suite reads the same documents besides)")
    p.add_argument("--suite-items", dest="suite_items", type=int, default=100)
    p.add_argument("--data-variant", dest="data_variants", action="append", default=None, metavar="NAME=SPEC",
                   help=f"instead of the default ({', '.join(DATA_VARIANTS)})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return p.parse_args(argv)


def ablate_command(args: argparse.Namespace) -> list[str]:
    cmd = [sys.executable, "-m", "simone", "ablate", "--data", str(args.corpus), "--preset", args.preset,
           "--out", str(args.out), "--seeds", str(args.seeds), "--tokens-per-variant", str(args.tokens_per_variant),
           "--samples-per-domain", "0", "--heldout-batches", str(args.heldout_batches),
           "--suite-items", str(args.suite_items)]
    for item in args.data_variants or DATA_VARIANTS:
        cmd += ["--data-variant", item]
    for item in args.overrides:
        cmd += ["--set", item]
    if args.resume:
        cmd.append("--resume")
    return cmd


def main() -> None:
    args = parse_args()
    cmd = ablate_command(args)
    print("$ " + " ".join(cmd), flush=True)
    if args.run:
        sys.exit(subprocess.call(cmd))


if __name__ == "__main__":
    main()
