"""The steps of `bench/gpu_check.sh`, one per call, and the summary that gathers them.

    python bench/gpu_check.py STEP --work DIR [--dry-run] [--data DIR]
    python bench/gpu_check.py summarize --work DIR --out DIR

STEP is one of env, bench_train, run, generate, torchrun. Each writes WORK/steps/STEP.json
(its figures, or {"skipped": reason}); the shell script runs each under its own timeout and
records the exit status beside it (STEP.rc, STEP.seconds), so one step that hangs or fails
costs only its own time. `summarize` writes OUT/summary.json and OUT/summary.md.

Full mode is the GPU check (h200 / h100 shapes, CUDA, bf16, compiled); `--dry-run` runs the
same steps at the `tiny` shape on the CPU in seconds (tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from simone.devices import cpu_model  # noqa: E402  (one CPU name for every benchmark)

STEPS = ("env", "bench_train", "run", "generate", "torchrun")
SUMMARY_KEYS = ("schema", "mode", "machine", "steps", "headline")


# ----------------------------------------------------------------------------- helpers


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def peak_memory_mb(device: str) -> float:
    """Peak GPU memory allocated by this process on CUDA, else its peak RSS."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    rows = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def training_figures(run_dir: Path) -> dict[str, Any]:
    """tokens/s (median of the logged intervals after the first: compile and warm-up), MFU,
    the `expected_time` event, steps and how training stopped, from a run's metrics.jsonl."""
    rows = read_metrics(run_dir)
    train = [r for r in rows if r.get("kind") == "train" and r.get("tokens_per_s")]
    warm = train[1:] or train
    events = {r.get("event"): r for r in rows if r.get("kind") == "event"}
    expected = events.get("expected_time", {})
    finished = events.get("finished", {})
    mfus = [r["mfu"] for r in warm if r.get("mfu") is not None]
    return {
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in warm) if warm else None,
        "mfu": statistics.median(mfus) if mfus else None,
        "steps": max((r["step"] for r in train), default=0),
        "last_loss": train[-1].get("loss") if train else None,
        "expected_time": expected.get("message"),
        "expected_s": expected.get("expected_s"),
        "stop_reason": finished.get("stop_reason"),
    }


# ----------------------------------------------------------------------------- steps


