"""`simone ablate`: does governance help? Train every variant on the same data and the same
token budget, evaluate them the same way, and write one table.

Variants (each its own run directory under OUT/runs/NAME):

    gpt2        the legacy GPT-2 baseline
    llama       the plain Llama-style model (governance off)
    full        governance on: policy head + memory slots + trace, comprehensive loss
    no-policy   full without the policy head (and so without its two loss terms)
    no-memory   full without the memory slots
    no-trace    full with tracing switched off (trace has no parameters: a control row)
    uncurated   full, trained on the corpus read with curation off (no dedup / quality /
                label filtering), evaluated on the curated run's clean validation set

Data. The corpus is curated once (OUT/shared); the tokenizer and the token shards are built
once from it, with domain control tokens before `data.control_token_prob` of the training
documents (0.5 when the config leaves it at 0, so that every variant can be steered), and
each variant's run directory links to them. The uncurated variant has its own curation,
tokenizer and shards, with every clean validation document removed from its training split
(by id and by text; a held-out slice is cut off the training text of its document), and is evaluated on the clean validation documents re-tokenized with its
own tokenizer; bits per byte makes the two tokenizers comparable.

Budget. All variants train for the same number of optimizer steps (so the same tokens):
`max_steps` if given, else what the slowest variant (full) fits into
`budget_minutes / n_variants` minutes, measured by timing a few of its steps first.

Measures per variant: parameters; validation bits per byte, overall and per domain; steering
accuracy (`simone.inference.steering`: a naive Bayes judge fitted on the training split, samples made
with `--domain X`), also with policy guidance for models with a policy head; streaming
perplexity and bits per byte of a validation text `stream_contexts` times longer than the
context, read through the bounded streaming cache (Llama-style models), beside the
independent-windows figure on the same text; training tokens/s.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from simone.config import Config
from simone.data.documents import read_documents, write_documents
from simone.rundir import RunDir, atomic_write_json, atomic_write_text

VARIANTS: dict[str, dict[str, Any]] = {
    "gpt2": {"arch": "gpt2", "governance": False},
    "llama": {"arch": "llama", "governance": False},
    "full": {"arch": "llama", "governance": True, "policy": True, "memory": True, "trace": True},
    "no-policy": {"arch": "llama", "governance": True, "policy": False, "memory": True, "trace": True},
    "no-memory": {"arch": "llama", "governance": True, "policy": True, "memory": False, "trace": True},
    "no-trace": {"arch": "llama", "governance": True, "policy": True, "memory": True, "trace": False},
    "uncurated": {"arch": "llama", "governance": True, "policy": True, "memory": True, "trace": True},
}
DEFAULT_CONTROL_PROB = 0.5


def _say(msg: str) -> None:
    print(f"[ablate] {msg}", flush=True)


@dataclass
class AblationSettings:
    budget_minutes: float = 30.0
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    max_steps: int | None = None  # overrides the budget-derived step count
    samples_per_domain: int = 4
    sample_tokens: int = 48
    guidance_weight: float = 1.0
    stream_contexts: int = 8  # streaming text length, in contexts
    seed: int = 0


# ----------------------------------------------------------------------------- data


def _link(target: Path, link: Path) -> None:
    """`link` -> `target` (a relative symlink; a copy where symlinks are not allowed)."""
    if link.is_symlink() or link.exists():
        return
    link.parent.mkdir(parents=True, exist_ok=True)
    try:
        link.symlink_to(os.path.relpath(target, link.parent), target_is_directory=True)
    except OSError:
        shutil.copytree(target, link)


def prepare_shared(cfg: Config, out: Path) -> RunDir:
    """Curate, train the tokenizer and build the shards once, in OUT/shared."""
    from simone.data.shards import build_shards
    from simone.workflows.pipeline import stage_curate, stage_tokenizer

    shared = RunDir(out / "shared")
    stage_curate(cfg, shared.root)
    tok = stage_tokenizer(cfg, shared.root)
    build_shards(shared.documents, tok, shared.data, cfg.data.control_token_prob, cfg.data.split_seed)
    return shared


def _text_key(text: str) -> str:
    return hashlib.sha256(" ".join(text.split()).encode("utf-8")).hexdigest()


def prepare_uncurated(cfg: Config, shared: RunDir, run: RunDir) -> Path:
    """Curation off into `run`, clean validation documents removed from its training split;
    returns the folder with the clean validation set tokenized by its own tokenizer."""
    from simone.data.shards import build_shards
    from simone.workflows.pipeline import stage_curate, stage_tokenizer

    stage_curate(cfg, run.root)
    clean_val = list(read_documents(shared.documents, "val"))
    whole_val = [d for d in clean_val if "slice" not in d]
    val_ids = {d.get("id") for d in whole_val} | {d.get("path") for d in whole_val}
    val_texts = {_text_key(d.get("text") or "") for d in whole_val}
    # a held-out slice is the tail of a document whose head trains: cut it off that document
    slice_heads = {d.get("path"): _words_pattern(d.get("text") or "") for d in clean_val if "slice" in d}
    documents = list(read_documents(run.documents))
    kept, dropped = [], 0
    for doc in documents:
        if doc.get("split") == "train" and (doc.get("id") in val_ids or doc.get("path") in val_ids
                                            or _text_key(doc.get("text") or "") in val_texts):
            dropped += 1
            continue
        if doc.get("split") == "train" and doc.get("path") in slice_heads:
            doc = _without_slice(doc, slice_heads[doc["path"]], documents)
            if doc is None:
                dropped += 1
                continue
        kept.append(doc)
    write_documents(run.documents, kept)
    _say(f"uncurated: {len(kept)} documents, {dropped} training copies of clean validation documents removed")
    tok = stage_tokenizer(cfg, run.root)
    build_shards(run.documents, tok, run.data, cfg.data.control_token_prob, cfg.data.split_seed)
    eval_dir = run.root / "clean_val"
    eval_dir.mkdir(parents=True, exist_ok=True)
    write_documents(eval_dir / "documents.jsonl", clean_val)
    build_shards(eval_dir / "documents.jsonl", tok, eval_dir)
    return eval_dir


def _words_pattern(text: str, n_words: int = 24) -> re.Pattern:
    """The first `n_words` words of `text`, matched across any whitespace (curation with and
    without cleaning may break lines differently)."""
    return re.compile(r"\s+".join(re.escape(w) for w in text.split()[:n_words]))


def _without_slice(doc: dict, head: re.Pattern, documents: list[dict]) -> dict | None:
    """`doc` (uncurated training text) cut where the clean held-out slice begins; unchanged
    when the slice begins in another part of the same file; None (drop it) when the slice's
    start is found nowhere, so held-out text can never be trained on."""
    text = doc.get("text") or ""
    m = head.search(text)
    if m is not None:
        return doc | {"text": text[: m.start()]} if m.start() > 0 else None
    others = (d.get("text") or "" for d in documents if d.get("path") == doc.get("path") and d is not doc)
    return doc if any(head.search(t) for t in others) else None


# ----------------------------------------------------------------------------- budget


def variant_config(base: Config, name: str) -> Config:
    cfg = copy.deepcopy(base)
    for key, value in VARIANTS[name].items():
        setattr(cfg.model, key, value)
    if name == "uncurated":
        cfg.curate.enabled = False
    cfg.preset = f"{base.preset}+{name}"
    return cfg


def seconds_per_step(cfg: Config, shared: RunDir, steps: int = 3) -> float:
    """Time a few optimizer steps (forward, backward, AdamW) of `cfg`'s model on real batches."""
    from simone.data.loader import BatchLoader
    from simone.data.shards import TokenShard
    from simone.devices import pick_device
    from simone.model import build_model

    tc = cfg.train
    device = pick_device(tc.device)
    shard = TokenShard(shared.data, "train")
    loader = BatchLoader(shard, tc.batch_size, cfg.model.max_seq_len, tc.seed, device=device)
    model = build_model(cfg.model).to(device).train()
    opt = model.configure_optimizer(tc.lr, tc.weight_decay, (tc.beta1, tc.beta2), device.type)

    def step() -> None:
        for _ in range(tc.grad_accum):
            x, y, d = loader.next_batch_with_domains()
            kwargs = {"domain_ids": d} if getattr(model, "policy_head", None) is not None else {}
            _, loss = model(x, y, **kwargs)
            (loss / tc.grad_accum).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    loader.close()
    return (time.perf_counter() - t0) / steps


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def streaming_eval(loaded, val_dir: Path, n_contexts: int) -> dict | None:
    """Streaming vs. independent-window perplexity on the same validation text: from the
    start of the longest validation document, n_contexts × max_seq_len tokens (fewer if the
    split is shorter). None for models without RoPE (GPT-2)."""
    from simone.data.shards import TokenShard
    from simone.inference.governed import streaming_nll

    cfg = loaded.config.model
    if cfg.arch != "llama":
        return None
    shard = TokenShard(val_dir, "val")
    if not shard.docs:
        return None
    longest = max(shard.docs, key=lambda d: d[3] - d[2])
    start = int(longest[2])
    span = torch.from_numpy(shard.tokens[start : start + n_contexts * cfg.max_seq_len + 1].astype("int64"))
    if span.numel() < 2:
        return None
    tok = loaded.tokenizer
    n_bytes = len(tok.decode([t for t in span[1:].tolist() if t != tok.eod_id]).encode("utf-8"))
    stream = streaming_nll(loaded.model, span, chunk=16)
    # independent windows of max_seq_len over the same targets
    window_nll = 0.0
    for lo in range(0, span.numel() - 1, cfg.max_seq_len):
        x = span[lo : lo + cfg.max_seq_len][None].to(loaded.device)
        y = span[lo + 1 : lo + 1 + x.size(1)][None].to(loaded.device)
        x = x[:, : y.size(1)]
        logits, _ = loaded.model(x)
        window_nll += float(torch.nn.functional.cross_entropy(logits[0].float(), y[0], reduction="sum"))
    n = stream["n_tokens"]
    bpb = lambda nll: nll / math.log(2) / n_bytes if n_bytes else float("nan")  # noqa: E731
    return {"tokens": n, "contexts": round(n / cfg.max_seq_len, 2), "stream_ppl": stream["ppl"],
            "stream_bpb": bpb(stream["nll_sum"]), "window_ppl": math.exp(min(window_nll / n, 50.0)),
            "window_bpb": bpb(window_nll), "cache_bytes": stream["cache_bytes"], "max_slots": stream["max_slots"]}


