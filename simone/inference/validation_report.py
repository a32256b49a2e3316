"""`simone validate`: does the trained model load, is every file intact, how good is it?

Writes `report.json` (for tools) and `report.md` (for people). Each check has a name, a
pass/fail and a detail; the report's `ok` is false when any check fails, and the CLI then
exits non-zero. A continued model (`--init-from`) also gets its parent (`continued_from`) and
what it forgot (`forgetting`: bits per byte on the new data and on the parent's validation
text, before and after its training; measured by simone/workflows/continued.py).
"""

from __future__ import annotations

import contextlib
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from simone.checkpoint import CheckpointError, verify_checkpoint
from simone.config import ValidateConfig, analytic_param_count
from simone.data.shards import TokenShard
from simone.inference.generate import stream_tokens
from simone.inference.load import ModelLoadError, load_model
from simone.inference.shard_loss import evaluate_per_domain
from simone.rundir import RunDir, atomic_write_json, atomic_write_text, read_json, sha256_file

SAMPLE_PROMPTS = ["The ", "And it came to pass", "What is "]
FORGETTING_FILE = "forgetting.json"  # RUN/validation/: a continued run's bpb before and after
FORGETTING_TEXTS = {"new_data": "new data (this run's validation text)", "parent_data": "the parent's validation text"}


def _default_out_dir(model_path: Path) -> Path:
    if model_path.is_dir() and (model_path / "checkpoints").is_dir():
        return model_path / "validation"
    name = model_path.name.removesuffix(".tar.gz").removesuffix(".tgz")
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


def _training_stop(model_path: Path, loaded) -> dict[str, Any]:
    """Why the training behind this model stopped and how far its learning-rate schedule got:
    from the run's status.json, or a package's training_summary.json (None when unknown)."""
    for status in (RunDir(model_path).status, RunDir(loaded.files["checkpoint"].parent.parent).status):
        if status.is_file():
            found = read_json(status, {}) or {}
            break
    else:
        summary = loaded.files.get("summary")
        found = (read_json(summary, {}) or {}).get("training", {}) if summary else {}
    return {"stop_reason": found.get("stop_reason"), "schedule_progress": found.get("schedule_progress")}


def _continued(model_path: Path, loaded) -> dict[str, Any]:
    """A continued model's parent (its config's `train.parent`) and what it forgot: from the run's
    validation/forgetting.json, or a package's training_summary.json ({} for a model trained from scratch)."""
    parent = loaded.config.train.parent
    if not parent:
        return {}
    runs = [] if loaded.unpacked is not None else [model_path, loaded.files["checkpoint"].parent.parent]
    found = next((read_json(p) for r in runs if (p := RunDir(r).validation / FORGETTING_FILE).is_file()), None)
    if found is None and loaded.files.get("summary"):
        found = (read_json(loaded.files["summary"], {}) or {}).get("forgetting")
    return {"continued_from": {k: parent.get(k) for k in ("name", "sha256", "of")}, "forgetting": found}


def forgetting_line(f: dict[str, Any]) -> str:
    """The forgetting figures in one line: bits per byte before → after, for each text."""

    def bpb(value) -> str:
        return "–" if value is None else f"{value:.4f}"

    parts = [
        f"{name.split(' (')[0]} {bpb(f.get(key, {}).get('before'))} → {bpb(f.get(key, {}).get('after'))}"
        for key, name in FORGETTING_TEXTS.items()
    ]
    return "bits per byte before → after: " + "; ".join(parts)


def forgetting_markdown(f: dict[str, Any]) -> list[str]:
    """The forgetting figures as a markdown table (with each text's note), for report.md and the model card."""
    lines = ["| text | bytes | before (the parent) | after | change |", "|---|---|---|---|---|"]
    notes = []
    for key, name in FORGETTING_TEXTS.items():
        e = f.get(key) or {}
        before, after = e.get("before"), e.get("after")
        cells = ["–" if v is None else f"{v:.4f}" for v in (before, after)]
        change = "–" if before is None or after is None else f"{after - before:+.4f}"
        lines.append(f"| {name} | {e.get('bytes') or '–'} | {cells[0]} | {cells[1]} | {change} |")
        notes += [f"{name}: {e['note']}"] if e.get("note") else []
    return lines + (["", *notes] if notes else [])


