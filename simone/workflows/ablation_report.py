"""The report of an ablation (`simone ablate`): its result dict as markdown (`ablation_markdown`)
and as SVG bar charts with dose-response panels (`ablation_svg`); pure functions to text."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from simone.data.contradict import KINDS, parse_contradict_spec
from simone.workflows.ablation_stats import FIGURES, NO_DIFFERENCE, PLAIN
from simone.workflows.data_variants import BASE as DATA_BASE


def _f(value: Any, fmt: str = ".4f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value, fmt)


def _stat(s: dict, fmt: str) -> str:
    """`mean ± std [low, high]` (just the mean with one seed, – without a value)."""
    if s.get("mean") is None:
        return "–"
    text = format(s["mean"], fmt)
    if s.get("std") is not None:
        text += f" ± {format(s['std'], fmt)} [{format(s['ci95'][0], fmt)}, {format(s['ci95'][1], fmt)}]"
    return text


def _figure_format(figure: str) -> str:
    return ".4f" if figure.endswith("bpb") else ".1%"


def shown_figures(rows: list[dict]) -> list[str]:
    """The figures some variant has a value of (steering is left out of a run without it, the
    suite's figures out of one without the suite)."""
    return [f for f in FIGURES if any(r[f].get("n") for r in rows)]


def _steering_text(result: dict) -> str:
    if not result.get("steering_judge"):
        return "No steering was measured (`--samples-per-domain 0`)."
    return (
        f"Steering: share of "
        f"{result['settings']['samples_per_domain']} samples per domain of {result['settings']['sample_tokens']} "
        f"tokens made with `--domain X` that the judge (logistic regression on word and character TF-IDF) "
        f"assigns to X; the judge itself is right on {result['judge_accuracy']:.1%} of validation snippets "
        f"of that length (books it never saw) and on {_f(result.get('judge_accuracy_training_books'), '.1%')} "
        f"of held-back passages of its training books (chance {result['steering_judge']['chance']:.0%}). "
        f"Guided: the policy-guided sampler (each step, the 8 likeliest tokens reranked by "
        f"{result['settings']['guidance_weight']} · log p_policy(domain), as `--policy-guidance` does); "
        f"W=0: the same sampler without the policy, so guided minus W=0 is what the policy adds. "
        f"Policy acc: share of validation positions whose "
        f"policy-head argmax is the true domain."
    )


def _suite_text(result: dict) -> str:
    suite = result.get("suite")
    if not suite:
        return ""
    counts = suite["counts"]
    n = lambda task: counts.get(task, {}).get("items", 0)  # noqa: E731
    return (
        f" Consistency suite (`{Path(suite['file']).name}`, built once from the held-out documents): "
        f"minimal pairs ({n('pair')} held-out sentences against their contradicted twins): share where "
        f"the model gives the original the higher probability, overall and per kind of change (chance 50%); "
        f"cloze ({n('cloze')} passages): share whose last word greedy decoding gives exactly; "
        f"distinct-2 of {n('gen')} greedy continuations of held-out prompts."
    )


def _data_variants_text(result: dict) -> list[str]:
    variants = result.get("data_variants") or {}
    if not variants:
        return []
    lines = [
        "",
        "## Data variants (the same model, tokenizer and token budget; the same held-out text)",
        "",
        "| variant | data | training documents | training bytes | what was done |",
        "|---|---|---|---|---|",
    ]
    for name, v in variants.items():
        done = ""
        if v.get("contradictions"):
            c = v["contradictions"]
            done = (
                f"{c['changes']:,} changes in {c['documents_changed']} of {c['training_documents']} training "
                f"documents ({', '.join(f'{k} {n:,}' for k, n in c['changes_per_kind'].items())}); "
                f"bytes {c['bytes_change']:+.2%}; listed in `data_variants/{name}/contradictions.jsonl`"
            )
        elif "tokens_replaced" in v:
            done = f"{v['tokens_replaced']:,} of {v['training_tokens']:,} training tokens replaced by {v.get('corpus')}"
        elif "flagged_documents_left_out" in v:
            done = f"{v['flagged_documents_left_out']} flagged documents left out"
        elif "held_out_copies_left_out" in v:
            done = f"{v['held_out_copies_left_out']} documents left out as held-out text"
        lines.append(
            f"| {name} | `{v.get('spec')}` | {_f(v.get('training_documents'), ',d')} | "
            f"{_f(v.get('training_bytes'), ',d')} | {done} |"
        )
    return lines


def ablation_markdown(result: dict) -> str:
    rows = result["variants"]
    domains = sorted({d for r in rows for d in r["per_domain_bpb"]})
    n_seeds = result["seeds"]
    figures = shown_figures(rows)
    lines = [
        "# SIM-ONE ablation",
        "",
        f"Preset `{result['preset']}`, {n_seeds} seed(s) per variant, {result['steps_per_variant']} optimizer "
        f"steps per run ({result['tokens_per_variant']:,} training tokens), same data split; control tokens "
        f"before {result['control_token_prob']:.0%} of training documents"
        + (
            f" and at the start of {result['control_window_prob']:.0%} of training windows"
            if result.get("control_window_prob")
            else ""
        )
        + ". Each figure is mean ± std "
        "[95% t-interval of the mean] over seeds. Val bpb: the variant's own validation split; held-out "
        "bpb: the clean held-out documents no variant trained on (lower is better). "
        + _steering_text(result)
        + _suite_text(result),
        "",
    ]
    head = ["variant", "params"] + [FIGURES[f][0] for f in figures] + ["train tokens", "tokens/s"]
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = (
            [r["variant"], f"{r['params']:,}"]
            + [_stat(r[f], _figure_format(f)) for f in figures]
            + [_f(r.get("tokens_seen"), ",d"), _f(r.get("tokens_per_s"), ",.0f")]
        )
        lines.append("| " + " | ".join(cells) + " |")

    lines += ["", f"## Differences (paired by seed; {NO_DIFFERENCE} when the 95% interval includes zero)", ""]
    if n_seeds < 2:
        lines += [f'With one seed there is no interval: every difference reads "{NO_DIFFERENCE}".', ""]
    if result["differences"]:
        lines += ["| variant | vs | figure | difference | reading |", "|---|---|---|---|---|"]
        for d in result["differences"]:
            label, _ = FIGURES[d["figure"]]
            fmt = _figure_format(d["figure"])
            value = format(d["mean"], "+" + fmt)
            if d["ci95"] is not None:
                value += f" [{format(d['ci95'][0], '+' + fmt)}, {format(d['ci95'][1], '+' + fmt)}]"
            resolve = (
                f" (~{d['seeds_to_resolve']} seeds would resolve it)"
                if d["reading"] == NO_DIFFERENCE and d.get("seeds_to_resolve")
                else ""
            )
            lines.append(f"| {d['variant']} | {d['reference']} | {label} | {value} | {d['reading']}{resolve} |")
    else:
        lines.append(f"No differences: neither the plain model (`{PLAIN}`) nor `{DATA_BASE}` is among the variants.")
    lines += _data_variants_text(result)

    confusion = (result.get("steering_judge") or {}).get("validation_confusion")
    if confusion:
        lines += [
            "",
            "## The judge on validation snippets: right per domain, and where the rest went",
            "",
            "| domain | snippets | judged right | judged as (others) |",
            "|---|---|---|---|",
        ]
        for d, row in sorted(confusion.items()):
            n = sum(row.values())
            others = ", ".join(f"{p} {c}" for p, c in sorted(row.items(), key=lambda x: -x[1]) if p != d)
            lines.append(f"| {d} | {n} | {row.get(d, 0) / n:.0%} | {others or '–'} |")
    if domains:
        lines += [
            "",
            "## Validation bits per byte per domain (mean over seeds)",
            "",
            "| variant | " + " | ".join(domains) + " |",
            "|---|" + "|".join("---" for _ in domains) + "|",
        ]
        for r in rows:
            lines.append(f"| {r['variant']} | " + " | ".join(_f(r["per_domain_bpb"].get(d)) for d in domains) + " |")
    streams = [(r["variant"], r["streaming"]) for r in rows if r.get("streaming")]
    if streams:
        lines += [
            "",
            f"## Streaming (mean over seeds): a validation text of ~{result['settings']['stream_contexts']} "
            "contexts read through the bounded cache (stream) vs. independent windows",
            "",
            "| variant | stream ppl | stream bpb | window bpb |",
            "|---|---|---|---|",
        ]
        for name, s in streams:
            lines.append(
                f"| {name} | {_f(s.get('stream_ppl'), '.2f')} | {_f(s.get('stream_bpb'))} | {_f(s.get('window_bpb'))} |"
            )
    lines += [
        "",
        "Variants: "
        + "; ".join(
            f"`{r['variant']}`" + (f" ({', '.join(r['overrides'])})" if r.get("overrides") else "") for r in rows
        )
        + ". See `simone/workflows/ablate.py` for their definitions.",
        "",
    ]
    return "\n".join(lines)


def ablation_svg(result: dict) -> str:
    """One bar chart per figure: the mean over seeds as a bar, its 95% interval as a whisker."""
    rows = result["variants"]
    bar_h, gap, label_w, chart_w, col_w = 16, 6, 110, 200, 380
    chart_h = 36 + len(rows) * (bar_h + gap)
    figures = [(f, FIGURES[f]) for f in shown_figures(rows)]
    n_cols = 2
    height = chart_h * math.ceil(len(figures) / n_cols) + 10

    def chart(x0: int, y0: int, figure: str, title: str) -> str:
        fmt = _figure_format(figure)
        stats = [r[figure] for r in rows]
        tops = [s["ci95"][1] if s.get("ci95") else s.get("mean") for s in stats]
        finite = [v for v in tops if v is not None and math.isfinite(v)]
        top = max(finite) if finite and max(finite) > 0 else 1.0
        scale = chart_w / top
        parts = [f'<text x="{x0 + label_w}" y="{y0 + 16}" font-size="13" font-weight="bold">{title}</text>']
        for i, (r, s) in enumerate(zip(rows, stats)):
            y = y0 + 26 + i * (bar_h + gap)
            parts.append(
                f'<text x="{x0 + label_w - 6}" y="{y + 12}" font-size="12" text-anchor="end">{r["variant"]}</text>'
            )
            if s.get("mean") is None:
                parts.append(f'<text x="{x0 + label_w + 4}" y="{y + 12}" font-size="11">n/a</text>')
                continue
            w = max(0.0, s["mean"] * scale)
            parts.append(f'<rect x="{x0 + label_w}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="#4c78a8"/>')
            end = x0 + label_w + w
            if s.get("ci95"):
                lo, hi = (x0 + label_w + max(0.0, v * scale) for v in s["ci95"])
                mid = y + bar_h / 2
                parts.append(
                    f'<path d="M{lo:.1f},{mid} H{hi:.1f} M{lo:.1f},{y + 3} V{y + bar_h - 3} '
                    f'M{hi:.1f},{y + 3} V{y + bar_h - 3}" stroke="#000" fill="none"/>'
                )
                end = max(end, hi)
            parts.append(f'<text x="{end + 4:.1f}" y="{y + 12}" font-size="11">{format(s["mean"], fmt)}</text>')
        return "".join(parts)

    width = n_cols * col_w
    body = "".join(
        chart((i % n_cols) * col_w, (i // n_cols) * chart_h, f, f"{label} (95% interval)")
        for i, (f, (label, _)) in enumerate(figures)
    )
    doses = dose_response(rows)
    if doses:
        panels = [
            f
            for f in ("pair_accuracy", "pair_negation", "pair_antonym", "pair_entity")
            if any(p["stats"][f].get("mean") is not None for p in doses)
        ]
        for i, figure in enumerate(panels):
            body += dose_response_panel(doses, figure, (i % n_cols) * col_w, height + (i // n_cols) * 240)
        height += 240 * math.ceil(len(panels) / n_cols)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif">' + body + "</svg>\n"
    )


def dose_response(rows: list[dict]) -> list[dict]:
    """The points of a dose-response chart: `curated` at P = 0 and each `contradict:P[:KINDS]`
    variant at P, with its kinds and figures; empty without a contradiction variant."""
    points = []
    for r in rows:
        data = r.get("data") or ""
        if data.startswith("contradict"):
            spec = parse_contradict_spec(data)
            share, kinds = spec.share, "all" if spec.kinds == KINDS else "+".join(spec.kinds)
        elif data == DATA_BASE:
            share, kinds = 0.0, "all"
        else:
            continue
        points.append({"variant": r["variant"], "share": share, "kinds": kinds, "stats": r})
    return points if any(p["share"] > 0 for p in points) else []


def dose_response_panel(points: list[dict], figure: str, x0: int, y0: int) -> str:
    """One panel: `figure` (mean and 95% interval over seeds) against the share P of training
    documents contradicted; variants that contradict only some kinds are drawn hollow."""
    left, top, w, h = x0 + 50, y0 + 30, 290, 160
    stats = [p["stats"][figure] for p in points]
    values = [v for s in stats for v in ([s["mean"]] + (s["ci95"] or [])) if v is not None]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    pad = (hi - lo) * 0.1 or 0.01
    lo, hi = lo - pad, hi + pad

    def x(share: float) -> float:
        return left + share * w

    def y(value: float) -> float:
        return top + h - (value - lo) / (hi - lo) * h

    fmt = _figure_format(figure)
    parts = [
        f'<text x="{left}" y="{y0 + 16}" font-size="13" font-weight="bold">{FIGURES[figure][0]} against P</text>',
        f'<text x="{left + w}" y="{top + h + 28}" font-size="10" text-anchor="end">P: share of training '
        f"documents contradicted</text>",
        f'<path d="M{left},{top} V{top + h} H{left + w}" stroke="#000" fill="none"/>',
        f'<text x="{left - 4}" y="{top + 4}" font-size="10" text-anchor="end">{format(hi, fmt)}</text>',
        f'<text x="{left - 4}" y="{top + h}" font-size="10" text-anchor="end">{format(lo, fmt)}</text>',
    ]
    for share in (0.0, 0.25, 0.5, 0.75, 1.0):
        parts.append(
            f'<text x="{x(share):.1f}" y="{top + h + 14}" font-size="10" text-anchor="middle">{share:g}</text>'
        )
    line = sorted(
        (p["share"], p["stats"][figure]["mean"])
        for p in points
        if p["kinds"] == "all" and p["stats"][figure].get("mean") is not None
    )
    if len(line) > 1:
        parts.append(
            '<path d="M' + " L".join(f"{x(a):.1f},{y(b):.1f}" for a, b in line) + '" stroke="#4c78a8" fill="none"/>'
        )
    for p, s in zip(points, stats):
        if s.get("mean") is None:
            continue
        px, py = x(p["share"]), y(s["mean"])
        if s.get("ci95"):
            parts.append(f'<path d="M{px:.1f},{y(s["ci95"][0]):.1f} V{y(s["ci95"][1]):.1f}" stroke="#000"/>')
        fill = "#4c78a8" if p["kinds"] == "all" else "#fff"
        parts.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="4" fill="{fill}" stroke="#4c78a8"/>')
        parts.append(f'<text x="{px + 6:.1f}" y="{py - 6:.1f}" font-size="10">{p["variant"]}</text>')
    return "".join(parts)