@torch.no_grad()
def policy_accuracy(loaded, val_dir: Path, max_batches: int) -> float | None:
    """Share of validation positions where the policy head's argmax is the true domain (every
    position, from the first token of a window on). None without a policy head."""
    from simone.data.loader import eval_windows
    from simone.data.shards import TokenShard

    model, cfg = loaded.model, loaded.config
    if getattr(model, "policy_head", None) is None:
        return None
    shard = TokenShard(val_dir, "val")
    classes = loaded.tokenizer.domains
    hits = total = 0
    for domain in shard.domains:
        if domain not in classes:
            continue
        for x, _ in eval_windows(shard, domain, cfg.model.max_seq_len, max_batches, cfg.train.batch_size,
                                 device=loaded.device):
            _, _, policy = model(x, return_policy=True)
            hits += int((policy.argmax(-1) == classes.index(domain)).sum())
            total += policy.shape[0] * policy.shape[1]
    return hits / total if total else None


def median_train_rate(run: RunDir) -> float | None:
    """Median training tokens/s over the logging intervals in metrics.jsonl (robust to the
    intervals that include an evaluation or a checkpoint)."""
    import statistics

    rates = []
    if run.metrics.exists():
        for line in run.metrics.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            if row.get("kind") == "train" and row.get("tokens_per_s"):
                rates.append(float(row["tokens_per_s"]))
    return statistics.median(rates) if rates else None


