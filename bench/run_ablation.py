"""The governance ablation of issue 17 as one command: does governance help, does curation help?

    python bench/run_ablation.py                      # probe (minutes): print the command and its expected wall time
    python bench/run_ablation.py --run                # the full run (~90 minutes on 2 CPU cores)
    python bench/run_ablation.py --run --resume       # continue it: finished runs are reused
    python bench/run_ablation.py --run --vset full@mem16:model.n_memory_slots=16   # plus a sweep point

The full run: `../shared/corpus`, the `cpu` preset, the plain model, full governance, no policy
head, no memory slots, full governance on the uncurated corpus and the GPT-2 baseline; 3 seeds;
the same 2.5M training tokens for every run (a step count, never minutes, so a busy machine
cannot shorten one variant); 50 steering samples per domain of 128 tokens. Curated and
uncurated models are scored on the same held-out documents, in neither training set
(`simone/workflows/ablate.py`). The result is OUT/ablation.{md,json,svg}.

The probe measures, on this machine and now: curation, tokenizer and judge on a sample of the
corpus (scaled by bytes to the whole; it also prints the judge's accuracy on that sample's
validation snippets), seconds per optimizer step of each variant's model (eager, under the
preset's autocast; the run compiles, which was measured ~30% faster on this CPU, so the
estimate leans long), batch-1 generation and evaluation speed; and adds them up for the plan.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

VARIANTS = ["llama", "full", "no-policy", "no-memory", "uncurated", "gpt2"]
POLICY_VARIANTS = {"full", "no-memory", "uncurated"}  # also steered by the policy-guided sampler


def ablate_command(args: argparse.Namespace) -> list[str]:
    cmd = [sys.executable, "-m", "simone", "ablate", "--data", str(args.corpus), "--preset", args.preset,
           "--out", str(args.out), "--variants", ",".join(args.variants), "--seeds", str(args.seeds),
           "--tokens-per-variant", str(args.tokens_per_variant), "--samples-per-domain", str(args.samples_per_domain),
           "--sample-tokens", str(args.sample_tokens), "--heldout-batches", str(args.heldout_batches)]
    for item in args.overrides:
        cmd += ["--set", item]
    for item in args.vset:
        cmd += ["--vset", item]
    if args.resume:
        cmd.append("--resume")
    return cmd


# ----------------------------------------------------------------------------- probe


def sample_corpus(corpus: Path, dest: Path, bytes_per_domain: int) -> tuple[int, int]:
    """Copy up to `bytes_per_domain` of each domain's files (smallest first, so every domain
    keeps several documents) into `dest` (a temporary folder; curation refuses symlinks that
    leave the corpus); returns (sampled bytes, corpus bytes)."""
    sampled = total = 0
    for domain in sorted(p for p in corpus.iterdir() if p.is_dir()):
        files = sorted(domain.rglob("*.txt"), key=lambda f: f.stat().st_size)
        taken = 0
        for f in files:
            size = f.stat().st_size
            total += size
            if taken and taken + size > bytes_per_domain:
                continue
            taken += size
            for src in (f, f.with_suffix(".json")):
                if src.exists():
                    copy = dest / src.relative_to(corpus)
                    copy.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(src, copy)
        sampled += taken
    return sampled, total


def probe_data(args: argparse.Namespace, work: Path) -> dict:
    """Curation, tokenizer, shards and the steering judge on a sample of the corpus."""
    from simone.workflows.ablate import prepare_shared
    from simone.config import apply_overrides, preset
    from simone.data.shards import TokenShard
    from simone.inference.steering_judge import fit_on_documents, snippet_accuracy, snippet_words_for

    sample = work / "corpus"
    sampled, total = sample_corpus(args.corpus, sample, args.probe_bytes_per_domain)
    cfg = apply_overrides(preset(args.preset), list(args.overrides))
    cfg.data.data_dir = str(sample)
    t0 = time.perf_counter()
    shared = prepare_shared(cfg, work / "ablation")
    prep_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    words = snippet_words_for(args.sample_tokens)
    judge = fit_on_documents(shared.documents, snippet_words=words)
    judge_s = time.perf_counter() - t0
    judge_acc = snippet_accuracy(judge, shared.documents, snippet_words=words)
    val, train = TokenShard(shared.data, "val"), TokenShard(shared.data, "train")
    return {"sampled_bytes": sampled, "corpus_bytes": total, "prep_s": prep_s, "judge_fit_s": judge_s,
            "judge_accuracy_on_sample": judge_acc, "domains": len(judge.classes),
            "val_share_of_tokens": val.n_tokens / max(1, val.n_tokens + train.n_tokens),
            "bytes_per_token": sampled / max(1, val.n_tokens + train.n_tokens)}


def probe_model(args: argparse.Namespace, n_domains: int) -> dict:
    """Seconds per optimizer step, per generated token and per evaluated token, for each variant."""
    from simone.workflows.ablate import base_variant, variant_config
    from simone.config import apply_overrides, preset
    from simone.model import build_model
    from simone.inference.streaming import guided_sample_batch
    from simone.train.budget import probe_step_seconds
    from simone.train.precision import autocast_dtype

    base = apply_overrides(preset(args.preset), list(args.overrides))
    base.model.n_domains = n_domains
    amp = autocast_dtype(base.train.dtype, torch.device("cpu"))
    autocast = (lambda: torch.autocast("cpu", dtype=amp)) if amp else (lambda: torch.autocast("cpu", enabled=False))
    tc, T = base.train, base.model.max_seq_len
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, base.model.vocab_size, (tc.batch_size, T), generator=g)
    y = torch.randint(0, base.model.vocab_size, (tc.batch_size, T), generator=g)
    d = torch.randint(0, n_domains, (tc.batch_size, T), generator=g)
    out = {}
    for name in args.variants:
        cfg = variant_config(base, name, [o for o in args.vset_by_variant.get(name, []) if not o.startswith("ablate.")])
        model = build_model(cfg.model)
        step_s = probe_step_seconds(model, cfg, torch.device("cpu"), lambda: (x, y, d), args.probe_steps)

        model.eval()
        with torch.no_grad():
            t0 = time.perf_counter()
            with autocast():
                model(x, y)
            eval_s_per_token = (time.perf_counter() - t0) / x.numel()
            # steering without guidance: a domain's samples in one batch, through the KV cache
            n, batch = args.probe_gen_tokens, args.samples_per_domain
            t0 = time.perf_counter()
            for _ in model.generate(torch.tensor([[0, 1]] * batch), n, temperature=0.8, top_k=50, top_p=0.95,
                                    generator=g):
                pass
            batch_s = (time.perf_counter() - t0) / (n * batch)
            # the policy-guided sampler: a domain's samples in one batch of samples x 8 candidates
            guided_s = 0.0
            if base_variant(name) in POLICY_VARIANTS:
                t0 = time.perf_counter()
                guided_sample_batch(model, [0, 1], batch, n, guidance_domain=0, guidance_weight=1.0,
                                    temperature=0.8, generator=g)
                guided_s = (time.perf_counter() - t0) / (n * batch)
        out[name] = {"step_s": step_s, "eval_s_per_token": eval_s_per_token, "batch_gen_s_per_token": batch_s,
                     "guided_gen_s_per_token": guided_s}
        print(f"[probe] {name}: {step_s:.3f} s/step, {1 / batch_s:,.0f} sampled tok/s in batches of {batch}"
              + (f", {1 / guided_s:,.0f} guided tok/s" if guided_s else "")
              + f", {1 / eval_s_per_token:,.0f} evaluated tok/s", flush=True)
    return out


def estimate(args: argparse.Namespace, data: dict, models: dict) -> dict:
    """Seconds of the full run, by part, from the probe's rates."""
    from simone.config import apply_overrides, preset

    cfg = apply_overrides(preset(args.preset), list(args.overrides))
    tokens_per_step = cfg.train.batch_size * cfg.train.grad_accum * cfg.model.max_seq_len
    steps = math.ceil(args.tokens_per_variant / tokens_per_step)
    scale = data["corpus_bytes"] / max(1, data["sampled_bytes"])
    corpus_tokens = data["corpus_bytes"] / data["bytes_per_token"]
    heldout_cap = data["domains"] * args.heldout_batches * cfg.train.batch_size * cfg.model.max_seq_len
    heldout_tokens = min(corpus_tokens * data["val_share_of_tokens"], heldout_cap)
    prep = 2 * data["prep_s"] * scale + data["judge_fit_s"]  # curated and uncurated data
    per_run = {}
    for name, m in models.items():
        train = steps * m["step_s"]
        # the control token alone; the guided sampler twice (with the policy and with W = 0)
        gen = (data["domains"] * args.samples_per_domain * args.sample_tokens
               * (m["batch_gen_s_per_token"] + 2 * m["guided_gen_s_per_token"]))
        evaluation = heldout_tokens * m["eval_s_per_token"] * 1.2  # held-out + val + streaming + policy
        per_run[name] = {"train_s": train, "steering_s": gen, "eval_s": evaluation, "total_s": train + gen + evaluation}
    total = prep + args.seeds * sum(r["total_s"] for r in per_run.values())
    return {"steps_per_run": steps, "tokens_per_run": steps * tokens_per_step, "corpus_tokens_est": corpus_tokens,
            "heldout_tokens_est": heldout_tokens, "prep_s": prep, "per_run": per_run, "total_s": total}


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=Path("../shared/corpus"))
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--out", type=Path, default=Path("runs/ablation-issue17"))
    ap.add_argument("--variants", type=lambda s: [v for v in s.split(",") if v], default=VARIANTS)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--tokens-per-variant", dest="tokens_per_variant", type=int, default=2_500_000)
    ap.add_argument("--samples-per-domain", dest="samples_per_domain", type=int, default=50)
    ap.add_argument("--sample-tokens", dest="sample_tokens", type=int, default=128)
    ap.add_argument("--heldout-batches", dest="heldout_batches", type=int, default=50,
                    help="held-out batches per domain (50 x 16 x 256 = 205k tokens a domain with `cpu`)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--vset", action="append", default=[], metavar="VARIANT:KEY=VALUE",
                    help="a per-variant override; BASE@TAG adds a sweep point (see simone ablate --help)")
    ap.add_argument("--run", action="store_true", help="run the full ablation (hours), not just the probe")
    ap.add_argument("--resume", action="store_true",
                    help="reuse the runs --out already finished with the same settings (a stopped run continues)")
    ap.add_argument("--probe-bytes-per-domain", dest="probe_bytes_per_domain", type=int, default=600_000)
    ap.add_argument("--probe-steps", dest="probe_steps", type=int, default=3)
    ap.add_argument("--probe-gen-tokens", dest="probe_gen_tokens", type=int, default=64)
    ap.add_argument("--json", type=Path, default=None, help="also write the probe's figures here")
    args = ap.parse_args(argv)
    args.vset_by_variant = {}
    for item in args.vset:
        name, _, override = item.partition(":")
        args.vset_by_variant.setdefault(name, []).append(override)
    # sweep points join the variants (as `simone ablate --vset` does)
    args.variants = list(args.variants) + [n for n in args.vset_by_variant if "@" in n and n not in args.variants]
    return args


