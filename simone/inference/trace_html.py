"""`--trace-html`: a generation trace as one self-contained HTML page.

Each generated token is a span coloured by the model's probability of it (red = unlikely,
green = likely); hovering shows its probability, entropy, the positions it attended to most
and the policy head's domain distribution. Prompt tokens are shown grey, numbered by position,
so the sources can be found.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from simone.rundir import atomic_write_text

_STYLE = """
body { font-family: ui-monospace, Menlo, Consolas, monospace; margin: 2em; line-height: 1.9; }
.tok { white-space: pre-wrap; border-radius: 3px; padding: 1px 0; cursor: default; }
.prompt { color: #777; }
.tok:hover { outline: 1px solid #333; }
.tok.src { outline: 2px solid #1f6feb; }
#info { position: fixed; right: 1em; top: 1em; width: 28em; background: #fff; border: 1px solid #ccc;
        padding: .6em; font-size: 12px; white-space: pre-wrap; line-height: 1.4; }
.legend { font-size: 12px; color: #555; margin-bottom: 1em; }
"""

_SCRIPT = """
const info = document.getElementById('info');
document.querySelectorAll('.tok').forEach(el => {
  el.addEventListener('mouseenter', () => {
    document.querySelectorAll('.src').forEach(s => s.classList.remove('src'));
    const srcs = JSON.parse(el.dataset.sources || '[]');
    srcs.forEach(s => { const t = document.getElementById('p' + s[0]); if (t) t.classList.add('src'); });
    info.textContent = el.title;
  });
});
"""


def _colour(prob: float) -> str:
    """Probability 0 → red, 1 → green (HSL hue 0..120), light enough to read on."""
    hue = max(0.0, min(1.0, prob)) * 120
    return f"hsl({hue:.0f}, 75%, 80%)"


def render_trace_html(prompt_tokens: list[str], records: list[dict], title: str = "SIM-ONE trace") -> str:
    """HTML for a trace: `prompt_tokens` (text of each prompt position) then `records`
    (the JSONL trace objects, in order; their positions continue after the prompt)."""
    parts = []
    for pos, text in enumerate(prompt_tokens):
        parts.append(f'<span class="tok prompt" id="p{pos}" title="prompt position {pos}">{html.escape(text)}</span>')
    for i, rec in enumerate(records):
        pos = len(prompt_tokens) + i
        lines = [f"position {pos}: {rec['text']!r}", f"p = {rec['prob']:.3f}   entropy = {rec['entropy']:.2f} nats"]
        if rec.get("top_sources"):
            lines.append("attended to:")
            lines += [f"  {w:6.3f}  @{p} {t!r}" for p, t, w in rec["top_sources"]]
        if rec.get("memory") is not None:
            lines.append(f"  {rec['memory']:6.3f}  memory slots")
        if rec.get("policy"):
            lines.append("policy:")
            lines += [f"  {p:6.3f}  {d}" for d, p in sorted(rec["policy"].items(), key=lambda kv: -kv[1])]
        sources = json.dumps([[s[0], s[2]] for s in rec.get("top_sources") or []])
        parts.append(
            f'<span class="tok" id="p{pos}" style="background:{_colour(rec["prob"])}" '
            f'title="{html.escape(chr(10).join(lines))}" data-sources="{html.escape(sources)}">'
            f"{html.escape(rec['text'])}</span>"
        )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body><h3>{html.escape(title)}</h3>"
        f"<div class='legend'>Generated tokens coloured by probability (red low, green high); "
        f"hover a token for its sources (outlined) and policy.</div>"
        f"<div id='info'>hover a token</div><div>{''.join(parts)}</div>"
        f"<script>{_SCRIPT}</script></body></html>\n"
    )


def write_trace_html(path: Path, prompt_tokens: list[str], records: list[dict], title: str = "SIM-ONE trace") -> Path:
    path = Path(path)
    atomic_write_text(path, render_trace_html(prompt_tokens, records, title))
    return path
