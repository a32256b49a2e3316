"""The training loop at the speed of its step (issue 16, part 3): what `simone run` loses against
`simone bench train`'s bare step, measured side by side in one run.

    python bench/bench_loop.py [--preset cpu] [--steps 100] [--rounds 2] [--corpus DIR]
    python bench/bench_loop.py --preset tiny --steps 30 --rounds 1                    (smoke: seconds)

step   what `simone bench train` times for our model: forward, backward and the optimizer step on
       one fixed random batch already in memory, compiled iff the preset compiles, in the preset's
       dtype, with the preset's optimizer; nothing else.
loop   `simone run`'s training stage (`stage_train`, the same function the CLI calls) on real
       shards of the corpus, for `--steps` optimizer steps: the data loader, the learning-rate
       schedule, gradient clipping and the bad-step checks, the device counters read at each
       logging step, metrics.jsonl / train.log / status.json rows, the system-stats thread.
       Evaluation, samples and checkpoints are pauses the trainer already leaves out of its
       throughput; they are switched off here so that every logging interval is training.

Both are timed in rounds, step then loop, `--rounds` times, so load from elsewhere on the
machine falls on both. Like with like: the loop's rate is the median of its logging intervals'
tokens/s (`train.log_every` steps each; the first, which holds compilation and warm-up, left
out), and the step's is the median of windows of as many bare steps in a row. The headline is
loop / step; the goal is >= 0.95 (lose <= 5%). The median single bare step (what `simone bench
train` reports) is printed too: it leaves out the occasional slow step a window keeps, so it
reads a few percent higher than any run of steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench_quality import fresh_run, prepare  # noqa: E402

from simone.config import Config, load_config, preset  # noqa: E402
from simone.devices import cpu_model  # noqa: E402

GOAL = 0.95


def step_rate(cfg: Config, steps: int, warmup: int = 3) -> dict[str, Any]:
    """Tokens/s of the bare step, as `simone bench train` times ours (one fixed batch): the
    median single step (bench train's figure), and the median window of `train.log_every`
    steps in a row, timed as the loop's logging intervals are (every step's time, slow ones
    included), which is what the loop is compared with."""
    import time

    from simone.model import build_model
    from simone.train.optim import build_optimizer
    from simone.train.precision import autocast, autocast_dtype
    from simone.workflows.bench import _rate, _sync, bench_device, time_alternating

    m, t = cfg.model, cfg.train
    dev = bench_device(cfg, None)
    torch.manual_seed(0)
    model = build_model(m).to(dev).train()
    opt = build_optimizer(model, t.optimizer, t.lr, t.weight_decay, (t.beta1, t.beta2), dev.type)
    run_model = torch.compile(model) if t.compile else model
    amp = autocast_dtype(t.dtype, dev)
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, m.vocab_size, (t.batch_size, m.max_seq_len + 1), generator=g).to(dev)
    x, y = data[:, :-1], data[:, 1:]

    def step() -> None:
        with autocast(amp, dev):
            _, loss = run_model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = time_alternating({"step": step}, steps, warmup, dev)["step"]
    window = max(1, t.log_every)
    window_rates = []
    for _ in range(max(1, steps // window)):
        _sync(dev)
        start = time.perf_counter()
        for _ in range(window):
            step()
        _sync(dev)
        window_rates.append(x.numel() * window / (time.perf_counter() - start))
    return {"tokens_per_s": statistics.median(window_rates), "windows": len(window_rates), "window_steps": window,
            "single_step_tokens_per_s": _rate(x.numel(), times)["per_s"], "steps": steps, "first_s": times["first_s"]}


def loop_rate(cfg: Config, prepared: Path, run_dir: Path, steps: int) -> dict[str, Any]:
    """Tokens/s of `simone run`'s training stage: the median logging interval after the first."""
    import copy

    from simone.rundir import RunDir
    from simone.train.metrics import train_rates
    from simone.workflows.pipeline import stage_train

    cfg = copy.deepcopy(cfg)
    t = cfg.train
    t.max_steps, t.max_minutes = steps, None
    t.num_epochs = t.min_epochs = max(t.num_epochs, 1000)  # the step count ends it, not the epochs
    t.eval_every = t.checkpoint_every = t.sample_every = 0
    result = stage_train(cfg, fresh_run(prepared, run_dir))
    rates = train_rates(RunDir(run_dir).metrics)
    if len(rates) < 2:
        raise SystemExit(f"bench_loop: only {len(rates)} logging interval(s) in {steps} steps; raise --steps")
    return {"tokens_per_s": statistics.median(rates[1:]), "intervals": len(rates) - 1, "steps": result.steps,
            "whole_run_tokens_per_s": result.tokens_per_s}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--steps", type=int, default=100, help="optimizer steps of the loop per round")
    ap.add_argument("--step-repeats", dest="step_repeats", type=int, default=60,
                    help="timed bare steps per round (single, then as many again in windows of log_every)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--corpus", type=Path, default=None, help="default: the embedded corpus")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_loop")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for both (e.g. train.compile=false)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    from simone.config import apply_overrides

    cfg = apply_overrides(preset(args.preset), args.overrides)
    cfg.train.device = "cpu" if cfg.train.device == "auto" and not torch.cuda.is_available() else cfg.train.device
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    prepared = prepare(cfg, args.corpus, work)
    sizes = load_config(prepared / "config.json").model  # the tokenizer's vocabulary and domains
    cfg.model.vocab_size, cfg.model.n_domains = sizes.vocab_size, sizes.n_domains

    step_rows, loop_rows = [], []
    for r in range(args.rounds):
        step_rows.append(step_rate(cfg, args.step_repeats))
        print(f"[bench_loop] round {r + 1}: step {step_rows[-1]['tokens_per_s']:,.0f} tokens/s", flush=True)
        loop_rows.append(loop_rate(cfg, prepared, work / "loop", args.steps))
        print(f"[bench_loop] round {r + 1}: loop {loop_rows[-1]['tokens_per_s']:,.0f} tokens/s", flush=True)
    step = statistics.median(row["tokens_per_s"] for row in step_rows)
    single = statistics.median(row["single_step_tokens_per_s"] for row in step_rows)
    loop = statistics.median(row["tokens_per_s"] for row in loop_rows)
    m, t = cfg.model, cfg.train
    report = {
        "schema": 1, "preset": cfg.preset, "cpu_model": cpu_model(), "device": str(cfg.train.device),
        "threads": torch.get_num_threads(), "load_average": os.getloadavg()[0], "torch": torch.__version__,
        "shape": f"{m.n_layers}x{m.dim}, context {m.max_seq_len}, batch {t.batch_size}x{t.grad_accum}, "
                 f"{t.optimizer}, dtype {t.dtype}, compile {t.compile}",
        "step_tokens_per_s": step, "single_step_tokens_per_s": single, "loop_tokens_per_s": loop,
        "ratio": loop / step, "ratio_to_single_step": loop / single, "goal": GOAL,
        "rounds": {"step": step_rows, "loop": loop_rows},
    }
    verdict = "meets" if report["ratio"] >= GOAL else "misses"
    print(f"\ntraining tokens/s, {report['shape']} (CPU: {report['cpu_model']}, {report['threads']} threads)\n"
          f"  bare step, median single step (simone bench train's figure): {single:10,.0f}\n"
          f"  bare step, median window of {t.log_every} steps in a row:          {step:10,.0f}\n"
          f"  simone run's loop, median logging interval of {t.log_every} steps:  {loop:10,.0f}\n"
          f"  loop / step (windows of {t.log_every}): {report['ratio']:.3f} ({verdict} the goal >= {GOAL}); "
          f"loop / single step: {report['ratio_to_single_step']:.3f}")
    out = args.json or work / "loop.json"
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


if __name__ == "__main__":
    main()
