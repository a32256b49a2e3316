"""`simone ablate`: does governance help? Train every variant with several seeds on the same
data and the same token budget, evaluate them the same way, and write one table with error bars.

Variants (each seed its own run directory under OUT/runs/NAME/seed_K):

    gpt2        the legacy GPT-2 baseline
    llama       the plain Llama-style model (governance off): the reference for every difference
    full        governance on: policy head + memory slots + trace, comprehensive loss
    no-policy   full without the policy head (and so without its two loss terms)
    no-memory   full without the memory slots
    no-trace    full with tracing switched off (trace has no parameters: a control row)
    uncurated   full, trained on the corpus read with curation off (no dedup / quality /
                label filtering), evaluated on the curated run's clean validation set

A sweep point is `BASE@TAG` (e.g. `full@mem16`) with its own `--set` overrides
(`AblationSettings.overrides`, `simone ablate --vset full@mem16:model.n_memory_slots=16`); the
knobs worth sweeping: `model.policy_loss_weight` and `model.coherence_weight` (the auxiliary
losses), `model.policy_layer`, `model.n_memory_slots`, `data.control_window_prob` (control
tokens at window starts: the loader), and `ablate.guidance_weight` (the policy guidance this
variant's guided steering uses). A sweep point that differs from a variant only in `ablate.*`
settings evaluates the model that variant trained (same config, seed and budget) instead of
training it again; with `--resume`, a finished run whose evaluation settings changed is
evaluated again, not trained again; a run its time guard stopped before its step budget is
trained again, not reused. A sweep point is compared with the plain model, with its
base (`full@cw` with `full`) and with the plain model of the same tag (`llama@cw`).

Data. The corpus is curated once (OUT/shared); the tokenizer and the token shards are built
once from it, with domain control tokens before `data.control_token_prob` of the training
documents (0.5 when the config leaves it at 0, so that every variant can be steered), and
each run directory links to them. The uncurated variant has its own curation, tokenizer and
shards (OUT/uncurated, built once), with every clean validation document removed from its
training split (by id and by text; a held-out slice is cut off the training text of its
document); the clean validation documents, re-tokenized with its own tokenizer, are its
held-out set. Bits per byte makes the two tokenizers comparable.

Seeds. Seed K trains with `train.seed` + K, which draws both the initial weights and the
order of the training windows; steering samples are drawn with their own seed per K.

Budget. All variants train for the same number of optimizer steps (so the same tokens):
`max_steps` if given, else `tokens_per_variant` / tokens per step, else what the slowest
variant (full) fits into `budget_minutes / (variants x seeds)` minutes, measured by timing a
few of its steps first.

Measures per run: parameters; validation bits per byte on the variant's own validation split
(`train.eval_batches` batches per domain), overall and per domain; held-out bits per byte on
the clean held-out documents, which no variant trained on (every window, or
`heldout_batches` per domain); steering accuracy (`simone.inference.steering_judge`: a TF-IDF + logistic
regression judge fitted on the training split, samples made with `--domain X`), and for
models with a policy head the policy-guided sampler with weight W and with W = 0 (their paired
difference is what the policy adds); policy accuracy; streaming perplexity of a
long validation text (Llama-style models); training tokens/s. Their statistics over seeds:
`simone.workflows.ablation_stats`; the report (ablation.md, ablation.svg): `ablation_report`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from simone import __version__
from simone.checkpoint import list_checkpoints
from simone.config import Config, apply_overrides
from simone.data.documents import read_documents, write_documents
from simone.data.loader import BatchLoader, eval_windows
from simone.data.shards import INDEX_FILE, TokenShard, build_shards
from simone.data.tokenizer import load_tokenizer
from simone.devices import pick_device
from simone.inference.consistency import (
    SuiteSettings,
    heldout_documents,
    load_or_build_suite,
    score_suite,
    suite_counts,
)
from simone.inference.load import LoadedModel, load_model
from simone.inference.shard_loss import evaluate_per_domain
from simone.inference.steering_judge import (
    SteeringJudge,
    confusion_accuracy,
    fit_on_documents,
    snippet_confusion,
    snippet_words_for,
    steering_accuracy,
)
from simone.inference.streaming import streaming_nll
from simone.inference.text_bpb import simone_scorer
from simone.model import build_model
from simone.progress import Say, Show, quiet
from simone.rundir import RunDir, atomic_write_json, atomic_write_text, read_json, sha256_file
from simone.train.budget import probe_step_seconds
from simone.train.metrics import train_rates
from simone.train.trainer import settle_model_sizes
from simone.workflows.ablation_report import ablation_markdown, ablation_svg
from simone.workflows.ablation_stats import summarize_runs
from simone.workflows.data_variants import BASE as DATA_BASE
from simone.workflows.data_variants import DataVariant, HeldOut, parse_data_variant, prepare_data_variant
from simone.workflows.pipeline import link_shared, stage_curate, stage_tokenizer

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
# how guided steering samples are drawn; a finished run evaluated another way is evaluated again
GUIDED_SAMPLER = "batched top-8 rerank, W=0 reference"


@dataclass
class AblationSettings:
    budget_minutes: float = 30.0
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    seeds: int = 3  # runs per variant (train.seed + 0 .. seeds-1)
    max_steps: int | None = None  # overrides every other budget
    tokens_per_variant: int | None = None  # training tokens per run (rounded up to whole steps)
    samples_per_domain: int = 50  # steering samples per domain and run
    sample_tokens: int = 128  # length of a steering sample (and of the judge's snippets)
    guidance_weight: float = 1.0
    stream_contexts: int = 8  # streaming text length, in contexts
    heldout_batches: int | None = None  # per domain; None: every window of the held-out documents
    judge_snippets_per_domain: int = 3000  # training snippets the judge is fitted on, per domain
    seed: int = 0  # steering samples of seed K start at seed + 10_000 * K
    # reuse a run this --out already finished with the same config, budget, data, judge and
    # simone version, and trained to its full budget (`--resume`): a long ablation can be
    # stopped and continued, or given more seeds or variants
    resume: bool = False
    # per variant, `section.key=value` overrides applied after the variant's own switches
    # (`ablate.guidance_weight=W`: this variant's guidance weight)
    overrides: dict[str, list[str]] = field(default_factory=dict)
    # `NAME=SPEC` data variants (`simone.workflows.data_variants`): the config's own model on
    # other data, each compared with `curated` (the same model on the base corpus)
    data_variants: list[str] = field(default_factory=list)
    # score every run on the consistency suite (`simone.inference.consistency`), built once from
    # the held-out documents; None: when there are data variants
    suite: bool | None = None
    suite_items: int = 100  # per domain and task (minimal pairs: per kind too; prompts: a fifth)


# ----------------------------------------------------------------------------- data


def prepare_shared(cfg: Config, out: Path, say: Say = quiet, show: Show = quiet) -> RunDir:
    """Curate, train the tokenizer and build the shards once, in OUT/shared."""
    shared = RunDir(out / "shared")
    stage_curate(cfg, shared.root, say, show)
    tok = stage_tokenizer(cfg, shared.root, say)
    build_shards(shared.documents, tok, shared.data, cfg.data.control_token_prob, cfg.data.split_seed)
    return shared


def prepare_uncurated(cfg: Config, shared: RunDir, run: RunDir, say: Say = quiet, show: Show = quiet) -> Path:
    """Curation off into `run`, clean validation documents removed from its training split;
    returns the folder with the clean validation set tokenized by its own tokenizer."""
    stage_curate(cfg, run.root, say, show)
    held = HeldOut(list(read_documents(shared.documents)))
    documents = list(read_documents(run.documents))
    kept = [
        part
        for doc in documents
        if (part := doc if doc.get("split") != "train" else held.training_part(doc, documents)) is not None
    ]
    write_documents(run.documents, kept)
    say(
        f"uncurated: {len(kept)} documents, {len(documents) - len(kept)} training copies of clean "
        f"validation documents removed"
    )
    tok = stage_tokenizer(cfg, run.root, say)
    build_shards(run.documents, tok, run.data, cfg.data.control_token_prob, cfg.data.split_seed)
    eval_dir = run.root / "clean_val"
    eval_dir.mkdir(parents=True, exist_ok=True)
    write_documents(eval_dir / "documents.jsonl", held.documents)
    build_shards(eval_dir / "documents.jsonl", tok, eval_dir)
    return eval_dir


# ----------------------------------------------------------------------------- budget


def base_variant(name: str) -> str:
    """`full@mem16` -> `full`: a sweep point is a variant with overrides."""
    return name.split("@", 1)[0]


def check_variants(settings: AblationSettings) -> dict[str, DataVariant]:
    """Refuse settings that cannot run (ValueError, one line) before any work; returns the
    data variants by name."""
    data = {}
    for item in settings.data_variants:
        variant = parse_data_variant(item, reserved=set(VARIANTS))
        if variant.name in data:
            raise ValueError(f"--data-variant {item!r}: {variant.name!r} is named twice")
        data[variant.name] = variant
    unknown = [v for v in settings.variants if base_variant(v) not in VARIANTS and v != DATA_BASE and v not in data]
    if unknown:
        raise ValueError(
            f"unknown ablation variant(s) {unknown}; choose from {', '.join(VARIANTS)} (or BASE@TAG with overrides)"
        )
    stray = [v for v in settings.overrides if v not in settings.variants]
    if stray:
        raise ValueError(f"overrides for variant(s) {stray} that are not in the ablation's variants")
    if settings.seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {settings.seeds}")
    return data


def run_order(settings: AblationSettings, data: dict[str, DataVariant]) -> list[str]:
    """The variants in the order they run: the model variants asked for, then (with data
    variants) `curated`, the reference, and each data variant."""
    names = list(settings.variants)
    if data:
        names += [n for n in [DATA_BASE, *data] if n not in names]
    return names


def suite_on(settings: AblationSettings) -> bool:
    return bool(settings.data_variants) if settings.suite is None else settings.suite


ABLATE_KEYS = {"ablate.guidance_weight": "guidance_weight"}  # per-variant settings besides the config


def variant_settings(settings: AblationSettings, name: str) -> AblationSettings:
    """`settings` with this variant's `ablate.*` overrides applied."""
    changes: dict[str, Any] = {}
    for item in settings.overrides.get(name, []):
        key, _, value = item.partition("=")
        if key.strip() in ABLATE_KEYS:
            changes[ABLATE_KEYS[key.strip()]] = float(value)
    return dataclasses.replace(settings, **changes) if changes else settings