def evaluate_variant(name: str, run: RunDir, val_dir: Path, judge, settings: AblationSettings,
                     train_result) -> dict:
    from simone.inference.generate import load_model
    from simone.inference.steering import steering_accuracy
    from simone.data.shards import TokenShard
    from simone.inference.evaluate import evaluate_per_domain

    loaded = load_model(run.root)
    cfg = loaded.config
    row: dict[str, Any] = {"variant": name, "run_dir": str(run.root), "arch": cfg.model.arch,
                           "governance": {k: getattr(cfg.model, k) for k in ("governance", "policy", "memory", "trace")},
                           "params": loaded.model.num_params()}
    ev = evaluate_per_domain(loaded.model, TokenShard(val_dir, "val"), cfg.model.max_seq_len,
                             cfg.train.batch_size, cfg.train.eval_batches, loaded.device)
    row["val_bpb"] = ev["val_bpb"]
    row["val_loss"] = ev["val_loss"]
    row["per_domain_bpb"] = {d: v["bpb"] for d, v in ev["per_domain"].items()}
    steer = steering_accuracy(loaded, judge, samples_per_domain=settings.samples_per_domain,
                              max_tokens=settings.sample_tokens, seed=settings.seed)
    row["steering_accuracy"] = steer["accuracy"]
    row["steering_per_domain"] = steer["per_domain"]
    row["steering_samples"] = steer["samples"][: 2 * len(steer["per_domain"])]
    row["steering_accuracy_guided"] = None
    if getattr(loaded.model, "policy_head", None) is not None and settings.guidance_weight > 0:
        guided = steering_accuracy(loaded, judge, samples_per_domain=settings.samples_per_domain,
                                   max_tokens=settings.sample_tokens, seed=settings.seed,
                                   policy_guidance=settings.guidance_weight)
        row["steering_accuracy_guided"] = guided["accuracy"]
    row["policy_accuracy"] = policy_accuracy(loaded, val_dir, cfg.train.eval_batches)
    row["streaming"] = streaming_eval(loaded, val_dir, settings.stream_contexts)
    row["tokens_per_s_overall"] = getattr(train_result, "tokens_per_s", None)  # evaluation included
    row["tokens_per_s"] = median_train_rate(run) or row["tokens_per_s_overall"]
    row["tokens_seen"] = getattr(train_result, "tokens_seen", None)
    row["steps"] = getattr(train_result, "steps", None)
    row["train_seconds"] = getattr(train_result, "seconds", None)
    return row