def _reset_peak_rss() -> None:
    """Start a fresh peak-RSS measurement (Linux: `5` into /proc/self/clear_refs resets VmHWM),
    so validation after training in the same process measures validation, not training."""
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss_mb() -> float:
    """Peak resident memory of this process in MB: VmHWM where Linux has it (it honours
    `_reset_peak_rss`), else ru_maxrss (KiB on Linux, bytes on macOS: the lifetime peak)."""
    with contextlib.suppress(OSError), open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


# ----------------------------------------------------------------------------- diversity


def distinct_n(words: list[str], n: int = 2) -> float | None:
    """Distinct n-grams / all n-grams of `words` (1.0: no n-gram repeats; near 0: a loop);
    None when the text has fewer than n words."""
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


def longest_repeated_ngram(words: list[str]) -> int:
    """Length of the longest word n-gram that occurs at least twice in `words` (0: none).
    If no n-gram repeats, no longer one can, so the search stops at the first n without one."""
    n = 0
    while n < len(words):
        grams = [tuple(words[i : i + n + 1]) for i in range(len(words) - n)]
        if len(set(grams)) == len(grams):
            break
        n += 1
    return n


def diversity(texts: list[str]) -> dict[str, Any]:
    """Repetition figures over whitespace words, each text on its own, then averaged
    (distinct-2) or maximised (longest repeated n-gram)."""
    word_lists = [t.split() for t in texts]
    d2 = [x for x in (distinct_n(w, 2) for w in word_lists) if x is not None]
    return {
        "distinct_2": round(sum(d2) / len(d2), 4) if d2 else None,
        "longest_repeated_ngram": max((longest_repeated_ngram(w) for w in word_lists), default=0),
        "texts": len(texts),
        "words": sum(len(w) for w in word_lists),
    }


def validation_snippets(shard: TokenShard, tokenizer, n: int, n_tokens: int) -> list[str]:
    """`n` stretches of `n_tokens` validation tokens, evenly spaced over the split (the same
    length as the samples, since repetition figures depend on length)."""
    if shard.n_tokens <= n_tokens or n < 1:
        return [tokenizer.decode(int(t) for t in shard.tokens[: shard.n_tokens])] if shard.n_tokens else []
    step = (shard.n_tokens - n_tokens) // n
    return [tokenizer.decode(int(t) for t in shard.tokens[i * step : i * step + n_tokens]) for i in range(n)]


