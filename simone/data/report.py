"""The curation report: one self-contained HTML page (inline CSS and SVG; no scripts
from anywhere, so it opens from disk offline).

Sections: totals before and after; words per domain and subdomain (words, because the
tokenizer is trained after curation: "tokens kept" are counted as whitespace words);
every flagged or quarantined file with its reasons and `dup_of`; duplicate clusters;
contamination; quality-rule histograms; the full file list.
"""

from __future__ import annotations

import html
import time
from collections import Counter
from pathlib import Path
from typing import Any

from simone.data.quality import RULES
from simone.data.status import FLAG, quarantines
from simone.rundir import atomic_write_text

_SHORT = {  # column-friendly rule names
    "mean_word_length": "wordlen",
    "symbol_word_ratio": "symbols",
    "para_end_punct": "punct",
    "dup_line_frac": "duplines",
    "top_2gram_frac": "top2gram",
    "dup_5gram_frac": "dup5gram",
    "stop_words": "stopwords",
    "alpha_word_frac": "alpha",
}
STATUS_COLORS = {"kept": "#2e7d32", "flagged": "#f9a825", "quarantined": "#c62828"}
SPLIT_COLORS = {"train": "#1565c0", "val": "#8e24aa", "dropped": "#9e9e9e"}

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1280px;color:#212121;padding:0 16px}
h1{font-size:1.6em;margin-bottom:4px} h2{margin-top:36px;border-bottom:2px solid #eee;padding-bottom:4px}
.sub{color:#666} .cards{display:flex;flex-wrap:wrap;gap:12px;margin:16px 0}
.card{border:1px solid #ddd;border-radius:8px;padding:10px 16px;min-width:150px;background:#fafafa}
.card b{display:block;font-size:1.5em} .card span{color:#666;font-size:.85em}
table{border-collapse:collapse;width:100%;font-size:.86em;margin:8px 0}
th,td{border-bottom:1px solid #eee;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f5f5f5;position:sticky;top:0} td.n{text-align:right;font-variant-numeric:tabular-nums}
td.path{font-family:ui-monospace,Menlo,monospace;font-size:.82em;word-break:break-all;min-width:260px;max-width:360px}
td.note{max-width:380px;overflow-wrap:anywhere}
td.dup{font-family:ui-monospace,Menlo,monospace;font-size:.82em;overflow-wrap:anywhere;max-width:220px}
.pill{display:inline-block;border-radius:10px;padding:1px 8px;margin:1px;font-size:.82em;color:#fff}
.kept{background:#2e7d32}.flagged{background:#f9a825;color:#000}.quarantined{background:#c62828}
.reason{background:#eceff1;color:#263238}.reason.bad{background:#ffcdd2}.reason.warn{background:#fff3c4}
.note{color:#555;font-size:.92em} .grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:16px}
.hist{border:1px solid #eee;border-radius:6px;padding:6px} .hist h4{margin:2px 0 4px;font-size:.9em}
details summary{cursor:pointer;color:#1565c0;margin:6px 0} .legend span{margin-right:14px}
.sw{display:inline-block;width:10px;height:10px;margin-right:4px;border-radius:2px}
.banner{background:#fff3c4;border:1px solid #f9a825;border-radius:6px;padding:8px 12px;margin:12px 0}
"""


def _e(x: Any) -> str:
    return html.escape("" if x is None else str(x))


def _pct(a: float, b: float) -> str:
    return f"{100.0 * a / b:.1f}%" if b else "–"


def _hbar_chart(
    rows: list[tuple[str, dict[str, float]]], colors: dict[str, str], width: int = 900, label_w: int = 260
) -> str:
    """Horizontal stacked bars, one row per label."""
    if not rows:
        return ""
    bar_h, gap = 18, 6
    total_max = max(sum(v.values()) for _, v in rows) or 1
    h = len(rows) * (bar_h + gap) + 10
    parts = [f'<svg width="{width}" height="{h}" role="img" xmlns="http://www.w3.org/2000/svg" font-size="12">']
    scale = (width - label_w - 90) / total_max
    for i, (label, values) in enumerate(rows):
        y = i * (bar_h + gap) + 4
        parts.append(f'<text x="{label_w - 6}" y="{y + 13}" text-anchor="end">{_e(label[:42])}</text>')
        x = float(label_w)
        for key, val in values.items():
            w = val * scale
            if w > 0:
                parts.append(
                    f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{colors.get(key, "#999")}"><title>{_e(label)} {key}: {val:,.0f}</title></rect>'
                )
            x += w
        parts.append(f'<text x="{x + 4:.1f}" y="{y + 13}" fill="#555">{sum(values.values()):,.0f}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _legend(colors: dict[str, str]) -> str:
    return (
        '<div class="legend">'
        + "".join(f'<span><i class="sw" style="background:{c}"></i>{_e(k)}</span>' for k, c in colors.items())
        + "</div>"
    )


def _histogram(
    name: str, values: list[float], low: float | None, high: float | None, width: int = 300, height: int = 140
) -> str:
    if not values:
        return ""
    lo, hi = min(values), max(values)
    for t in (low, high):
        if t is not None:
            lo, hi = min(lo, t), max(hi, t)
    if hi <= lo:
        hi = lo + 1.0
    bins = 24
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, int((v - lo) / (hi - lo) * bins))] += 1
    cmax = max(counts) or 1
    pad_l, pad_b = 30, 18
    bw = (width - pad_l - 6) / bins
    parts = [f'<svg width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg" font-size="10">']
    for i, c in enumerate(counts):
        bh = max(2.0, (height - pad_b - 8) * c / cmax) if c else 0.0  # a single document stays visible
        x0 = lo + (hi - lo) * i / bins
        x1 = lo + (hi - lo) * (i + 1) / bins
        ok = (low is None or x1 >= low) and (high is None or x0 <= high)
        parts.append(
            f'<rect x="{pad_l + i * bw:.1f}" y="{height - pad_b - bh:.1f}" width="{bw - 1:.1f}" height="{bh:.1f}" fill="{"#1565c0" if ok else "#c62828"}"><title>{x0:.3g}–{x1:.3g}: {c} documents</title></rect>'
        )
    for t in (low, high):
        if t is not None:
            x = pad_l + (t - lo) / (hi - lo) * (width - pad_l - 6)
            parts.append(
                f'<line x1="{x:.1f}" x2="{x:.1f}" y1="4" y2="{height - pad_b}" stroke="#c62828" stroke-dasharray="4 2"/>'
            )
    parts.append(
        f'<text x="{pad_l}" y="{height - 4}">{lo:.3g}</text><text x="{width - 6}" y="{height - 4}" text-anchor="end">{hi:.3g}</text>'
    )
    parts.append(f'<text x="2" y="12">{cmax}</text></svg>')
    return f'<div class="hist"><h4>{_e(name)}</h4>{"".join(parts)}</div>'


def _reason_pill(code: str) -> str:
    cls = "bad" if quarantines(code) else "warn" if code in FLAG else ""
    return f'<span class="pill reason {cls}">{_e(code)}</span>'


def write_report(path: Path, result, records: list[dict[str, Any]]) -> None:
    """Write the report page for a finished curation."""
    r = result
    sc = r.status_counts
    words_after = r.words_train + r.words_val
    out: list[str] = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        "<meta name=viewport content='width=device-width,initial-scale=1'>",
        f"<title>Curation report — {_e(Path(r.corpus).name)}</title><style>{_CSS}</style></head><body>",
        f"<h1>Curation report</h1><div class=sub>corpus <code>{_e(r.corpus)}</code> · {time.strftime('%Y-%m-%d %H:%M:%S')} · "
        f"{'curation on' if r.enabled else 'curation OFF (uncurated ablation: read and decode only)'}"
        f"{' · strict (flagged files dropped)' if r.strict else ''}</div>",
    ]
    out.append(
        "<nav class=note><a href='#totals'>totals</a> · <a href='#domains'>domains</a> · <a href='#labels'>label mismatches</a> · "
        "<a href='#problems'>flagged &amp; quarantined</a> · <a href='#duplicates'>duplicates</a> · <a href='#overlap'>overlap</a> · "
        "<a href='#quality'>quality rules</a> · <a href='#files'>all files</a></nav>"
    )
    mism = [x for x in records if "title_mismatch" in x["reasons"]]
    if mism:
        out.append(
            f"<div class=banner><b>{len(mism)} file(s) do not appear to hold the work their metadata names</b> "
            f"(title_mismatch). They are {'dropped (strict)' if r.strict else 'kept for training but'} listed below; "
            "a mislabelled file puts the wrong text into its domain's training and evaluation.</div>"
        )

    for warning in r.warnings:
        out.append(f"<div class=banner><b>warning</b>: {_e(warning)}</div>")

    # totals
    out.append("<h2 id=totals>Totals</h2><div class=cards>")
    for label, value, sub in (
        ("input files", f"{r.files}", f"{r.bytes_in / 1e6:.1f} MB"),
        ("words before", f"{r.words_in:,}", "every decodable file, as read"),
        ("words after", f"{words_after:,}", _pct(words_after, r.words_in) + " of them train or validate"),
        ("kept", f"{sc.get('kept', 0)}", "files"),
        ("flagged", f"{sc.get('flagged', 0)}", "kept unless --strict"),
        ("quarantined", f"{sc.get('quarantined', 0)}", "left out, never deleted"),
        ("train", f"{r.documents_train} docs", f"{r.words_train:,} words"),
        (
            "validation",
            f"{r.documents_val} docs" + (f" + {r.val_slices} slices" if r.val_slices else ""),
            f"{r.words_val:,} words",
        ),
    ):
        out.append(f"<div class=card><span>{_e(label)}</span><b>{_e(value)}</b><span>{_e(sub)}</span></div>")
    out.append("</div>")
    if r.ignored:
        out.append(
            f"<p class=note>Not inputs (only .txt and .json are read): {_e(', '.join(r.ignored[:20]))}"
            f"{' …' if len(r.ignored) > 20 else ''}</p>"
        )
    out.append(_hbar_chart([("files by status", {k: float(sc.get(k, 0)) for k in STATUS_COLORS})], STATUS_COLORS))
    out.append(_legend(STATUS_COLORS))
    if r.reason_counts:
        out.append("<h3>Reasons</h3>")
        out.append(
            _hbar_chart(
                [(k, {"files": float(v)}) for k, v in sorted(r.reason_counts.items(), key=lambda kv: -kv[1])],
                {"files": "#546e7a"},
            )
        )

    # domains
    out.append(
        "<h2 id=domains>Words per domain and subdomain</h2><p class=note>Words after cleaning (whitespace-separated). "
        "Token counts are not known yet at this stage: the tokenizer is trained on the curated documents; "
        "roughly 1.3 tokens per word for English BPE.</p>"
    )
    out.append(_legend(SPLIT_COLORS))
    out.append(
        _hbar_chart(
            [(d, {k: float(v[k]["words"]) for k in ("train", "val", "dropped")}) for d, v in r.domains.items()],
            SPLIT_COLORS,
        )
    )
    if r.val_slices:
        out.append(
            "<p class=note><b>val slices</b>: a domain with no document to spare for validation (a single book) "
            "validates on a held-out slice, the tail of its longest document cut at a paragraph break "
            "(<code>data.val_fraction</code> of its words, at least <code>data.min_val_words</code>); "
            "only the text before the cut is trained on. Its file shows split <code>train+val-slice</code> below.</p>"
        )
    out.append(_domain_table("domain", r.domains))
    out.append("<details><summary>per subdomain</summary>")
    out.append(
        _hbar_chart(
            [(d, {k: float(v[k]["words"]) for k in ("train", "val", "dropped")}) for d, v in r.subdomains.items()],
            SPLIT_COLORS,
        )
    )
    out.append(_domain_table("subdomain", r.subdomains) + "</details>")

    # label mismatches first: they poison per-domain evaluation
    if mism:
        out.append(f"<h2 id=labels>Files whose text does not match their metadata ({len(mism)})</h2>")
        out.append(
            "<table><tr><th>file</th><th>metadata title / author</th><th>what the text shows</th><th>status</th><th>split</th></tr>"
        )
        for x in mism:
            out.append(
                f"<tr><td class=path>{_e(x['path'])}</td><td>{_e(x.get('title'))}<br><span class=note>{_e(x.get('author'))}</span></td>"
                f"<td class=note>{_e(x['notes'].get('title_mismatch'))}</td><td><span class='pill {x['status']}'>{x['status']}</span></td>"
                f"<td>{_e(x.get('split') or '–')}</td></tr>"
            )
        out.append("</table>")

    # problems
    problems = [x for x in records if x["status"] != "kept"]
    order = {"quarantined": 0, "flagged": 1}
    problems.sort(key=lambda x: (order.get(x["status"], 2), "title_mismatch" not in x["reasons"], x["path"]))
    out.append(f"<h2 id=problems>Flagged and quarantined files ({len(problems)})</h2>")
    out.append(_file_table(problems, notes=True))

    # duplicates
    out.append(f"<h2 id=duplicates>Duplicate clusters ({len(r.duplicate_clusters)})</h2>")
    if r.duplicate_clusters:
        out.append("<table><tr><th>kept copy</th><th>dropped copies</th></tr>")
        for c in r.duplicate_clusters:
            copies = "<br>".join(
                f"{_e(x['path'])} <span class=note>({x['kind']}, {x['similarity']:.0%})</span>" for x in c["copies"]
            )
            # kinds: exact (same cleaned text), near (MinHash Jaccard), contained (13-grams inside the kept copy)
            out.append(f"<tr><td class=path>{_e(c['kept'])}</td><td class=path>{copies}</td></tr>")
        out.append("</table>")
    else:
        out.append("<p class=note>none</p>")

    # contamination
    out.append(
        f"<h2 id=overlap>Validation/training overlap ({len(r.contaminated)})</h2><p class=note>Validation documents "
        "whose 13-word spans also occur in training documents (above the threshold). "
        "<code>--decontaminate</code> moves them to training.</p>"
    )
    if not r.contaminated:
        out.append("<p class=note>none above the threshold</p>")
    if r.contaminated:
        out.append(
            "<table><tr><th>validation document</th><th>domain</th><th class=n>13-grams shared</th><th>most shared with (training)</th><th>moved</th></tr>"
        )
        for c in r.contaminated:
            out.append(
                f"<tr><td class=path>{_e(c['path'])}</td><td>{_e(c['domain'])}</td><td class=n>{c['overlap']:.1%}</td>"
                f"<td class=path>{_e(c.get('source'))} <span class=note>({c.get('source_overlap', 0):.0%})</span></td><td>{'yes' if c['moved'] else 'no'}</td></tr>"
            )
        out.append("</table>")

    # quality histograms
    assessed = [x for x in records if x.get("quality")]
    if assessed:
        out.append(
            "<h2 id=quality>Quality rules</h2><p class=note>Per document: the median over windows of a few thousand words; "
            "dashed lines are the thresholds before per-domain relaxation; red bins fall outside them. "
            "A document fails a rule when more than half of its windows fail it.</p><div class=grid>"
        )
        for rule in RULES:
            vals = [float(x["quality"][rule.name]) for x in assessed if rule.name in x["quality"]]
            out.append(_histogram(rule.name, vals, rule.low, rule.high))
        rep = [float(x["quality"].get("repeated_share", 0.0)) for x in assessed]
        out.append(_histogram("repeated_share (in-document repeats)", rep, None, None))
        ov = [float(x["quality"]["train_13gram_overlap"]) for x in assessed if "train_13gram_overlap" in x["quality"]]
        if ov:
            out.append(_histogram("train_13gram_overlap (validation docs)", ov, None, None))
        out.append("</div>")

    # everything
    out.append(f"<h2 id=files>All files ({len(records)})</h2><details><summary>show every file</summary>")
    out.append(_file_table(records, notes=False) + "</details>")
    out.append("</body></html>")
    atomic_write_text(path, "\n".join(out))


def _domain_table(kind: str, table: dict[str, dict[str, dict[str, int]]]) -> str:
    rows = [
        f"<table><tr><th>{kind}</th><th class=n>train docs</th><th class=n>train words</th><th class=n>val docs</th>"
        "<th class=n>val slices</th><th class=n>val words</th><th class=n>dropped docs</th><th class=n>dropped words</th></tr>"
    ]
    for name, v in table.items():
        rows.append(
            f"<tr><td>{_e(name)}</td><td class=n>{v['train']['docs']}</td><td class=n>{v['train']['words']:,}</td>"
            f"<td class=n>{v['val']['docs']}</td><td class=n>{v['val'].get('slices', 0)}</td><td class=n>{v['val']['words']:,}</td>"
            f"<td class=n>{v['dropped']['docs']}</td><td class=n>{v['dropped']['words']:,}</td></tr>"
        )
    rows.append("</table>")
    return "".join(rows)


def _file_table(records: list[dict[str, Any]], notes: bool) -> str:
    if not records:
        return "<p class=note>none</p>"
    rows = [
        "<table><tr><th>file</th><th>status</th><th>reasons</th><th>title / author</th><th class=n>words</th><th>split</th><th>dup_of</th>"
        + ("<th>details</th>" if notes else "<th>quality rules (median over windows)</th>")
        + "</tr>"
    ]
    for x in records:
        reasons = "".join(
            _reason_pill(c) for c in x["reasons"] if notes or c not in ("header_stripped", "boilerplate_stripped")
        )
        who = f"{_e(x.get('title'))}<br><span class=note>{_e(x.get('author'))}</span>" if x.get("title") else ""
        q = x.get("quality") or {}
        detail = (
            "<td class=note>" + " · ".join(f"{_SHORT[r.name]} {q[r.name]:.3g}" for r in RULES if r.name in q) + "</td>"
        )
        if notes:
            detail = (
                "<td class=note>"
                + "<br>".join(
                    f"<b>{_e(k)}</b>: {_e(v)}" for k, v in x.get("notes", {}).items() if k not in ("header_stripped",)
                )
                + "</td>"
            )
        rows.append(
            f"<tr><td class=path>{_e(x['path'])}</td><td><span class='pill {x['status']}'>{x['status']}</span></td><td>{reasons}</td>"
            f"<td>{who}</td><td class=n>{x['words']:,}</td><td>{_e(x.get('split') or '–')}</td><td class=dup>{_e(x.get('dup_of') or '')}</td>{detail}</tr>"
        )
    rows.append("</table>")
    return "".join(rows)


def reason_counts(records: list[dict[str, Any]]) -> Counter:
    return Counter(c for x in records for c in x["reasons"])