def variant_config(base: Config, name: str, overrides: Sequence[str] = ()) -> Config:
    cfg = copy.deepcopy(base)
    for key, value in VARIANTS.get(base_variant(name), {}).items():  # a data variant: the config's own model
        setattr(cfg.model, key, value)
    if base_variant(name) == "uncurated":
        cfg.curate.enabled = False
    apply_overrides(cfg, [o for o in overrides if o.partition("=")[0].strip() not in ABLATE_KEYS])
    cfg.preset = f"{base.preset}+{name}"
    return cfg


def steps_for_budget(
    settings: AblationSettings,
    tokens_per_step: int,
    seconds_per_step: float | None = None,
    n_variants: int | None = None,
) -> int:
    """The common step count: max_steps, else tokens_per_variant rounded up to whole steps,
    else 60% of each run's share of the time budget (the rest: evaluation, checkpoints)."""
    if settings.max_steps is not None:
        return settings.max_steps
    if settings.tokens_per_variant is not None:
        return max(1, math.ceil(settings.tokens_per_variant / tokens_per_step))
    if seconds_per_step is None:
        raise ValueError("a time budget needs the measured seconds per step")
    share_s = settings.budget_minutes * 60 / max(1, (n_variants or len(settings.variants)) * settings.seeds)
    return max(1, int(0.6 * share_s / seconds_per_step))


