"""What governance costs in training: tokens/s of the plain Llama-style model against the
governance model (policy head + memory slots + the comprehensive loss), same shape.

    python bench/bench_governance.py                 # the `cpu` preset shape, on the CPU
    python bench/bench_governance.py --device cuda --dtype bfloat16

One step = forward, backward, AdamW (fused where available) on a fixed random batch, with
per-position domain labels for the governance model. The variants are timed in alternation,
repeat after repeat (load from other processes hits all alike); the median is reported, of
wall time and of this process's CPU time (on a shared machine, with --threads 1, the CPU time
is the steadier figure: it does not count time spent waiting for a core).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch

from simone.config import preset
from simone.model import build_model
from simone.train.optim import build_optimizer


def variants(base) -> dict:
    def with_(**kw):
        cfg = type(base)(**{**base.__dict__, **kw})
        return cfg

    return {
        "plain": with_(governance=False),
        "governance": with_(governance=True, policy=True, memory=True),
        "policy only": with_(governance=True, policy=True, memory=False),
        "memory only": with_(governance=True, policy=False, memory=True),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--batch", type=int, default=None, help="default: the preset's batch size")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--steps", type=int, default=2, help="steps per timed repeat")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--n-domains", type=int, default=6)
    ap.add_argument("--only", default=None, help="comma-separated variants (default: all; plain is always run)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = preset(args.preset)
    base = cfg.model
    base.n_domains = args.n_domains
    device = torch.device(args.device)
    batch = args.batch or cfg.train.batch_size
    T = base.max_seq_len
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, base.vocab_size, (batch, T), generator=g).to(device)
    y = torch.randint(0, base.vocab_size, (batch, T), generator=g).to(device)
    d = torch.randint(0, args.n_domains, (batch, 1), generator=g).expand(batch, T).contiguous().to(device)
    amp = (torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bfloat16"
           else contextlib.nullcontext())

    runs = {}
    chosen = variants(base)
    if args.only:
        keep = {"plain", *args.only.split(",")}
        chosen = {k: v for k, v in chosen.items() if k in keep}
    for name, mcfg in chosen.items():
        torch.manual_seed(0)
        model = build_model(mcfg).to(device).train()
        opt = build_optimizer(model, "adamw", 1e-4, 0.1, (0.9, 0.95), device.type)
        kwargs = {"domain_ids": d} if model.policy_head is not None else {}

        def step(model=model, opt=opt, kwargs=kwargs):
            with amp:
                _, loss = model(x, y, **kwargs)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()  # warm-up
        runs[name] = (step, model.num_params(), [], [])

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(args.repeats):
        for name, (step, _, times, cpu_times) in runs.items():
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                step()
            sync()
            times.append((time.perf_counter() - t0) / args.steps)
            cpu_times.append((time.process_time() - c0) / args.steps)

    tokens = batch * T
    plain = statistics.median(runs["plain"][2])
    plain_cpu = statistics.median(runs["plain"][3])
    rows = []
    for name, (_, params, times, cpu_times) in runs.items():
        med, cpu = statistics.median(times), statistics.median(cpu_times)
        rows.append({"variant": name, "params": params, "step_ms": round(med * 1000, 1),
                     "tokens_per_s": round(tokens / med), "overhead_pct": round(100 * (med / plain - 1), 1),
                     "cpu_ms": round(cpu * 1000, 1), "cpu_overhead_pct": round(100 * (cpu / plain_cpu - 1), 1)})
    print(f"preset {args.preset}: batch {batch} x seq {T}, dim {base.dim}, {base.n_layers} layers, "
          f"{base.n_memory_slots} memory slots, {torch.get_num_threads()} threads, {args.device} {args.dtype}, "
          f"median of {args.repeats}")
    print(f"{'variant':<14}{'params':>10}{'ms/step':>10}{'tokens/s':>10}{'overhead':>10}{'cpu ms':>10}{'cpu ovh':>9}")
    for r in rows:
        print(f"{r['variant']:<14}{r['params']:>10,}{r['step_ms']:>10}{r['tokens_per_s']:>10,}{r['overhead_pct']:>9}%"
              f"{r['cpu_ms']:>10}{r['cpu_overhead_pct']:>8}%")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
