"""`simone validate`: does the trained model load, is every file intact, how good is it?

Writes `report.json` (for tools) and `report.md` (for people). Each check has a name, a
pass/fail and a detail; the report's `ok` is false when any check fails, and the CLI then
exits non-zero.
"""

from __future__ import annotations

import math
import resource
import time
from pathlib import Path
from typing import Any

import torch

from simone.data.shards import TokenShard
from simone.evaluate import evaluate_per_domain
from simone.rundir import atomic_write_json, atomic_write_text, sha256_file

SAMPLE_PROMPTS = ["The ", "And it came to pass", "What is "]


def _default_out_dir(model_path: Path) -> Path:
    if model_path.is_dir() and (model_path / "checkpoints").is_dir():
        return model_path / "validation"
    name = model_path.name
    for suffix in (".tar.gz", ".tgz"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return model_path.parent / f"{name}.validation"


def _find_data_dir(model_path: Path, loaded) -> Path | None:
    """The run's data/ folder with val.bin, when the model came from a run (a run dir or a
    checkpoint inside its checkpoints/); never for a package, which carries no shards."""
    if loaded.unpacked is not None:
        return None
    candidates = [model_path / "data"]
    ckpt = loaded.files["checkpoint"]
    if ckpt.parent.name == "checkpoints":
        candidates.append(ckpt.parent.parent / "data")
    for cand in candidates:
        if (cand / "index.json").exists() and (cand / "val.bin").exists():
            return cand
    return None


def _peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def validate(model_path: Path, out_dir: Path | None = None, data_dir: Path | None = None,
             max_batches: int | None = None, sample_tokens: int = 48) -> dict[str, Any]:
    """Run every check on a run dir, checkpoint dir or package; write report.json and report.md."""
    from simone.generate import ModelLoadError, load_model, stream_tokens

    model_path = Path(model_path)
    out_dir = Path(out_dir) if out_dir else _default_out_dir(model_path)
    checks: list[dict[str, Any]] = []
    report: dict[str, Any] = {"schema": 1, "model": str(model_path.resolve()), "checks": checks,
                              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def check(name: str, ok: bool, detail: str) -> bool:
        checks.append({"name": name, "ok": bool(ok), "detail": detail})
        return ok

    try:
        loaded = load_model(model_path)
        check("loads", True, f"{loaded.weights}")
    except (ModelLoadError, Exception) as e:
        check("loads", False, f"{type(e).__name__}: {e}")
        return _finish(report, out_dir)

    # integrity: the sha256 of every artifact, checked against its manifest
    from simone.train.checkpoint import CheckpointError, verify_checkpoint

    try:
        verify_checkpoint(loaded.files["checkpoint"])
        problems = []
    except CheckpointError as e:
        problems = [str(e)]
    report["artifacts"] = {name: {"path": str(p), "sha256": sha256_file(p), "bytes": p.stat().st_size}
                           for name, p in loaded.files.items() if p.is_file()}
    check("integrity", not problems, "; ".join(problems) or f"{len(report['artifacts'])} files match their manifest")

    model, cfg = loaded.model, loaded.config
    n_params = sum(p.numel() for p in model.parameters())
    report["params"] = n_params
    report["weights_mb"] = round(loaded.weights.stat().st_size / 2**20, 2)
    check("parameters", n_params > 0 and all(torch.isfinite(p).all() for p in model.parameters()),
          f"{n_params:,} parameters, {report['weights_mb']} MB, all finite")

    data_dir = data_dir or _find_data_dir(model_path, loaded)
    if data_dir is None:
        check("validation_loss", True, "skipped: no validation shards next to this model (pass --data-dir)")
    else:
        ev = evaluate_per_domain(model, TokenShard(data_dir, "val"), seq_len=cfg.model.max_seq_len,
                                 batch_size=cfg.train.batch_size, max_batches=max_batches or cfg.train.eval_batches,
                                 device=loaded.device)
        report.update(ev)
        loss = ev["val_loss"]
        uniform = math.log(cfg.model.vocab_size)
        ok = loss is not None and math.isfinite(loss) and loss < uniform
        check("validation_loss", ok,
              f"loss {loss:.4f} (uniform guess {uniform:.2f}), ppl {ev['val_ppl']:.1f}, bpb {ev['val_bpb']:.3f}"
              if loss is not None else "no validation tokens")

    samples = []
    n_tokens, seconds = 0, 0.0
    for i, prompt in enumerate(SAMPLE_PROMPTS):
        t0 = time.perf_counter()
        token_ids: list[int] = []
        pieces = list(stream_tokens(loaded, prompt, max_tokens=sample_tokens, seed=i,
                                    token_ids=token_ids))
        seconds += time.perf_counter() - t0
        n_tokens += len(token_ids)
        samples.append({"prompt": prompt, "text": prompt + "".join(pieces)})
    report["samples"] = samples
    report["generation_tokens_per_s"] = round(n_tokens / max(seconds, 1e-9), 1)
    report["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    if loaded.device.type == "cuda":
        report["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    check("generation", n_tokens > 0 and any(s["text"].strip() != s["prompt"].strip() for s in samples),
          f"{n_tokens} tokens at {report['generation_tokens_per_s']} tok/s")
    loaded.close()  # an extracted package's temporary folder (else removed when `loaded` goes)
    return _finish(report, out_dir)


def _finish(report: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    report["failed"] = [c["name"] for c in report["checks"] if not c["ok"]]
    report["ok"] = not report["failed"]
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "report.json", report)
    atomic_write_text(out_dir / "report.md", report_markdown(report))
    report["report_dir"] = str(out_dir)
    return report


def report_markdown(r: dict[str, Any]) -> str:
    lines = ["# Validation report", "", f"Model: `{r['model']}`  ", f"Created: {r['created']}  ",
             f"Result: **{'PASS' if r['ok'] else 'FAIL'}**", "", "## Checks", "", "| check | result | detail |",
             "|---|---|---|"]
    for c in r["checks"]:
        lines.append(f"| {c['name']} | {'pass' if c['ok'] else '**FAIL**'} | {c['detail'].replace('|', '/')} |")
    if r.get("params"):
        lines += ["", f"Parameters: {r['params']:,} ({r.get('weights_mb')} MB of weights)"]
    if r.get("per_domain"):
        lines += ["", "## Validation by domain", "", "| domain | loss | perplexity | bits per byte | tokens |",
                  "|---|---|---|---|---|"]
        for d, v in r["per_domain"].items():
            lines.append(f"| {d} | {v['loss']:.4f} | {v['ppl']:.1f} | {v['bpb']:.3f} | {v['tokens']} |")
        lines.append(f"| **all** | {r['val_loss']:.4f} | {r['val_ppl']:.1f} | {r['val_bpb']:.3f} | {r['tokens']} |")
    if r.get("samples"):
        lines += ["", "## Samples", ""]
        for s in r["samples"]:
            lines += [f"- `{s['prompt']}` → {s['text']!r}"]
        lines += ["", f"Generation: {r['generation_tokens_per_s']} tokens/s; peak RSS {r['peak_rss_mb']} MB"]
    if r.get("artifacts"):
        lines += ["", "## Files", "", "| file | bytes | sha256 |", "|---|---|---|"]
        for name, a in r["artifacts"].items():
            lines.append(f"| {name}: `{Path(a['path']).name}` | {a['bytes']} | `{a['sha256'][:16]}…` |")
    return "\n".join(lines) + "\n"


def print_report(r: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"validation: {'PASS' if r['ok'] else 'FAIL'}", show_lines=False)
    t.add_column("check")
    t.add_column("result")
    t.add_column("detail", overflow="fold")
    for c in r["checks"]:
        t.add_row(c["name"], "[green]pass[/]" if c["ok"] else "[red]FAIL[/]", c["detail"])
    Console(stderr=False).print(t)
    if r.get("report_dir"):
        print(f"report: {Path(r['report_dir']) / 'report.md'}")
