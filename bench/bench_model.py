"""Our model against `transformers.LlamaForCausalLM` on the same config and the same weights.

    python bench/bench_model.py                          # the `cpu` preset shape, on the CPU
    python bench/bench_model.py --threads 1 --dtype bfloat16 --no-compile
    python bench/bench_model.py --preset h200-350m --device cuda
    python bench/bench_model.py --dim 512 --n-layers 8 --n-heads 8 --seq 512 --batch 8

A thin wrapper over `simone.workflows.bench.bench_train` and `bench_generate` (the same code as
`simone bench train|generate`) that also lets you set the model shape by hand.
Training: tokens/s of one step (forward, backward, AdamW step) on a fixed random batch,
eager and `torch.compile`d. Generation: new tokens/s of greedy decoding with a KV cache
(`transformers`: `generate(do_sample=False)` with its default dynamic cache).
"""

from __future__ import annotations

import argparse
import json

from rich.console import Console

from simone.workflows.bench import bench_generate, bench_train, tables
from simone.config import preset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu", help="model shape, batch and optimizer settings")
    ap.add_argument("--dim", type=int, default=None)
    ap.add_argument("--n-layers", type=int, default=None)
    ap.add_argument("--n-heads", type=int, default=None)
    ap.add_argument("--n-kv-heads", type=int, default=None)
    ap.add_argument("--vocab", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None, help="training batch (default: the preset's)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=16, help="generation prompt length")
    ap.add_argument("--new-tokens", type=int, default=128, help="tokens generated per repeat")
    ap.add_argument("--gen-batch", type=int, action="append", default=None,
                    help="generation batch size (repeatable; default 1 and 8)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", action="append", choices=["float32", "bfloat16", "float16"],
                    default=None, help="repeatable; default float32+bfloat16 on CPU")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--skip-generate", action="store_true")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()

    model_cfg = preset(args.preset).model
    for field, value in (("dim", args.dim), ("n_layers", args.n_layers), ("n_heads", args.n_heads),
                         ("n_kv_heads", args.n_kv_heads), ("vocab_size", args.vocab),
                         ("max_seq_len", args.seq)):
        if value is not None:
            setattr(model_cfg, field, value)
    common = dict(preset=args.preset, repeats=args.repeats, threads=args.threads or None,
                  device=args.device, dtypes=args.dtype, model_cfg=model_cfg, say=print)
    results = {}
    if not args.skip_train:
        results["train"] = bench_train(warmup=args.warmup, batch=args.batch,
                                       compile=not args.no_compile, **common)
    if not args.skip_generate:
        results["generate"] = bench_generate(warmup=max(1, args.warmup - 1),
                                             batches=args.gen_batch or (1, 8),
                                             prompt_len=args.prompt, new_tokens=args.new_tokens,
                                             compile=not args.no_compile, **common)
    for result in results.values():
        Console(width=150).print(*tables(result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
