"""Quality per minute: our default recipe against nanoGPT's, for the same wall-clock minutes,
scored in bits per byte on the same held-out documents (issue 16, part 1).

    python bench/bench_quality.py --minutes 10 [--corpus ../shared/corpus]
    python bench/bench_quality.py --minutes 0.1 --tiny --corpus DIR        (smoke: seconds)
    python bench/bench_quality.py --minutes 10 --recipes ours,peer,ours-muon,ours-budget
    python bench/bench_quality.py --minutes 10 --recipes ours,b8 --variant b8:train.batch_size=8
    python bench/bench_quality.py --screen 1500 --recipes ours,relu2,qk-norm,nanochat   (equal steps)
    python bench/bench_quality.py --overrides-of nanochat        (a built-in variant's overrides, one a line)

Held-out text: per domain (first folder of the corpus), the first `*.txt` in sorted order of
at least 20 KB (or the largest, if none is), removed with its sidecar from the training copy
of the corpus, so neither recipe trains on it; each is scored on its first `--eval-chars`
characters. Both recipes train on the same curated, tokenized data (the `cpu` preset's
curation and BPE vocabulary, built once, untimed), one after the other, for `--minutes` each.

Recipes:
  ours         the `cpu` preset as `simone run` trains it (its shape, batch and schedule: simone/config.py;
               compiled, bf16 where the CPU has native bf16, the time-planned schedule), capped at M minutes
  peer         nanoGPT's configuration and training loop as published, through our GPT-2
               baseline (`model.arch=gpt2`: learned positions, LayerNorm, GELU MLP, biases):
               2 layers x 256, 4 heads, context 128, batch 32 random windows of the token stream,
               AdamW beta 0.9/0.95, weight decay 0.1 on matrices, grad clip 1.0, lr 1e-3 with
               100 warmup iterations then cosine to lr/10 over the iterations that fit in M
               minutes (counted from the time of the first 20 iterations), fp32, no compile, no
               evaluation during training (nanoGPT's periodic evaluation would cost it time)
  ours-muon    ours with train.optimizer=muon
  ours-budget  ours with the shape `--budget-minutes M` picks (simone/train/budget.py), as `make run` trains
  LEVER        ours with one lever of nanochat's recipe (issue 28; LEVERS below): relu2, qk-norm,
               value-embed, zero-init, softcap, untied-head, muon-shape, warmdown, doc-aligned
  nanochat     ours with all of them at once, as nanochat's base training combines them
  NAME         ours with the overrides of `--variant NAME:section.key=value[,section.key=value...]`
               (a lever tried on its own; `simone run --set` spells the same overrides)

`--screen STEPS` trains every recipe for STEPS optimizer steps instead of M minutes (no time
cap: the machine's load does not matter), to screen levers before the winners run at 10 minutes.

Several runs can share one --work folder (the data is prepared once) when their recipe names
differ; give each its own --json. `peer` may be left out (then no ratio is printed).

Score: total negative log-likelihood in bits / UTF-8 bytes (simone.inference.text_bpb), each
model with its own context in sliding windows. The headline is ours / peer (below 1: ours is
better); the goal is <= 0.85 at 10 minutes on a 2-core CPU. Results go to WORK/quality.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from simone.config import Config, ModelConfig, apply_overrides, preset  # noqa: E402
from simone.devices import cpu_model  # noqa: E402

MIN_HELD_OUT_BYTES = 20_000
GOAL = 0.85
# our recipes that are the cpu preset with overrides (`--variant` adds more); `ours-budget` and
# `peer` are trained differently
# The levers of nanochat's base training, one at a time, then together. Learning rates are relative
# to ours (2e-3 at the cpu preset): head x2 is nanochat's unembedding lr 0.004, Muon x10 its matrix
# lr 0.02 (with its per-shape scaling, whose updates are ~2x smaller than the AdamW-matched ones).
LEVERS: dict[str, list[str]] = {
    "relu2": ["model.mlp=relu2"],
    "qk-norm": ["model.qk_norm=true"],
    "value-embed": ["model.value_embeddings=1"],  # every other layer from the last: 1 of the presets' 2
    "zero-init": ["model.zero_init_proj=true"],
    "softcap": ["model.logit_softcap=15"],
    "untied-head": ["model.tie_embeddings=false", "train.head_lr_scale=2"],
    "muon-shape": ["train.optimizer=muon", "train.muon_shape_scaling=true", "train.muon_lr_scale=10"],
    "warmdown": ["train.lr_schedule=wsd", "train.decay_fraction=0.65", "train.min_lr_ratio=0.05"],
    "doc-aligned": ["train.doc_aligned=true"],
}
BUILT_IN_VARIANTS: dict[str, list[str]] = {
    "ours": [], "ours-muon": ["train.optimizer=muon"], **LEVERS,
    "nanochat": [o for overrides in LEVERS.values() for o in overrides],
}
BUILT_IN = {*BUILT_IN_VARIANTS, "ours-budget", "peer"}


# ----------------------------------------------------------------------------- data


def choose_held_out(corpus: Path) -> list[Path]:
    """One document per domain: the first *.txt (sorted by path) of >= 20 KB, else the largest."""
    held = []
    for domain in sorted(p for p in corpus.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(f for f in domain.rglob("*.txt") if f.is_file())
        if len(files) < 2:
            continue  # a domain of one document keeps it for training
        big = [f for f in files if f.stat().st_size >= MIN_HELD_OUT_BYTES]
        held.append(big[0] if big else max(files, key=lambda f: f.stat().st_size))
    if not held:
        raise SystemExit(f"{corpus}: no domain folder with two or more *.txt documents to hold one out")
    return held


def split_corpus(corpus: Path, held_out: list[Path], work: Path, eval_chars: int) -> tuple[Path, Path]:
    """WORK/train_corpus: the corpus without the held-out documents (hard links where the
    filesystem allows, else copies); WORK/held_out: their first `eval_chars` characters,
    DOMAIN/SUB/NAME.txt. Rebuilt only when the held-out choice or the corpus listing changed."""
    train_dir, eval_dir = work / "train_corpus", work / "held_out"
    skip = {p.resolve() for p in held_out} | {p.with_suffix(".json").resolve() for p in held_out}
    listing = sorted(str(f.relative_to(corpus)) for f in corpus.rglob("*")
                     if f.is_file() and f.relative_to(corpus).parts[0] != "README.md"
                     and len(f.relative_to(corpus).parts) > 1)
    stamp = json.dumps({"corpus": str(corpus.resolve()), "held_out": [str(p) for p in held_out],
                        "files": len(listing), "eval_chars": eval_chars})
    stamp_file = work / "split.json"
    if stamp_file.exists() and stamp_file.read_text() == stamp:
        return train_dir, eval_dir
    shutil.rmtree(train_dir, ignore_errors=True)
    shutil.rmtree(eval_dir, ignore_errors=True)
    for rel in listing:
        src = corpus / rel
        if src.resolve() in skip:
            continue
        dst = train_dir / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)
    for src in held_out:
        dst = eval_dir / src.relative_to(corpus)
        dst.parent.mkdir(parents=True, exist_ok=True)
        text = src.read_text(encoding="utf-8", errors="replace")[:eval_chars]
        dst.write_text(text, encoding="utf-8")
    stamp_file.write_text(stamp)
    return train_dir, eval_dir


def prepare(cfg: Config, train_dir: Path | None, work: Path) -> Path:
    """Curate, tokenize and shard the training copy (None: the embedded corpus) once, into
    WORK/prepared-PRESET (kept between runs: delete it after changing the corpus)."""
    from simone.workflows.pipeline import stage_prepare
    from simone.rundir import RunDir

    prepared = work / f"prepared-{cfg.preset}"
    if train_dir is not None:
        cfg.data.data_dir = str(train_dir.resolve())
    if not (RunDir(prepared).data / "index.json").exists():
        stage_prepare(cfg, prepared)
    return prepared


def fresh_run(prepared: Path, dest: Path) -> Path:
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for name in ("data", "tokenizer"):
        shutil.copytree(prepared / name, dest / name, copy_function=_link_or_copy)
    return dest


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


# ----------------------------------------------------------------------------- scoring


def score(model: torch.nn.Module, tokenizer: Any, context: int, eval_dir: Path, label: str) -> dict[str, Any]:
    """Bits per byte of an in-memory model on the held-out folder (text_bpb's scorer)."""
    from simone.inference.text_bpb import TorchScorer, read_text_folder, score_model

    model.eval()
    scorer = TorchScorer(label, "simone", lambda x: model(x)[0], tokenizer.encode, tokenizer.eod_id, context,
                         torch.device("cpu"), tokenizer.vocab_size)
    s = score_model(scorer, read_text_folder(eval_dir))
    return {"bpb": s.overall.bpb, "per_domain": {d: v.bpb for d, v in sorted(s.per_domain.items())},
            "eval_tokens": s.overall.tokens, "eval_bytes": s.overall.bytes}


def score_run(run_dir: Path, eval_dir: Path, label: str) -> dict[str, Any]:
    from simone.inference.load import load_model

    loaded = load_model(run_dir, device="cpu")
    return score(loaded.model, loaded.tokenizer, loaded.config.model.max_seq_len, eval_dir, label)


# ----------------------------------------------------------------------------- recipes


def train_ours(base: Config, prepared: Path, work: Path, eval_dir: Path, minutes: float | None, name: str,
               edit: Callable[[Config], None] | None = None, steps: int | None = None) -> dict[str, Any]:
    """Our trainer on the prepared data, capped at `minutes` (or run for `steps`, uncapped), as
    `simone run` trains."""
    import copy

    from simone.config import load_config
    from simone.workflows.pipeline import stage_train

    cfg = copy.deepcopy(base)
    cfg.model.vocab_size = load_config(prepared / "config.json").model.vocab_size
    cfg.train.max_minutes = minutes
    if steps is not None:
        cfg.train.max_steps = steps
    if edit is not None:
        edit(cfg)
    run_dir = fresh_run(prepared, work / name)
    started = time.perf_counter()
    result = stage_train(cfg, run_dir)
    seconds = time.perf_counter() - started
    return {"recipe": name, "params": _param_count(cfg.model), "vocab_size": cfg.model.vocab_size, "steps": result.steps,
            "tokens_seen": result.tokens_seen, "tokens_per_s": result.tokens_per_s, "train_seconds": seconds,
            "stop_reason": result.stop_reason, "schedule_progress": result.schedule_progress,
            "shape": _shape(cfg), **score_run(run_dir, eval_dir, name)}


def _param_count(m: ModelConfig) -> int:
    from simone.config import analytic_param_count

    return analytic_param_count(m)


def _shape(cfg: Config) -> str:
    m, t = cfg.model, cfg.train
    return (f"{m.arch} {m.n_layers}x{m.dim} ({m.n_heads} heads), context {m.max_seq_len}, batch "
            f"{t.batch_size}x{t.grad_accum}, lr {t.lr:g}, {t.optimizer}, dtype {t.dtype}, compile {t.compile}")


PEER = dict(n_layers=2, dim=256, n_heads=4, context=128, batch=32, lr=1e-3, warmup=100, plan_after=20)
PEER_TINY = dict(n_layers=2, dim=64, n_heads=4, context=64, batch=8, lr=3e-3, warmup=10, plan_after=5)


def train_peer(prepared: Path, eval_dir: Path, minutes: float | None, tiny: bool, seed: int = 1337,
               steps: int | None = None) -> dict[str, Any]:
    """nanoGPT's training loop (train.py, as published) on our GPT-2 baseline and our tokens,
    for `minutes` (its iterations planned from the first ones' speed) or for `steps` iterations."""
    from simone.config import load_config
    from simone.data.shards import TokenShard
    from simone.model import build_model
    from simone.data.tokenizer import load_tokenizer
    from simone.train.optim import build_optimizer
    from simone.train.schedule import lr_at

    p = PEER_TINY if tiny else PEER
    vocab = load_config(prepared / "config.json").model.vocab_size
    mcfg = ModelConfig(arch="gpt2", vocab_size=vocab, dim=p["dim"], n_layers=p["n_layers"], n_heads=p["n_heads"],
                       max_seq_len=p["context"], dropout=0.0)
    torch.manual_seed(seed)
    model = build_model(mcfg).train()
    optimizer = build_optimizer(model, "adamw", lr=p["lr"], weight_decay=0.1, betas=(0.9, 0.95), device_type="cpu")
    data = torch.from_numpy(TokenShard(prepared / "data", "train").tokens.astype("int64"))
    block, batch = p["context"], p["batch"]
    gen = torch.Generator().manual_seed(seed)

    def get_batch() -> tuple[torch.Tensor, torch.Tensor]:
        ix = torch.randint(len(data) - block - 1, (batch,), generator=gen)
        x = torch.stack([data[i : i + block] for i in ix.tolist()])
        y = torch.stack([data[i + 1 : i + 1 + block] for i in ix.tolist()])
        return x, y

    budget_s = minutes * 60.0 if minutes is not None else float("inf")
    max_iters = steps  # None: planned once the first iterations are timed, the iterations that fit
    it, started = 0, time.perf_counter()
    while True:
        elapsed = time.perf_counter() - started
        if max_iters is None and it == p["plan_after"]:
            max_iters = max(it + 1, int(budget_s / (elapsed / it)))
        if (max_iters is not None and it >= max_iters) or elapsed >= budget_s:
            break
        lr = lr_at(it, p["lr"], p["warmup"], max_iters or 10**9, 0.1)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = get_batch()
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        it += 1
        if it % 50 == 0:
            print(f"peer iter {it}/{max_iters} loss {loss.item():.4f} lr {lr:.2e} "
                  f"{time.perf_counter() - started:.0f}s", flush=True)
    seconds = time.perf_counter() - started
    tokenizer = load_tokenizer(prepared / "tokenizer" / "tokenizer.json")
    return {"recipe": "peer", "params": model.num_params(), "vocab_size": vocab, "steps": it, "planned_iters": max_iters,
            "tokens_seen": it * batch * block, "tokens_per_s": it * batch * block / seconds,
            "train_seconds": seconds, "shape": (f"gpt2 {p['n_layers']}x{p['dim']} ({p['n_heads']} heads), context "
                                                f"{block}, batch {batch}, lr {p['lr']:g} cosine, adamw, float32, no compile"),
            **score(model, tokenizer, block, eval_dir, "peer")}


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--minutes", type=float, default=None, help="wall-clock training minutes for each recipe")
    ap.add_argument("--screen", type=int, default=None, metavar="STEPS",
                    help="train each recipe for STEPS optimizer steps instead (equal steps, no time cap)")
    ap.add_argument("--overrides-of", dest="overrides_of", default=None, metavar="NAME",
                    help="print a built-in variant's overrides, one a line, and exit")
    ap.add_argument("--corpus", type=Path, default=ROOT.parent / "shared" / "corpus")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_quality")
    ap.add_argument("--recipes", default="ours,peer", help="comma-separated: ours, peer, ours-muon, ours-budget")
    ap.add_argument("--eval-chars", dest="eval_chars", type=int, default=100_000,
                    help="characters scored from each held-out document")
    ap.add_argument("--tiny", action="store_true", help="smoke mode: tiny shapes for both recipes")
    ap.add_argument("--no-compile", dest="no_compile", action="store_true",
                    help="our recipes eager (compiling takes ~15 s of the budget on an idle 2-core CPU, "
                         "minutes on a loaded one)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override the base config of our recipes and of the data preparation (e.g. "
                         "tokenizer.vocab_size=2048: then give it its own --work, the data is prepared per folder)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE]",
                    help="a named recipe: ours with these config overrides (repeatable)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.overrides_of is not None:
        if args.overrides_of not in BUILT_IN_VARIANTS:
            raise SystemExit(f"--overrides-of: built-in variants are {', '.join(BUILT_IN_VARIANTS)}")
        print("\n".join(BUILT_IN_VARIANTS[args.overrides_of]))
        return {}
    if (args.minutes is None) == (args.screen is None):
        ap.error("give --minutes M or --screen STEPS")

    variants = {**BUILT_IN_VARIANTS, **parse_variants(args.variant)}
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    unknown = set(recipes) - BUILT_IN - set(variants)
    if unknown or not recipes:
        raise SystemExit(f"--recipes: only {', '.join(sorted(BUILT_IN))} or a --variant name "
                         f"(got {args.recipes}; unknown: {', '.join(sorted(unknown)) or 'none'})")
    if args.screen is not None and "ours-budget" in recipes:
        raise SystemExit("--recipes: ours-budget sizes its shape for --minutes; it has no --screen")
    corpus = args.corpus.resolve()
    if not corpus.is_dir():
        raise SystemExit(f"{corpus}: no such corpus folder (pass --corpus DIR)")
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    base = apply_overrides(preset("tiny" if args.tiny else "cpu"), args.overrides)
    base.train.device = "cpu"
    if args.tiny:
        base.train.eval_every = 0
    if args.no_compile:
        base.train.compile = False

    held_out = choose_held_out(corpus)
    train_dir, eval_dir = split_corpus(corpus, held_out, work, args.eval_chars)
    t0 = time.perf_counter()
    prepared = prepare(base, train_dir, work)
    prep_s = time.perf_counter() - t0
    print(f"[bench_quality] held out: {', '.join(str(p.relative_to(corpus)) for p in held_out)}; "
          f"data prepared in {prep_s:.0f} s", flush=True)

    results: dict[str, dict[str, Any]] = {}
    for name in recipes:
        length = f"{args.minutes:g} min" if args.screen is None else f"{args.screen} steps"
        print(f"[bench_quality] {name}: training {length}", flush=True)
        if name == "peer":
            results[name] = train_peer(prepared, eval_dir, args.minutes, args.tiny, steps=args.screen)
        elif name == "ours-budget":
            results[name] = train_ours(base, prepared, work, eval_dir, args.minutes, name,
                                       edit=lambda c: _budget_shape(c, args.minutes))
        else:
            results[name] = train_ours(base, prepared, work, eval_dir, args.minutes, name,
                                       edit=lambda c, o=variants[name]: apply_overrides(c, o), steps=args.screen)
            results[name]["overrides"] = variants[name]
    peer_bpb = results["peer"]["bpb"] if "peer" in results else None
    for r in results.values():
        r["ratio_vs_peer"] = r["bpb"] / peer_bpb if peer_bpb else None
    report = {
        "schema": 1, "minutes": args.minutes, "screen_steps": args.screen, "tiny": args.tiny, "cpu_model": cpu_model(),
        "threads": torch.get_num_threads(), "load_average": os.getloadavg()[0], "torch": torch.__version__,
        "corpus": str(corpus), "held_out": [str(p.relative_to(corpus)) for p in held_out],
        "eval_chars": args.eval_chars, "prep_seconds": prep_s, "goal": GOAL, "overrides": args.overrides,
        "vocab_size": results[recipes[0]].get("vocab_size"),
        "ratio": results["ours"]["ratio_vs_peer"] if "ours" in results else None,
        "best": min(results, key=lambda n: results[n]["bpb"]),
        "recipes": results,
    }
    print_table(report)
    out = args.json or work / "quality.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def parse_variants(items: list[str]) -> dict[str, list[str]]:
    """`NAME:section.key=value[,section.key=value]` items -> {NAME: [overrides]}."""
    variants: dict[str, list[str]] = {}
    for item in items:
        name, sep, rest = item.partition(":")
        overrides = [o.strip() for o in rest.split(",") if o.strip()]
        if not sep or not name or not overrides or any("=" not in o for o in overrides):
            raise SystemExit(f"--variant {item!r}: expected NAME:section.key=value[,section.key=value]")
        if name in BUILT_IN:
            raise SystemExit(f"--variant {item!r}: {name} is a built-in recipe; pick another name")
        variants[name] = overrides
    return variants


def _budget_shape(cfg: Config, minutes: float) -> None:
    from simone.train.budget import apply_budget, probe_tokens_per_s, shape_for_budget

    tokens_per_s, flops = probe_tokens_per_s(cfg)
    shape = shape_for_budget(minutes, tokens_per_s, flops, cfg.model.vocab_size, base=cfg.model)
    apply_budget(cfg, minutes, shape)
    print(f"[bench_quality] ours-budget: {shape.describe()}", flush=True)


def print_table(report: dict[str, Any]) -> None:
    length = f"{report['minutes']:g} min" if report["screen_steps"] is None else f"{report['screen_steps']} steps"
    print(f"\nbits per byte on held-out text after {length} of training each "
          f"(CPU: {report['cpu_model']}, {report['threads']} threads, load {report['load_average']:.1f})")
    print(f"{'recipe':<12} {'bpb':>7} {'/ peer':>7} {'params':>9} {'steps':>7} {'tokens':>10} {'tok/s':>8}  shape")
    for name, r in report["recipes"].items():
        ratio = f"{r['ratio_vs_peer']:6.3f}x" if r["ratio_vs_peer"] is not None else "      -"
        print(f"{name:<12} {r['bpb']:7.4f} {ratio} {r['params'] / 1e6:8.2f}M {r['steps']:7d} "
              f"{r['tokens_seen'] / 1e6:9.2f}M {r['tokens_per_s']:8,.0f}  {r['shape']}")
    if report["ratio"] is not None:
        verdict = "meets" if report["ratio"] <= report["goal"] else "misses"
        print(f"ratio ours / peer: {report['ratio']:.3f}x ({verdict} the goal <= {report['goal']}x)")


if __name__ == "__main__":
    main()
    sys.exit(0)