def main() -> None:
    args = parse_args()
    cmd = ablate_command(args)
    if args.run:
        print("$ " + " ".join(cmd), flush=True)
        sys.exit(subprocess.call(cmd))

    with tempfile.TemporaryDirectory(prefix="ablation-probe-") as tmp:
        data = probe_data(args, Path(tmp))
    cpu0, wall0 = time.process_time(), time.perf_counter()
    models = probe_model(args, data["domains"])
    # On a shared machine the probe gets only part of the cores; so would the run, now.
    cpu_share = min(1.0, (time.process_time() - cpu0) / ((time.perf_counter() - wall0) * torch.get_num_threads()))
    plan = estimate(args, data, models)
    print()
    print(f"Probe on {os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads "
          f"(load from other processes slows it alike):")
    print(f"  data: {data['sampled_bytes'] / 1e6:.1f} of {data['corpus_bytes'] / 1e6:.1f} MB prepared in "
          f"{data['prep_s']:.0f} s; ~{plan['corpus_tokens_est'] / 1e6:.1f}M corpus tokens, "
          f"~{plan['heldout_tokens_est'] / 1e6:.2f}M held out")
    print(f"  steering judge on the sample: {data['judge_accuracy_on_sample']:.1%} on validation snippets of "
          f"{args.sample_tokens} tokens ({data['domains']} domains), fitted in {data['judge_fit_s']:.0f} s")
    print(f"  plan: {len(args.variants)} variants x {args.seeds} seeds, {plan['steps_per_run']} steps "
          f"({plan['tokens_per_run']:,} tokens) a run")
    for name, r in plan["per_run"].items():
        print(f"    {name:>10}: train {_hours(r['train_s'])}, steering {_hours(r['steering_s'])}, "
              f"evaluation {_hours(r['eval_s'])} per seed")
    print(f"  data preparation (curated + uncurated): {_hours(plan['prep_s'])}")
    print(f"Expected wall time: about {_hours(plan['total_s'])} at today's load (the probe got {cpu_share:.0%} "
          f"of {torch.get_num_threads()} threads' CPU time); about {_hours(plan['total_s'] * cpu_share)} on an "
          f"idle machine. Eager probe: the run compiles its models, ~30% faster training on this CPU.")
    print("Command:\n  " + " ".join(cmd))
    if args.json:
        args.json.write_text(json.dumps({"data": data, "models": models, "plan": plan, "cpu_share": cpu_share, "command": cmd}, indent=2))


if __name__ == "__main__":
    main()