def seconds_per_step(cfg: Config, shared: RunDir, steps: int = 3) -> float:
    """Time a few optimizer steps of `cfg`'s model as training runs them (`probe_step_seconds`)
    on real batches."""
    device = pick_device(cfg.train.device)
    loader = BatchLoader(
        TokenShard(shared.data, "train"), cfg.train.batch_size, cfg.model.max_seq_len, cfg.train.seed, device=device
    )
    seconds = probe_step_seconds(build_model(cfg.model).to(device), cfg, device, loader.next_batch_with_domains, steps)
    loader.close()
    return seconds


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def streaming_eval(loaded: LoadedModel, val_dir: Path, n_contexts: int) -> dict | None:
    """Streaming vs. independent-window perplexity on the same validation text: from the
    start of the longest validation document, n_contexts × max_seq_len tokens (fewer if the
    split is shorter). None for models without RoPE (GPT-2)."""
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
    return {
        "tokens": n,
        "contexts": round(n / cfg.max_seq_len, 2),
        "stream_ppl": stream["ppl"],
        "stream_bpb": bpb(stream["nll_sum"]),
        "window_ppl": math.exp(min(window_nll / n, 50.0)),
        "window_bpb": bpb(window_nll),
        "cache_bytes": stream["cache_bytes"],
        "max_slots": stream["max_slots"],
    }