def step_env(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu_model": cpu_model(),
            "cpus": os.cpu_count(), "cuda": torch.cuda.is_available(), "gpus": gpu_count(),
            "gpu_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:  # the version without the import (seconds on a small machine)
        from importlib.metadata import version

        info["transformers"] = version("transformers")
    except Exception:  # noqa: BLE001 - informative only
        info["transformers"] = None
    return info


def step_bench_train(args: argparse.Namespace) -> dict[str, Any]:
    from simone.workflows import bench

    if args.dry_run:
        r = bench.bench_train("tiny", repeats=1, warmup=1, device="cpu", dtypes=["float32"], compile=False,
                              quiet=True)
    else:  # bf16, ours compiled vs HF compiled and eager
        r = bench.bench_train("h200", repeats=3, warmup=2, device="cuda", dtypes=["bfloat16"], quiet=True)
    device = r["device"]
    best = max(r["rows"], key=lambda row: row["ours_tokens_per_s"])
    return {"preset": r["preset"], "device": device, "ratio_vs_hf": r["ratio"], "headline": r["headline"],
            "tokens_per_s": best["ours_tokens_per_s"], "mfu": best["ours_mfu"],
            "best_row": f"{best['ours']} vs {best['peer']}, {best['dtype']}",
            "peak_memory_mb": round(peak_memory_mb(device), 1),
            "peak_memory_note": "ours and the transformers peer with their optimizers, in one process",
            "rows": r["rows"], "config": r["config"]}


def step_run(args: argparse.Namespace) -> dict[str, Any]:
    from simone import cli

    run_dir = Path(args.work) / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    argv = ["run", "--run-dir", str(run_dir), "--package-dir", str(Path(args.work) / "packages")]
    if args.dry_run:
        argv += ["--preset", "tiny", "--max-steps", "8", "--set", "train.device=cpu",
                 "--set", "train.log_every=2", "--set", "train.eval_every=0"]
    else:  # a short run on the embedded corpus: enough logged intervals for a warm tokens/s
        argv += ["--preset", "h100", "--max-minutes", "1.5", "--max-steps", "200", "--set", "train.log_every=10"]
    if args.data:
        argv += ["--data", args.data]
    started = time.perf_counter()
    rc = cli.main(argv)
    figures = training_figures(run_dir)
    device = "cuda" if not args.dry_run else "cpu"
    return {"preset": "tiny" if args.dry_run else "h100", "exit_status": rc,
            "pipeline_ok": rc == 0, "seconds": round(time.perf_counter() - started, 1),
            "peak_memory_mb": round(peak_memory_mb(device), 1), **figures}


def step_generate(args: argparse.Namespace) -> dict[str, Any]:
    from simone.workflows import bench

    if args.dry_run:
        r = bench.bench_generate("tiny", repeats=1, warmup=1, device="cpu", dtypes=["float32"], compile=False,
                                 new_tokens=32, quiet=True)
    else:
        r = bench.bench_generate("h200", repeats=3, warmup=1, device="cuda", dtypes=["bfloat16"],
                                 compile=False, quiet=True)
    batch1 = [row for row in r["rows"] if row["batch"] == 1 and row["mode"] == "greedy"]
    return {"preset": r["preset"], "device": r["device"], "ratio_vs_hf": r["ratio"],
            "tokens_per_s_batch1": batch1[0]["ours_tokens_per_s"] if batch1 else None,
            "rows": r["rows"]}


def step_torchrun(args: argparse.Namespace) -> dict[str, Any]:
    """Two processes of `python -m simone.train` under torchrun (DDP) on the run step's
    prepared data: two GPUs in full mode, two CPU processes (gloo) in the dry run."""
    gpus = gpu_count()
    if not args.dry_run and gpus < 2:
        return {"skipped": f"{gpus} GPU(s) visible; the 2-GPU torchrun needs two"}
    source = Path(args.work) / "run"
    if not (source / "data" / "train.bin").exists():
        return {"skipped": "the run step left no prepared data to train on"}
    run_dir = Path(args.work) / "run_ddp"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    for name in ("data", "tokenizer"):
        shutil.copytree(source / name, run_dir / name)
    shutil.copy(source / "config.json", run_dir / "config.json")
    overrides = ["train.max_steps=6", "train.log_every=2", "train.eval_every=0", "train.device=cpu"] \
        if args.dry_run else ["train.max_steps=60", "train.max_minutes=1", "train.log_every=10"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "simone.train", "--run-dir", str(run_dir)]
    for o in overrides:
        cmd += ["--set", o]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    sys.stdout.write(done.stdout[-4000:])
    sys.stderr.write(done.stderr[-4000:])
    return {"processes": 2, "device": "cpu" if args.dry_run else "cuda", "exit_status": done.returncode,
            "seconds": round(time.perf_counter() - started, 1), **training_figures(run_dir)}


STEP_FUNCTIONS = {"env": step_env, "bench_train": step_bench_train, "run": step_run,
                  "generate": step_generate, "torchrun": step_torchrun}


# ----------------------------------------------------------------------------- summary


def _fmt(value: Any, spec: str = ",.0f", suffix: str = "") -> str:
    if value is None:
        return "–"
    if isinstance(value, (int, float)):
        return f"{value:{spec}}{suffix}"
    return str(value)


def summarize(work: Path, out: Path, mode: str) -> dict[str, Any]:
    """Gather WORK/steps/* into OUT/summary.json and OUT/summary.md."""
    steps: dict[str, Any] = {}
    for name in STEPS:
        base = work / "steps" / name
        rc_file, json_file, sec_file = base.with_suffix(".rc"), base.with_suffix(".json"), base.with_suffix(".seconds")
        rc = int(rc_file.read_text().strip()) if rc_file.exists() else None
        data = json.loads(json_file.read_text()) if json_file.exists() else {}
        if rc is None:
            status = "not_run"
        elif rc in (124, 137):
            status = "timeout"
        elif "skipped" in data:
            status = "skipped"
        elif rc == 0 and data:
            status = "ok"
        else:
            status = "failed"
        seconds = float(sec_file.read_text().strip()) if sec_file.exists() else None
        steps[name] = {"status": status, "exit_status": rc, "wall_s": seconds, **data}
        log = work / "logs" / f"{name}.log"
        if status in ("failed", "timeout") and log.exists():  # the step's last words, for the table
            last = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
            steps[name]["error"] = last[-1][:300] if last else f"exit status {rc}"
    env, train, run, gen, ddp = (steps[n] for n in STEPS)
    headline = {
        "bench_train_tokens_per_s": train.get("tokens_per_s"), "bench_train_mfu": train.get("mfu"),
        "bench_train_peak_memory_mb": train.get("peak_memory_mb"), "bench_train_ratio_vs_hf": train.get("ratio_vs_hf"),
        "run_tokens_per_s": run.get("tokens_per_s"), "run_expected_time": run.get("expected_time"),
        "run_peak_memory_mb": run.get("peak_memory_mb"),
        "generate_tokens_per_s_batch1": gen.get("tokens_per_s_batch1"), "generate_ratio_vs_hf": gen.get("ratio_vs_hf"),
        "torchrun_tokens_per_s": ddp.get("tokens_per_s"),
    }
    machine = {k: env.get(k) for k in ("cpu_model", "cpus", "gpu_name", "gpus", "torch", "python", "transformers")}
    summary = {"schema": 1, "mode": mode, "machine": machine, "steps": steps, "headline": headline,
               "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (out / "summary.md").write_text(summary_markdown(summary), encoding="utf-8")
    return summary


def summary_markdown(s: dict[str, Any]) -> str:
    m, h, st = s["machine"], s["headline"], s["steps"]
    lines = [f"# GPU check ({s['mode']})", "",
             f"Machine: {m.get('gpus')} x {m.get('gpu_name') or 'no GPU'}; CPU {m.get('cpu_model')} "
             f"({m.get('cpus')} cores); torch {m.get('torch')}, Python {m.get('python')}. Written {s['written']}.", "",
             "| step | status | wall s | figures |", "|---|---|---|---|"]
    figures = {
        "env": "",
        "bench_train": (f"{_fmt(h['bench_train_tokens_per_s'])} tokens/s, MFU {_fmt(h['bench_train_mfu'], '.1%')}, "
                        f"peak {_fmt(h['bench_train_peak_memory_mb'])} MB, ours/HF {_fmt(h['bench_train_ratio_vs_hf'], '.2f', 'x')}"
                        f" ({st['bench_train'].get('best_row', '')})"),
        "run": (f"{_fmt(h['run_tokens_per_s'])} tokens/s, MFU {_fmt(st['run'].get('mfu'), '.1%')}, "
                f"{_fmt(st['run'].get('steps'))} steps, peak {_fmt(h['run_peak_memory_mb'])} MB; "
                f"{h['run_expected_time'] or 'no expected_time event'}"),
        "generate": (f"batch 1: {_fmt(h['generate_tokens_per_s_batch1'])} tokens/s; ours/HF "
                     f"{_fmt(h['generate_ratio_vs_hf'], '.2f', 'x')}"),
        "torchrun": st["torchrun"].get("skipped") or f"{_fmt(h['torchrun_tokens_per_s'])} tokens/s over 2 processes",
    }
    for name in STEPS:
        step = st[name]
        text = figures[name] if "error" not in step else f"{step['error']}".replace("|", "/")
        lines.append(f"| {name} | {step['status']} | {_fmt(step.get('wall_s'), '.0f')} | {text} |")
    lines += ["", "Goal at the 125M shape: >= 45% MFU in bf16 (issue 16). Logs: steps.log.", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("step", choices=[*STEPS, "summarize"])
    p.add_argument("--work", required=True, type=Path)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--data", default=None)
    args = p.parse_args(argv)
    if args.step == "summarize":
        summarize(args.work, args.out or args.work, "dry-run" if args.dry_run else "gpu")
        return 0
    if args.dry_run:
        import torch

        torch.set_num_threads(1)
    result = STEP_FUNCTIONS[args.step](args)
    (args.work / "steps").mkdir(parents=True, exist_ok=True)
    (args.work / "steps" / f"{args.step}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    if args.step == "run" and not result.get("tokens_per_s"):
        return 1
    if args.step == "torchrun" and result.get("exit_status") not in (None, 0):
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