def validate(
    model_path: Path,
    out_dir: Path | None = None,
    data_dir: Path | None = None,
    max_batches: int | None = None,
    sample_tokens: int = 48,
    bounds: ValidateConfig | None = None,
) -> dict[str, Any]:
    """Run every check on a run dir, checkpoint dir or package; write report.json and report.md.

    `bounds`: the generation-speed and peak-memory bounds (default: the model's own config's
    `validate` section, i.e. its preset's)."""
    _reset_peak_rss()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    model_path = Path(model_path)
    out_dir = Path(out_dir) if out_dir else _default_out_dir(model_path)
    checks: list[dict[str, Any]] = []
    report: dict[str, Any] = {
        "schema": 1,
        "model": str(model_path.resolve()),
        "checks": checks,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }

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
    try:
        verify_checkpoint(loaded.files["checkpoint"])
        problems = []
    except CheckpointError as e:
        problems = [str(e)]
    report["artifacts"] = {
        name: {"path": str(p), "sha256": sha256_file(p), "bytes": p.stat().st_size}
        for name, p in loaded.files.items()
        if p.is_file()
    }
    check("integrity", not problems, "; ".join(problems) or f"{len(report['artifacts'])} files match their manifest")

    report.update(_training_stop(model_path, loaded))
    report.update(_continued(model_path, loaded))
    model, cfg = loaded.model, loaded.config
    n_params = sum(p.numel() for p in model.parameters())
    report["params"] = n_params
    report["weights_mb"] = round(loaded.weights.stat().st_size / 2**20, 2)
    check(
        "parameters",
        n_params > 0 and all(torch.isfinite(p).all() for p in model.parameters()),
        f"{n_params:,} parameters, {report['weights_mb']} MB, all finite",
    )
    expected = analytic_param_count(cfg.model)
    report["params_expected"] = expected
    check(
        "parameter_count",
        n_params == expected,
        f"{n_params:,} parameters = the config's analytic count"
        if n_params == expected
        else f"the model has {n_params:,} parameters, its config's analytic count is {expected:,} "
        f"(difference {n_params - expected:+,})",
    )

    data_dir = data_dir or _find_data_dir(model_path, loaded)
    if data_dir is None:
        check("validation_loss", True, "skipped: no validation shards next to this model (pass --data-dir)")
    else:
        val_shard = TokenShard(data_dir, "val")
        ev = evaluate_per_domain(
            model,
            val_shard,
            seq_len=cfg.model.max_seq_len,
            batch_size=cfg.train.batch_size,
            max_batches=max_batches or cfg.train.eval_batches,
            device=loaded.device,
        )
        report.update(ev)
        # domains that validate on the held-out tail of a training document (curation's slices)
        report["held_out_slices"] = {
            d: v["n_slices"] for d, v in val_shard.info["domains"].items() if v.get("n_slices")
        }
        loss = ev["val_loss"]
        uniform = math.log(cfg.model.vocab_size)
        ok = loss is not None and math.isfinite(loss) and loss < uniform
        check(
            "validation_loss",
            ok,
            f"loss {loss:.4f} (uniform guess {uniform:.2f}), ppl {ev['val_ppl']:.1f}, bpb {ev['val_bpb']:.3f}"
            if loss is not None
            else "no validation tokens",
        )

    samples, continuations = [], []
    n_tokens, seconds = 0, 0.0
    for i, prompt in enumerate(SAMPLE_PROMPTS):
        t0 = time.perf_counter()
        token_ids: list[int] = []
        pieces = list(stream_tokens(loaded, prompt, max_tokens=sample_tokens, seed=i, token_ids=token_ids))
        seconds += time.perf_counter() - t0
        n_tokens += len(token_ids)
        samples.append({"prompt": prompt, "text": prompt + "".join(pieces)})
        continuations.append("".join(pieces))
    report["samples"] = samples
    report["generation_tokens_per_s"] = round(n_tokens / max(seconds, 1e-9), 1)
    report["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    if loaded.device.type == "cuda":
        report["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    check(
        "generation",
        n_tokens > 0 and any(s["text"].strip() != s["prompt"].strip() for s in samples),
        f"{n_tokens} tokens at {report['generation_tokens_per_s']} tok/s",
    )

    # repetition: the generated continuations beside validation text of the same length
    report["diversity"] = {"samples": diversity(continuations)}
    if data_dir is not None:
        snippets = validation_snippets(TokenShard(data_dir, "val"), loaded.tokenizer, len(samples), sample_tokens)
        report["diversity"]["validation_text"] = diversity(snippets)

    _check_bounds(check, report, bounds or cfg.validate, loaded.device.type, cfg.preset)

    loaded.close()  # an extracted package's temporary folder (else removed when `loaded` goes)
    return _finish(report, out_dir)


def _check_bounds(check, report: dict[str, Any], bounds: ValidateConfig, device_type: str, preset: str) -> None:
    """Generation speed and peak memory against the preset's bounds; a failure names both."""
    key = "min_generation_tokens_per_s_cuda" if device_type == "cuda" else "min_generation_tokens_per_s_cpu"
    floor, speed = getattr(bounds, key), report["generation_tokens_per_s"]
    report["bounds"] = {key: floor, "max_peak_rss_mb": bounds.max_peak_rss_mb}
    check(
        "generation_speed",
        speed >= floor,
        f"generation {speed} tokens/s "
        + (">=" if speed >= floor else "is below")
        + f" the bound {floor} tokens/s (validate.{key}, preset {preset})",
    )
    figures = [("peak RSS", report["peak_rss_mb"], "max_peak_rss_mb")]
    if "peak_gpu_mb" in report:
        report["bounds"]["max_peak_gpu_mb"] = bounds.max_peak_gpu_mb
        figures.append(("peak GPU memory", report["peak_gpu_mb"], "max_peak_gpu_mb"))
    over = [(name, value, k) for name, value, k in figures if value > getattr(bounds, k)]
    check(
        "peak_memory",
        not over,
        "; ".join(
            f"{name} {value} MB exceeds the bound {getattr(bounds, k)} MB (validate.{k}, preset {preset})"
            for name, value, k in over
        )
        or ", ".join(f"{name} {value} MB <= {getattr(bounds, k)} MB" for name, value, k in figures),
    )


def _finish(report: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    report["failed"] = [c["name"] for c in report["checks"] if not c["ok"]]
    report["ok"] = not report["failed"]
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "report.json", report)
    atomic_write_text(out_dir / "report.md", report_markdown(report))
    report["report_dir"] = str(out_dir)
    return report


def report_markdown(r: dict[str, Any]) -> str:
    lines = [
        "# Validation report",
        "",
        f"Model: `{r['model']}`  ",
        f"Created: {r['created']}  ",
        f"Result: **{'PASS' if r['ok'] else 'FAIL'}**",
        "",
        "## Checks",
        "",
        "| check | result | detail |",
        "|---|---|---|",
    ]
    for c in r["checks"]:
        lines.append(f"| {c['name']} | {'pass' if c['ok'] else '**FAIL**'} | {c['detail'].replace('|', '/')} |")
    if r.get("params"):
        lines += ["", f"Parameters: {r['params']:,} ({r.get('weights_mb')} MB of weights)"]
    if r.get("stop_reason"):  # how the training behind this model ended
        progress = r.get("schedule_progress")  # rounded down: 99.9% is not a finished schedule
        done = "" if progress is None else f", learning-rate schedule {math.floor(progress * 1e3 + 1e-6) / 10:g}% done"
        lines += ["", f"Training stopped: {r['stop_reason']}{done}"]
    if r.get("continued_from"):
        p = r["continued_from"]
        lines += ["", "## Continued from", "", f"`{p['name']}` (sha256 of its {p.get('of')}: `{p['sha256']}`)"]
        if r.get("forgetting"):
            lines += ["", "Bits per byte (lower is better) of the parent before and of this model after training:", ""]
            lines += forgetting_markdown(r["forgetting"])
    if r.get("per_domain"):
        lines += [
            "",
            "## Validation by domain",
            "",
            "| domain | loss | perplexity | bits per byte | tokens |",
            "|---|---|---|---|---|",
        ]
        for d, v in r["per_domain"].items():
            lines.append(f"| {d} | {v['loss']:.4f} | {v['ppl']:.1f} | {v['bpb']:.3f} | {v['tokens']} |")
        lines.append(f"| **all** | {r['val_loss']:.4f} | {r['val_ppl']:.1f} | {r['val_bpb']:.3f} | {r['tokens']} |")
        if r.get("held_out_slices"):
            lines += [
                "",
                "Validation text of "
                + ", ".join(f"**{d}**" for d in r["held_out_slices"])
                + " is a held-out slice: the tail of a training document, cut at a paragraph break and never "
                "trained on (a domain with a single document has no other to spare).",
            ]
    if r.get("samples"):
        lines += ["", "## Samples", ""]
        for s in r["samples"]:
            lines += [f"- `{s['prompt']}` → {s['text']!r}"]
        lines += ["", f"Generation: {r['generation_tokens_per_s']} tokens/s; peak RSS {r['peak_rss_mb']} MB"]
    if r.get("diversity"):
        lines += [
            "",
            "## Repetition",
            "",
            "Word-level, each text alone: distinct-2 = distinct bigrams / bigrams (1.0: none repeats); "
            "longest repeated n-gram in words.",
            "",
            "| text | distinct-2 | longest repeated n-gram | texts | words |",
            "|---|---|---|---|---|",
        ]
        for label, key in (("samples", "samples"), ("validation text (same length)", "validation_text")):
            d = r["diversity"].get(key)
            if d:
                d2 = "–" if d["distinct_2"] is None else f"{d['distinct_2']:.3f}"
                lines.append(f"| {label} | {d2} | {d['longest_repeated_ngram']} | {d['texts']} | {d['words']} |")
    if r.get("artifacts"):
        lines += ["", "## Files", "", "| file | bytes | sha256 |", "|---|---|---|"]
        for name, a in r["artifacts"].items():
            lines.append(f"| {name}: `{Path(a['path']).name}` | {a['bytes']} | `{a['sha256'][:16]}…` |")
    return "\n".join(lines) + "\n"


def format_report(r: dict[str, Any]) -> list[Table | str]:
    """The report for the console: a rich table of the checks, then (plain text) where
    report.md is."""
    t = Table(title=f"validation: {'PASS' if r['ok'] else 'FAIL'}", show_lines=False)
    t.add_column("check")
    t.add_column("result")
    t.add_column("detail", overflow="fold")
    for c in r["checks"]:
        t.add_row(c["name"], "[green]pass[/]" if c["ok"] else "[red]FAIL[/]", c["detail"])
    forgetting: list[Table | str] = (
        [f"continued from {r['continued_from']['name']}: {forgetting_line(r['forgetting'])}"]
        if r.get("forgetting")
        else []
    )
    return [t, *forgetting] + ([f"report: {Path(r['report_dir']) / 'report.md'}"] if r.get("report_dir") else [])