@torch.no_grad()
def policy_accuracy(loaded: LoadedModel, val_dir: Path, max_batches: int) -> float | None:
    """Share of validation positions where the policy head's argmax is the true domain (every
    position, from the first token of a window on). None without a policy head."""
    model, cfg = loaded.model, loaded.config
    if getattr(model, "policy_head", None) is None:
        return None
    shard = TokenShard(val_dir, "val")
    classes = loaded.tokenizer.domains
    hits = total = 0
    for domain in shard.domains:
        if domain not in classes:
            continue
        for x, _ in eval_windows(
            shard, domain, cfg.model.max_seq_len, max_batches, cfg.train.batch_size, device=loaded.device
        ):
            _, _, policy = model(x, return_policy=True)
            hits += int((policy.argmax(-1) == classes.index(domain)).sum())
            total += policy.shape[0] * policy.shape[1]
    return hits / total if total else None


def median_train_rate(run: RunDir) -> float | None:
    """Median training tokens/s over the logging intervals in metrics.jsonl (robust to the
    intervals that include an evaluation or a checkpoint)."""
    rates = train_rates(run.metrics)
    return statistics.median(rates) if rates else None


def evaluate_variant(
    name: str,
    run: RunDir,
    val_dir: Path,
    heldout_dir: Path,
    judge: SteeringJudge | None,
    settings: AblationSettings,
    train_result,
    seed: int = 0,
    suite_items: list[dict] | None = None,
) -> dict:
    """One trained run's figures: val bpb on its own validation split (`val_dir`), held-out
    bpb on the clean held-out documents (`heldout_dir`), steering (without a judge: none),
    policy, streaming, speed, and the consistency suite's figures when given its items."""
    loaded = load_model(run.root)
    cfg = loaded.config
    row: dict[str, Any] = {
        "variant": name,
        "seed": seed,
        "train_seed": cfg.train.seed,
        "run_dir": str(run.root),
        "arch": cfg.model.arch,
        "governance": {k: getattr(cfg.model, k) for k in ("governance", "policy", "memory", "trace")},
        "params": loaded.model.num_params(),
    }
    seq_len, batch = cfg.model.max_seq_len, cfg.train.batch_size
    ev = evaluate_per_domain(
        loaded.model, TokenShard(val_dir, "val"), seq_len, batch, cfg.train.eval_batches, loaded.device
    )
    row["val_bpb"] = ev["val_bpb"]
    row["val_loss"] = ev["val_loss"]
    row["per_domain_bpb"] = {d: v["bpb"] for d, v in ev["per_domain"].items()}
    heldout = TokenShard(heldout_dir, "val")
    # None: every window of the held-out documents (a window count no domain exceeds)
    heldout_batches = settings.heldout_batches or max(1, heldout.n_tokens // (seq_len * batch) + 1)
    held = evaluate_per_domain(loaded.model, heldout, seq_len, batch, heldout_batches, loaded.device)
    row["heldout_bpb"] = held["val_bpb"]
    row["heldout_tokens"] = held["tokens"]
    row["steering_accuracy"] = row["steering_accuracy_guided"] = row["steering_accuracy_guided_w0"] = None
    row["steering_per_domain"], row["steering_samples"] = {}, []
    row["guidance_weight"] = settings.guidance_weight
    if judge is not None:
        steer = functools.partial(
            steering_accuracy,
            loaded,
            judge,
            samples_per_domain=settings.samples_per_domain,
            max_tokens=settings.sample_tokens,
            seed=settings.seed + 10_000 * seed,
        )
        plain = steer()
        row["steering_accuracy"] = plain["accuracy"]
        row["steering_per_domain"] = plain["per_domain"]
        row["steering_samples"] = plain["samples"][: 2 * len(plain["per_domain"])]
        # the guided sampler with the policy, and without it (W = 0): their difference is the policy's part
        if getattr(loaded.model, "policy_head", None) is not None and settings.guidance_weight > 0:
            for figure, weight in (
                ("steering_accuracy_guided", settings.guidance_weight),
                ("steering_accuracy_guided_w0", 0.0),
            ):
                guided = steer(policy_guidance=weight)
                row[figure] = guided["accuracy"]
                row[figure.replace("accuracy", "per_domain")] = guided["per_domain"]
    row["policy_accuracy"] = policy_accuracy(loaded, heldout_dir, cfg.train.eval_batches)
    row["streaming"] = streaming_eval(loaded, heldout_dir, settings.stream_contexts)
    row["tokens_per_s_overall"] = getattr(train_result, "tokens_per_s", None)  # evaluation included
    row["tokens_per_s"] = median_train_rate(run) or row["tokens_per_s_overall"]
    row["tokens_seen"] = getattr(train_result, "tokens_seen", None)
    row["steps"] = getattr(train_result, "steps", None)
    row["train_seconds"] = getattr(train_result, "seconds", None)
    if suite_items is not None:
        row.update(suite_figures(score_suite(simone_scorer(loaded, str(run.root)), suite_items)))
    return row


def suite_figures(scores: dict) -> dict:
    """The consistency suite's figures of one run, as row fields (None where not scored), and
    the whole score under `suite`."""

    def value(figure: dict | None) -> float | None:
        return figure.get("value") if isinstance(figure, dict) else None

    pairs = scores.get("pairs") or {}
    row = {
        "pair_accuracy": value(pairs),
        "cloze_accuracy": value(scores.get("cloze")),
        "distinct_2": value((scores.get("generation") or {}).get("distinct_2")),
        "suite": scores,
    }
    for kind in ("negation", "antonym", "entity"):
        row[f"pair_{kind}"] = value((pairs.get("per_kind") or {}).get(kind))
    return row


# ----------------------------------------------------------------------------- the run


def run_ablation(cfg: Config, out: Path, settings: AblationSettings, say: Say = quiet, show: Show = quiet) -> dict:
    """Train and evaluate every variant in `settings.variants` with `settings.seeds` seeds into
    `out`; write `ablation.json`, `ablation.md` and `ablation.svg` there (after every round of
    seeds, so a stopped ablation leaves what it has) and return the result dict. Progress
    lines go to `say`."""
    from simone.workflows.pipeline import stage_train  # noqa: PLC0415  # deferred: tests replace it at its source

    data_variants = check_variants(settings)
    order = run_order(settings, data_variants)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = copy.deepcopy(cfg)
    if cfg.data.control_token_prob <= 0:
        cfg.data.control_token_prob = DEFAULT_CONTROL_PROB
    t0 = time.time()
    say(f"shared data in {out / 'shared'}")
    shared = prepare_shared(cfg, out, say, show)
    tok = load_tokenizer(shared.tokenizer)
    snippet_words = snippet_words_for(settings.sample_tokens)
    judge = judge_confusion = judge_acc = None
    if settings.samples_per_domain > 0:  # 0: no steering, so no judge
        judge = fit_on_documents(
            shared.documents, snippet_words=snippet_words, max_snippets_per_domain=settings.judge_snippets_per_domain
        )
        judge_confusion = snippet_confusion(judge, shared.documents, snippet_words=snippet_words)
        judge_acc = confusion_accuracy(judge_confusion)
        say(
            f"steering judge (TF-IDF + logistic regression, {len(judge.classes)} domains): {judge_acc:.1%} "
            f"on validation snippets of {snippet_words} words (~{settings.sample_tokens} tokens), "
            f"{judge.training_books_accuracy:.1%} on unseen passages of the training books"
        )
    suite_items = suite_file = None
    if suite_on(settings):
        suite_file = shared.root / "consistency_suite.jsonl"  # built once: every run, now and later, sees it
        suite_items = load_or_build_suite(
            suite_file,
            lambda: heldout_documents(shared.documents),
            SuiteSettings.sized(settings.suite_items, settings.seed),
        )
        # the suite's bpb items are left out: every run is already read on the same held-out text
        suite_items = [item for item in suite_items if item["task"] != "bpb"]
        say(
            f"consistency suite: {suite_file} ({', '.join(f'{n} {t}' for t, n in sorted((t, c['items']) for t, c in suite_counts(suite_items).items()))})"
        )

    tokens_per_step = cfg.train.batch_size * cfg.train.grad_accum * cfg.model.max_seq_len
    sec = None
    if settings.max_steps is None and settings.tokens_per_variant is None:
        probe = variant_config(cfg, "full")
        settle_model_sizes(probe, tok)
        sec = seconds_per_step(probe, shared)
    steps = steps_for_budget(settings, tokens_per_step, sec, n_variants=len(order))
    n_runs = len(order) * settings.seeds
    say(
        f"budget: {steps} steps ({steps * tokens_per_step:,} tokens) per run, {n_runs} runs"
        + (f"; {sec:.2f} s/step measured" if sec else "")
    )
    share_s = (sec or 1.0) * steps / 0.6

    uncurated: tuple[RunDir, Path] | None = None
    prepared: dict[str, RunDir] = {}  # data variant -> its prepared data (built once)
    runs: list[dict] = []
    trained_models: dict[str, tuple[RunDir, dict]] = {}  # training_key -> (its run folder, its row)
    result: dict = {}
    for k in range(settings.seeds):
        for name in order:
            vcfg = variant_config(cfg, name, settings.overrides.get(name, []))
            tc = vcfg.train
            tc.seed = cfg.train.seed + k  # initial weights and the order of the training windows
            tc.max_steps = steps
            # The step count is the budget; the time cap is only a guard against a stuck run (on a
            # busy machine a run may take longer than its share, but it still gets its tokens).
            tc.max_minutes = max(share_s / 60 * 5, 2.0) if sec else None
            tc.eval_every = tc.checkpoint_every = steps
            tc.sample_every = 0
            run = RunDir(out / "runs" / name / f"seed_{k}")
            run.root.mkdir(parents=True, exist_ok=True)
            if base_variant(name) == "uncurated":
                if uncurated is None:  # curated off, its own tokenizer and shards: built once
                    unc = RunDir(out / "uncurated")
                    unc.root.mkdir(parents=True, exist_ok=True)
                    uncurated = (unc, prepare_uncurated(vcfg, shared, unc, say, show))
                data_root, heldout_dir = uncurated
            elif name in data_variants:
                if name not in prepared:
                    say(f"{name}: preparing {data_variants[name].spec} (tokenizer shared)")
                    prepared[name] = prepare_data_variant(
                        cfg, shared, data_variants[name], tok, out / "data_variants" / name, say, show
                    )
                data_root, heldout_dir = prepared[name], shared.data
            else:
                data_root, heldout_dir = shared, shared.data
            link_shared(data_root.data, run.data)
            # a data variant's shards are its own, its tokenizer the base corpus's
            link_shared((shared if name in data_variants else data_root).tokenizer_dir, run.tokenizer_dir)
            settle_model_sizes(vcfg, load_tokenizer(run.tokenizer))  # the uncurated variant has its own
            key = run_key(vcfg, name, k, steps, settings, run, judge_acc, heldout_dir, suite_file)
            trains_as = training_key(key)
            saved = read_finished_run(run) if settings.resume else None
            if (
                saved is not None
                and training_key(saved["key"]) == trains_as
                and cut_short(saved.get("steps_trained"), saved.get("stop_reason"), steps)
            ):
                say(
                    f"{name} seed {k}: the run in {run.root} stopped after {saved.get('steps_trained')} of "
                    f"{steps} steps ({saved.get('stop_reason')}); training it again"
                )
                saved = None
            if saved is not None and saved["key"] == key:
                runs.append(saved["row"])
                trained_models.setdefault(trains_as, (run, saved["row"]))
                say(f"{name} seed {k}: reusing the finished run in {run.root} (--resume)")
                continue
            donor = trained_models.get(trains_as)
            if (
                donor is None
                and saved is not None
                and training_key(saved["key"]) == trains_as
                and list_checkpoints(run.checkpoints)
            ):
                donor = (run, saved["row"])  # trained as now, evaluated another way: evaluate again
            (run.root / FINISHED_RUN).unlink(missing_ok=True)
            if donor is not None:
                # a sweep point that differs only in how it is evaluated (ablate.guidance_weight):
                # the model another variant trained with the same config, seed and budget
                model_run, donor_row = donor
                trained = SimpleNamespace(
                    tokens_per_s=donor_row.get("tokens_per_s_overall"),
                    tokens_seen=donor_row.get("tokens_seen"),
                    steps=donor_row.get("steps"),
                    seconds=donor_row.get("train_seconds"),
                    stop_reason=donor_row.get("stop_reason"),
                )
                say(
                    f"{name} seed {k}: evaluating the model {donor_row['variant']} seed {k} trained "
                    f"(same config, seed and budget; {model_run.root})"
                )
            else:
                model_run = run
                say(f"{name} seed {k}: training {steps} steps")
                # force: a rerun into the same --out starts over
                trained = stage_train(vcfg, run.root, force=True, say=say, show=show)
                if getattr(trained, "stop_reason", None) == "signal":
                    raise KeyboardInterrupt(f"ablation stopped by a signal while training {name} seed {k}")
                if trained.steps < steps:
                    again = "; --resume trains it again" if cut_short(trained.steps, trained.stop_reason, steps) else ""
                    say(
                        f"{name} seed {k}: stopped after {trained.steps} of {steps} steps ({trained.stop_reason}){again}"
                    )
            vsettings = variant_settings(settings, name)
            r = evaluate_variant(name, model_run, run.data, heldout_dir, judge, vsettings, trained, k, suite_items)
            if name == DATA_BASE or name in data_variants:
                r["data"] = data_variants[name].spec if name in data_variants else DATA_BASE
            r["stop_reason"] = trained.stop_reason
            trained_models.setdefault(trains_as, (model_run, r))
            r["overrides"] = settings.overrides.get(name, [])
            runs.append(r)
            atomic_write_json(
                run.root / FINISHED_RUN,
                {"key": key, "row": r, "steps_trained": trained.steps, "stop_reason": trained.stop_reason},
            )
            say(
                f"{name} seed {k}: val bpb {r['val_bpb']:.4f}, held-out bpb {r['heldout_bpb']:.4f}, "
                + (f"steering {r['steering_accuracy']:.0%}, " if r.get("steering_accuracy") is not None else "")
                + (f"pairs {r['pair_accuracy']:.1%}, " if r.get("pair_accuracy") is not None else "")
                + f"{(r['tokens_per_s'] or 0):,.0f} tok/s"
            )
        rows, differences = summarize_runs(runs, order)
        result = {
            "schema": 2,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "preset": cfg.preset,
            "corpus": str(cfg.data.data_dir),
            "budget_minutes": settings.budget_minutes,
            "seeds": k + 1,
            "seeds_planned": settings.seeds,
            "steps_per_variant": steps,
            "tokens_per_step": tokens_per_step,
            "tokens_per_variant": steps * tokens_per_step,
            "control_token_prob": cfg.data.control_token_prob,
            "control_window_prob": cfg.data.control_window_prob,
            "domains": tok.domains,
            "judge_accuracy": judge_acc,
            "judge_accuracy_training_books": (
                judge.training_books_accuracy
                if judge is not None and math.isfinite(judge.training_books_accuracy)
                else None
            ),
            "steering_judge": None
            if judge is None
            else {
                "kind": "scikit-learn logistic regression (SGD) on word (1-2) and character (2-5) "
                "n-gram TF-IDF, fitted on training snippets",
                "snippet_words": snippet_words,
                "validation_snippet_accuracy": judge_acc,
                "validation_confusion": judge_confusion,
                "chance": 1 / max(1, len(judge.classes)),
            },
            "data_variants": {name: read_json(prepared[name].root / "variant.json", {}) for name in prepared},
            "suite": None if suite_items is None else {"file": str(suite_file), "counts": suite_counts(suite_items)},
            "settings": dataclasses.asdict(settings),
            "variants": rows,
            "differences": differences,
            "runs": runs,
            "seconds": round(time.time() - t0, 1),
        }
        atomic_write_json(out / "ablation.json", result)
        atomic_write_text(out / "ablation.md", ablation_markdown(result))
        atomic_write_text(out / "ablation.svg", ablation_svg(result))
        say(f"seed {k}: wrote {out / 'ablation.md'}")
    return result


# settings that decide which runs there are and how long they train, not how a run is evaluated
NOT_EVALUATION_SETTINGS = frozenset(
    "variants seeds resume budget_minutes max_steps tokens_per_variant data_variants suite suite_items".split()
)
# (section, field, off value): config fields added after runs were keyed; a run key leaves them out
# while they are off, so the keys of runs finished before they existed still match
KEY_OPTIONAL_AT_OFF = [("data", "control_window_prob", 0.0), ("train", "embed_lr_scale", 1.0)]
# in a run's folder: {key, row, steps_trained, stop_reason}: what it was trained with, how far
# it got, and its figures
FINISHED_RUN = "ablation_run.json"
# how a run may end before its step budget and still be what its config trains every time
# (its data ran out, or early stopping): reused. Its time guard, which a busy machine trips, is not.
PLANNED_ENDS = ("num_epochs", "early_stop")


def read_finished_run(run: RunDir) -> dict | None:
    """The run's FINISHED_RUN record, or None where there is none (or it is not one)."""
    saved = read_json(run.root / FINISHED_RUN, None)
    if isinstance(saved, dict) and isinstance(saved.get("key"), dict) and isinstance(saved.get("row"), dict):
        return saved
    return None


def cut_short(steps_trained: int | None, stop_reason: str | None, steps: int) -> bool:
    """Whether a run that trained `steps_trained` of its `steps` stopped early for a reason
    another try need not share: `--resume` trains it again. Unknown counts as cut short."""
    return (steps_trained if isinstance(steps_trained, int) else -1) < steps and stop_reason not in PLANNED_ENDS


def run_key(
    cfg: Config,
    name: str,
    seed: int,
    steps: int,
    settings: AblationSettings,
    run: RunDir,
    judge_accuracy: float | None,
    heldout_dir: Path | None = None,
    suite_file: Path | None = None,
) -> dict:
    """Everything a finished run's figures depend on: its config (less the time cap, a guard
    set from this invocation's speed probe), step budget, steering settings, the tokenizer and
    token shards it trained on (the shard index records the curated documents' hash), the
    held-out shards it was scored on (`heldout_dir`, default its own), the judge that scored
    its samples, and the simone version. `--resume` reuses a run only when all match."""
    config = cfg.to_dict()
    config["train"].pop("max_minutes", None)
    for section, key_field, off in KEY_OPTIONAL_AT_OFF:  # not `name`: that is the variant's
        if config[section].get(key_field) == off:
            config[section].pop(key_field, None)
    steering = {
        k: v
        for k, v in dataclasses.asdict(variant_settings(settings, name)).items()
        if k not in NOT_EVALUATION_SETTINGS
    }
    steering["overrides"] = settings.overrides.get(name, [])
    steering["guided_sampler"] = GUIDED_SAMPLER
    key = {
        "variant": name,
        "seed": seed,
        "steps": steps,
        "config": config,
        "steering": steering,
        "tokenizer_sha256": sha256_file(run.tokenizer),
        "data_sha256": sha256_file(run.data / INDEX_FILE),
        "heldout_sha256": sha256_file(Path(heldout_dir or run.data) / INDEX_FILE),
        "judge_accuracy": judge_accuracy,
        "simone_version": __version__,
    }
    if suite_file is not None:  # an evaluation setting: a new suite re-evaluates, never retrains
        key["suite_sha256"] = sha256_file(suite_file)
    return json.loads(json.dumps(key))  # as it reads back from the saved file


def training_key(key: dict) -> str:
    """The part of a run key the trained weights depend on (not the variant's name or how its
    samples are steered and judged, nor the config's preset label, which names the variant),
    as a string to look up."""
    config = {k: v for k, v in (key.get("config") or {}).items() if k != "preset"}
    return json.dumps(
        {
            "seed": key.get("seed"),
            "steps": key.get("steps"),
            "config": config,
            "tokenizer_sha256": key.get("tokenizer_sha256"),
            "data_sha256": key.get("data_sha256"),
            "simone_version": key.get("simone_version"),
        },
        sort_keys=True,
    )
