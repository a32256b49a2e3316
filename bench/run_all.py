"""Every comparison benchmark in one go: `simone bench prep`, `train` and `generate`, then
(with --architectures) the Llama-vs-GPT-2 budget run; one summary JSON at the end.

    python bench/run_all.py --corpus ../shared/corpus --threads 1 --out bench-results
    python bench/run_all.py --corpus ../shared/corpus --architectures --minutes 10

Each benchmark also writes its own JSON into OUT (train.json, generate.json, prep.json);
OUT/summary.json holds them all with each one's headline: "ratio" (ours over
transformers) for train and generate, "seconds" and "peak_rss_mb" for prep.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from simone.workflows.bench import GOALS, bench_generate, bench_prep, bench_train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=Path("../shared/corpus"))
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    ap.add_argument("--skip", action="append", default=[], choices=["train", "generate", "prep"])
    ap.add_argument("--architectures", action="store_true",
                    help="also run bench/bench_architectures.py (takes --minutes)")
    ap.add_argument("--minutes", type=float, default=10.0)
    args = ap.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    common = dict(preset=args.preset, repeats=args.repeats, threads=args.threads)
    results = {}
    # prep first: its peak RSS is this process's, which must not include the models yet
    if "prep" not in args.skip:
        results["prep"] = bench_prep(args.corpus, preset=args.preset, threads=args.threads,
                                     json_path=args.out / "prep.json")
    if "train" not in args.skip:
        results["train"] = bench_train(compile=not args.no_compile,
                                       json_path=args.out / "train.json", **common)
    if "generate" not in args.skip:
        results["generate"] = bench_generate(compile=not args.no_compile,
                                             json_path=args.out / "generate.json", **common)
    if args.architectures:
        script = Path(__file__).with_name("bench_architectures.py")
        subprocess.run([sys.executable, str(script), "--corpus", str(args.corpus),
                        "--preset", args.preset, "--minutes", str(args.minutes),
                        "--out", str(args.out / "architectures")], check=True)
        results["architectures"] = json.loads(
            (args.out / "architectures" / "architectures.json").read_text())

    headlines = {}
    for kind in ("train", "generate"):
        if kind in results:
            r = results[kind]
            headlines[kind] = {"ratio": round(r["ratio"], 3), "goal": GOALS[kind],
                               "met": r["ratio"] >= GOALS[kind], "headline": r["headline"]}
    if "prep" in results:
        r = results["prep"]
        headlines["prep"] = {"seconds": r["seconds"], "peak_rss_mb": r["peak_rss_mb"],
                             "met": r["seconds"] <= GOALS["prep_seconds"]
                             and r["peak_rss_mb"] <= GOALS["prep_peak_rss_mb"]}
    (args.out / "summary.json").write_text(json.dumps({"headlines": headlines, **results},
                                                      indent=2, default=str) + "\n")
    print(json.dumps(headlines, indent=2))


if __name__ == "__main__":
    main()
