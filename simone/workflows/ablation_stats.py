"""Statistics of an ablation (`simone ablate`): each figure over seeds as mean, std and a 95%
t-interval; differences paired by seed, read as "no measurable difference" when their interval
includes zero. Pure functions of the run rows: no torch, no I/O."""

from __future__ import annotations

import math
from typing import Any

from simone.workflows.data_variants import BASE as DATA_BASE

PLAIN = "llama"  # the reference every difference is measured against
# besides the plain model, the uncurated variant is compared with the model it differs from only in data
EXTRA_REFERENCES = {"uncurated": ["full"]}
# the figures summarised over seeds: name -> (label, lower is better)
FIGURES: dict[str, tuple[str, bool]] = {
    "val_bpb": ("val bpb", True),
    "heldout_bpb": ("held-out bpb", True),
    "steering_accuracy": ("steering", False),
    "steering_accuracy_guided": ("steering (guided)", False),
    "steering_accuracy_guided_w0": ("steering (guided sampler, W=0)", False),
    "policy_accuracy": ("policy acc", False),
    # the consistency suite (simone.inference.consistency), when scored
    "pair_accuracy": ("minimal pairs", False),
    "pair_negation": ("pairs: negation", False),
    "pair_antonym": ("pairs: antonym", False),
    "pair_entity": ("pairs: entity", False),
    "cloze_accuracy": ("cloze", False),
    "distinct_2": ("distinct-2", False),
}
NO_DIFFERENCE = "no measurable difference"
# the reference of guided steering's difference: the same sampler without the policy (W = 0), same runs
GUIDANCE_REFERENCE = "W=0, same runs"


def t_quantile(p: float, df: int) -> float:
    """The `p` quantile of Student's t distribution with `df` degrees of freedom."""
    from scipy.stats import t  # noqa: PLC0415  # deferred: scipy.stats is slow to import

    return float(t.ppf(p, df))


def summarize(values: list[float | None]) -> dict:
    """{mean, std, ci95: [low, high], n, values} of the finite values: the sample standard
    deviation and the 95% t-interval of the mean (std and ci95 None below two values; all
    None without any)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(v)]
    n = len(xs)
    if n == 0:
        return {"mean": None, "std": None, "ci95": None, "n": 0, "values": []}
    mean = sum(xs) / n
    if n == 1:
        return {"mean": mean, "std": None, "ci95": None, "n": 1, "values": xs}
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(0.975, n - 1) * std / math.sqrt(n)
    return {"mean": mean, "std": std, "ci95": [mean - half, mean + half], "n": n, "values": xs}


def paired_difference(runs: list[dict], variant: str, reference: str, figure: str) -> dict:
    """`figure` of `variant` minus that of `reference`, paired by seed, summarised."""
    ref = {r["seed"]: r[figure] for r in runs if r["variant"] == reference and r.get(figure) is not None}
    diffs = [
        r[figure] - ref[r["seed"]]
        for r in runs
        if r["variant"] == variant and r["seed"] in ref and r.get(figure) is not None
    ]
    return summarize(diffs)


def seeds_to_resolve(diff: dict, most: int = 1000) -> int | None:
    """How many seeds would make this difference's 95% interval exclude zero if its mean and
    spread held (the smallest n with t(0.975, n-1) · std / √n < |mean|); None without a
    spread, with no mean difference, or beyond `most`. What "measurable at a larger budget"
    means, from the measured variance."""
    mean, std = diff.get("mean"), diff.get("std")
    if mean is None or not std or mean == 0:
        return None
    for n in range(2, most + 1):
        if t_quantile(0.975, n - 1) * std / math.sqrt(n) < abs(mean):
            return n
    return None


def reading(diff: dict, lower_is_better: bool) -> str:
    """What a difference says: NO_DIFFERENCE unless its 95% interval excludes zero."""
    ci = diff.get("ci95")
    if ci is None or ci[0] <= 0.0 <= ci[1]:
        return NO_DIFFERENCE
    better = (diff["mean"] < 0) == lower_is_better
    return f"{'lower' if diff['mean'] < 0 else 'higher'} ({'better' if better else 'worse'})"


def summarize_runs(runs: list[dict], variants: list[str]) -> tuple[list[dict], list[dict]]:
    """Per variant, every figure over its seeds; and the paired differences against the plain
    model (and the uncurated variant against full governance)."""
    rows = []
    for name in variants:
        mine = sorted((r for r in runs if r["variant"] == name), key=lambda r: r["seed"])
        if not mine:
            continue
        first = mine[0]
        row: dict[str, Any] = {
            "variant": name,
            "arch": first["arch"],
            "governance": first["governance"],
            "params": first["params"],
            "seeds": [r["train_seed"] for r in mine],
            "steps": first["steps"],
            "tokens_seen": first["tokens_seen"],
            "overrides": first.get("overrides", []),
            "guidance_weight": first.get("guidance_weight"),
            "data": first.get("data"),
        }
        for figure in FIGURES:
            row[figure] = summarize([r.get(figure) for r in mine])
        domains = sorted({d for r in mine for d in r["per_domain_bpb"]})
        row["per_domain_bpb"] = {d: summarize([r["per_domain_bpb"].get(d) for r in mine])["mean"] for d in domains}
        streams = [r["streaming"] for r in mine if r.get("streaming")]
        row["streaming"] = {k: summarize([s[k] for s in streams])["mean"] for k in streams[0]} if streams else None
        row["tokens_per_s"] = summarize([r.get("tokens_per_s") for r in mine])["mean"]
        rows.append(row)
    differences = []
    names = [r["variant"] for r in rows]
    for name in names:
        base, sweep_point, tag = name.partition("@")  # `full@mem16`: the variant `full` with overrides
        references = ([PLAIN] if name != PLAIN else []) + EXTRA_REFERENCES.get(base, [])
        if any(r.get("data") not in (None, DATA_BASE) for r in runs if r["variant"] == name):
            references = [DATA_BASE]  # a data variant: against the same model on the base corpus
        if sweep_point:  # also against its base, and against the plain model with the same tag
            references += [base, f"{PLAIN}@{tag}"]
        references = list(dict.fromkeys(references))
        for reference in (r for r in references if r in names and r != name):
            for figure, (_, lower_is_better) in FIGURES.items():
                diff = paired_difference(runs, name, reference, figure)
                if diff["n"]:
                    differences.append(
                        {
                            "variant": name,
                            "reference": reference,
                            "figure": figure,
                            **diff,
                            "reading": reading(diff, lower_is_better),
                            "seeds_to_resolve": seeds_to_resolve(diff),
                        }
                    )
        # what the policy adds to the same sampler without it, in the same runs (issue 17's aim)
        gain = summarize(
            [
                r["steering_accuracy_guided"] - r["steering_accuracy_guided_w0"]
                for r in runs
                if r["variant"] == name
                and r.get("steering_accuracy_guided") is not None
                and r.get("steering_accuracy_guided_w0") is not None
            ]
        )
        if gain["n"]:
            next(row for row in rows if row["variant"] == name)["guidance_gain"] = gain
            differences.append(
                {
                    "variant": name,
                    "reference": GUIDANCE_REFERENCE,
                    "figure": "steering_accuracy_guided",
                    **gain,
                    "reading": reading(gain, lower_is_better=False),
                }
            )
    return rows, differences