# ----------------------------------------------------------------------------- the run


def run_ablation(cfg: Config, out: Path, settings: AblationSettings) -> dict:
    """Train and evaluate every variant in `settings.variants` into `out`; write
    `ablation.json`, `ablation.md` and `ablation.svg` there and return the result dict."""
    from simone.model import set_policy_domains
    from simone.workflows.pipeline import stage_train
    from simone.inference.steering import fit_on_documents, snippet_accuracy
    from simone.data.tokenizer import load_tokenizer

    unknown = [v for v in settings.variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown ablation variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = copy.deepcopy(cfg)
    if cfg.data.control_token_prob <= 0:
        cfg.data.control_token_prob = DEFAULT_CONTROL_PROB
    t0 = time.time()
    _say(f"shared data in {out / 'shared'}")
    shared = prepare_shared(cfg, out)
    tok = load_tokenizer(shared.tokenizer)
    judge = fit_on_documents(shared.documents)
    judge_acc = snippet_accuracy(judge, shared.documents, snippet_words=max(8, settings.sample_tokens * 3 // 4))
    _say(f"steering judge (naive Bayes, {len(judge.classes)} domains): {judge_acc:.1%} on validation snippets")

    # the step budget: what the slowest variant fits into its share of the time
    n = len(settings.variants)
    share_s = settings.budget_minutes * 60 / max(1, n)
    if settings.max_steps is not None:
        steps = settings.max_steps
    else:
        probe = variant_config(cfg, "full")
        set_policy_domains(probe.model, tok.domains)
        sec = seconds_per_step(probe, shared)
        steps = max(1, int(0.6 * share_s / sec))  # the rest of the share: evaluation, checkpoints
        _say(f"budget: {settings.budget_minutes} min for {n} variants; {sec:.2f} s/step -> {steps} steps each")

    rows = []
    for name in settings.variants:
        vcfg = variant_config(cfg, name)
        tc = vcfg.train
        tc.max_steps = steps
        # The step count is the budget; the time cap is only a guard against a stuck run (on a
        # busy machine a variant may take longer than its share, but it still gets its tokens).
        tc.max_minutes = max(share_s / 60 * 5, 2.0)
        tc.eval_every = tc.checkpoint_every = steps
        tc.sample_every = 0
        run = RunDir(out / "runs" / name)
        run.root.mkdir(parents=True, exist_ok=True)
        if name == "uncurated":
            val_dir = prepare_uncurated(vcfg, shared, run)
        else:
            _link(shared.data, run.data)
            _link(shared.tokenizer_dir, run.tokenizer_dir)
            val_dir = shared.data
        vtok = load_tokenizer(run.tokenizer)
        vcfg.model.vocab_size = vtok.vocab_size
        set_policy_domains(vcfg.model, vtok.domains)
        _say(f"{name}: training {steps} steps")
        result = stage_train(vcfg, run.root, force=True)  # a rerun into the same --out starts over
        if getattr(result, "stop_reason", None) == "signal":
            raise KeyboardInterrupt(f"ablation stopped by a signal while training {name}")
        rows.append(evaluate_variant(name, run, val_dir, judge, settings, result))
        r = rows[-1]
        _say(f"{name}: val bpb {r['val_bpb']:.4f}, steering {r['steering_accuracy']:.0%}, "
             f"{(r['tokens_per_s'] or 0):,.0f} tok/s")

    result = {"schema": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "preset": cfg.preset, "corpus": str(cfg.data.data_dir), "budget_minutes": settings.budget_minutes,
              "steps_per_variant": steps, "tokens_per_step": cfg.train.batch_size * cfg.train.grad_accum * cfg.model.max_seq_len,
              "control_token_prob": cfg.data.control_token_prob, "domains": tok.domains,
              "steering_judge": {"kind": "multinomial naive Bayes, words, uniform prior",
                                 "validation_snippet_accuracy": judge_acc, "chance": 1 / max(1, len(judge.classes))},
              "settings": settings.__dict__, "variants": rows, "seconds": round(time.time() - t0, 1)}
    atomic_write_json(out / "ablation.json", result)
    atomic_write_text(out / "ablation.md", ablation_markdown(result))
    atomic_write_text(out / "ablation.svg", ablation_svg(result))
    _say(f"wrote {out / 'ablation.md'}")
    return result


# ----------------------------------------------------------------------------- report


def _f(value: Any, fmt: str = ".4f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value, fmt)


def ablation_markdown(result: dict) -> str:
    rows = result["variants"]
    domains = sorted({d for r in rows for d in r["per_domain_bpb"]})
    head = (["variant", "params", "val bpb"] + [f"bpb {d}" for d in domains]
            + ["steering", "steering (guided)", "policy acc", "stream ppl", "stream bpb", "window bpb", "train tokens", "tokens/s"])
    lines = [
        "# SIM-ONE governance ablation", "",
        f"Preset `{result['preset']}`, {result['steps_per_variant']} optimizer steps per variant "
        f"({result['steps_per_variant'] * result['tokens_per_step']:,} training tokens), same data split; "
        f"control tokens before {result['control_token_prob']:.0%} of training documents. "
        f"Validation bits per byte on the curated validation set (lower is better). Steering: share of "
        f"samples made with `--domain X` that a naive Bayes judge assigns to X (judge's own accuracy on "
        f"validation snippets {result['steering_judge']['validation_snippet_accuracy']:.0%}, chance "
        f"{result['steering_judge']['chance']:.0%}); guided adds `--policy-guidance "
        f"{result['settings']['guidance_weight']}`. Policy acc: share of validation positions whose "
        f"policy-head argmax is the true domain. Streaming: a validation text of "
        f"~{result['settings']['stream_contexts']} contexts read through the bounded cache (stream) vs. "
        f"independent context-sized windows (window).", "",
        "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|",
    ]
    for r in rows:
        s = r.get("streaming") or {}
        cells = ([r["variant"], f"{r['params']:,}", _f(r["val_bpb"])]
                 + [_f(r["per_domain_bpb"].get(d)) for d in domains]
                 + [_f(r["steering_accuracy"], ".0%"), _f(r.get("steering_accuracy_guided"), ".0%"),
                    _f(r.get("policy_accuracy"), ".0%"),
                    _f(s.get("stream_ppl"), ".2f"), _f(s.get("stream_bpb")), _f(s.get("window_bpb")),
                    _f(r.get("tokens_seen"), ",d"), _f(r.get("tokens_per_s"), ",.0f")])
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Variants: " + "; ".join(f"`{n}`" for n in (r["variant"] for r in rows)) + 
              ". See `simone/workflows/ablate.py` for their definitions.", ""]
    return "\n".join(lines)


def ablation_svg(result: dict) -> str:
    """Two bar charts side by side: validation bits per byte and steering accuracy."""
    rows = result["variants"]
    bar_h, gap, label_w, chart_w = 18, 6, 90, 260
    height = 40 + len(rows) * (bar_h + gap)

    def chart(x0: int, title: str, values: list[float | None], fmt: str, colour: str) -> str:
        finite = [v for v in values if v is not None and not math.isnan(v)]
        top = max(finite) if finite else 1.0
        parts = [f'<text x="{x0 + label_w}" y="16" font-size="13" font-weight="bold">{title}</text>']
        for i, (r, v) in enumerate(zip(rows, values)):
            y = 28 + i * (bar_h + gap)
            parts.append(f'<text x="{x0 + label_w - 6}" y="{y + 13}" font-size="12" text-anchor="end">'
                         f'{r["variant"]}</text>')
            if v is None or math.isnan(v):
                parts.append(f'<text x="{x0 + label_w + 4}" y="{y + 13}" font-size="11">n/a</text>')
                continue
            w = chart_w * v / top if top > 0 else 0
            parts.append(f'<rect x="{x0 + label_w}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{colour}"/>')
            parts.append(f'<text x="{x0 + label_w + w + 4:.1f}" y="{y + 13}" font-size="11">{format(v, fmt)}</text>')
        return "".join(parts)

    width = 2 * (label_w + chart_w + 60)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'font-family="sans-serif">'
            + chart(0, "validation bits per byte (lower is better)", [r["val_bpb"] for r in rows], ".3f", "#4c78a8")
            + chart(label_w + chart_w + 60, "steering accuracy", [r["steering_accuracy"] for r in rows], ".0%",
                    "#f58518")
            + "</svg>\n")
