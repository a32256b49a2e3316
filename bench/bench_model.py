"""Our model against `transformers.LlamaForCausalLM` on the same config and the same weights.

    python bench/bench_model.py                 # the `cpu` preset shape, on the CPU
    python bench/bench_model.py --device cuda --dtype bfloat16 --batch 32 --dim 768 ...

Training: tokens/s of one step (forward, backward, AdamW step) on a fixed random batch.
Generation: new tokens/s of greedy decoding with a KV cache from a short prompt
(`transformers`: `generate(do_sample=False)` with its default dynamic cache).
The two models are timed in alternation, repeat after repeat, and the median is reported,
so load from other processes on the machine hits both alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from simone.config import ModelConfig
from simone.export import to_hf_llama
from simone.model import build_model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) that fn takes."""
    sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - start, time.process_time() - cpu_start


def compare(label: str, times: dict[str, list[tuple[float, float]]], work: float, unit: str,
            note: str = "") -> dict[str, float]:
    """Print and return ours vs hf throughput: median wall time, and min CPU time (the CPU
    time of a single-threaded run is barely touched by other processes on a shared machine)."""
    wall = {k: work / statistics.median(w for w, _ in v) for k, v in times.items()}
    cpu = {k: work / min(c for _, c in v) for k, v in times.items()}
    print(f"{label:8s} ours {wall['ours']:9.0f} {unit}   hf {wall['hf']:9.0f} {unit}   "
          f"ratio {wall['ours'] / wall['hf']:.2f}x (median wall)   "
          f"ratio {cpu['ours'] / cpu['hf']:.2f}x (min CPU time){note}")
    return {"ours_per_s": wall["ours"], "hf_per_s": wall["hf"], "ratio": wall["ours"] / wall["hf"],
            "ours_per_cpu_s": cpu["ours"], "hf_per_cpu_s": cpu["hf"],
            "ratio_cpu_time": cpu["ours"] / cpu["hf"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--n-layers", type=int, default=4)
    ap.add_argument("--n-heads", type=int, default=4)
    ap.add_argument("--n-kv-heads", type=int, default=None)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=16, help="generation prompt length")
    ap.add_argument("--new-tokens", type=int, default=128, help="tokens generated per repeat")
    ap.add_argument("--gen-batch", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--skip-generate", action="store_true")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = ModelConfig(vocab_size=args.vocab, dim=args.dim, n_layers=args.n_layers,
                      n_heads=args.n_heads, n_kv_heads=args.n_kv_heads, max_seq_len=args.seq)
    torch.manual_seed(0)
    ours = build_model(cfg).to(device)
    hf = to_hf_llama(ours)  # same weights (a copy), same device
    amp_dtype = torch.bfloat16 if args.dtype == "bfloat16" else None
    print(f"device={device} threads={torch.get_num_threads()} dtype={args.dtype} "
          f"params={ours.num_params() / 1e6:.2f}M dim={args.dim} layers={args.n_layers} "
          f"heads={args.n_heads} kv_heads={args.n_kv_heads or args.n_heads} vocab={args.vocab} "
          f"seq={args.seq} batch={args.batch}")
    results: dict[str, object] = {"config": vars(args)}

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    if not args.skip_train:
        g = torch.Generator().manual_seed(1)
        data = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g).to(device)
        x, y = data[:, :-1], data[:, 1:]
        opt_ours = ours.configure_optimizer(1e-4, 0.1, (0.9, 0.95), device.type)
        opt_hf = torch.optim.AdamW(hf.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                                   fused=device.type in ("cuda", "cpu"))
        ours.train()
        hf.train()

        def step_ours() -> None:
            with autocast():
                _, loss = ours(x, y)
            loss.backward()
            opt_ours.step()
            opt_ours.zero_grad(set_to_none=True)

        def step_hf() -> None:
            with autocast():
                loss = hf(input_ids=x, labels=x, use_cache=False).loss
            loss.backward()
            opt_hf.step()
            opt_hf.zero_grad(set_to_none=True)

        times: dict[str, list[tuple[float, float]]] = {"ours": [], "hf": []}
        for r in range(args.warmup + args.repeats):
            for name, fn in (("ours", step_ours), ("hf", step_hf)):
                t = timed(fn, device)
                if r >= args.warmup:
                    times[name].append(t)
        results["train"] = compare("train", times, args.batch * args.seq, "tok/s",
                                   f"   ({args.repeats} repeats)")
        results["train"]["times_s"] = times
        ours.eval()
        hf.eval()

    if not args.skip_generate:
        g = torch.Generator().manual_seed(2)
        prompt = torch.randint(0, args.vocab, (args.gen_batch, args.prompt), generator=g).to(device)
        n_new = min(args.new_tokens, args.seq - args.prompt)
        out: dict[str, torch.Tensor] = {}

        def gen_ours() -> None:
            with autocast():
                out["ours"] = torch.cat(list(ours.generate(prompt, n_new, temperature=0.0)), 1)

        def gen_hf() -> None:
            with torch.no_grad(), autocast():
                seq = hf.generate(prompt, max_new_tokens=n_new, min_new_tokens=n_new,
                                  do_sample=False, use_cache=True, pad_token_id=0, eos_token_id=None)
            out["hf"] = seq[:, args.prompt:]

        times = {"ours": [], "hf": []}
        for r in range(args.warmup + args.repeats):
            for name, fn in (("ours", gen_ours), ("hf", gen_hf)):
                t = timed(fn, device)
                if r >= args.warmup:
                    times[name].append(t)
        # Greedy ties can break differently in bfloat16 or on a random-init model's flat logits.
        same = bool(torch.equal(out["ours"], out["hf"]))
        results["generate"] = compare("generate", times, args.gen_batch * n_new, "tok/s",
                                      f"   (batch {args.gen_batch}, prompt {args.prompt}, "
                                      f"{n_new} new; same tokens as hf: {same})")
        results["generate"].update(same_tokens=same, times_s=times)

    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
