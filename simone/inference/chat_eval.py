"""Chat replies measured: greedy replies to held-out conversations against their references.

For each held-out conversation (chat_data.py's `heldout.jsonl`) the prompt is every message
before its last assistant message, laid out by the chat template up to `<|assistant|>`; the
model answers greedily (`LanguageModel.generate`, the decode engine's token loop) until
`<|endofturn|>`, the end of document or a token limit (twice the reference's length plus
`REPLY_SLACK`, within the context).

    exact_match   share of replies whose words are the reference's (case and punctuation aside)
    token_f1      mean word-overlap F1 of reply and reference (SQuAD's measure, same words)
    ends_turn     share of replies that end with `<|endofturn|>`
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from collections.abc import Iterable
from typing import Any

import torch

from simone.data.chat_template import END_OF_TURN, chat_ids
from simone.data.tokenizer import Tokenizer
from simone.model import LanguageModel

REPLY_SLACK = 32  # a reply may run to twice its reference's length and this many tokens more (within the context)
_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def token_f1(reply: str, reference: str) -> float:
    """Word-overlap F1 of `reply` against `reference` (1.0 for two texts without words)."""
    a, b = words(reply), words(reference)
    if not a or not b:
        return float(a == b)
    common = sum((Counter(a) & Counter(b)).values())
    return 0.0 if common == 0 else 2 * common / (len(a) + len(b))


def greedy_replies(
    model: LanguageModel, tokenizer: Tokenizer, prompts: list[list[int]], limits: list[int]
) -> list[tuple[str, bool]]:
    """The model's greedy reply to each prompt (ids ending in `<|assistant|>`), of at most its
    limit of tokens, and whether it ended with `<|endofturn|>`. Prompts of one length decode
    together, as one batch (no padding to get wrong)."""
    eot = tokenizer.chat_ids[END_OF_TURN]
    device = model.tok_embeddings.weight.device
    replies: list[tuple[str, bool]] = [("", False)] * len(prompts)
    by_length: dict[int, list[int]] = {}
    for i, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).append(i)
    for rows in by_length.values():
        idx = torch.tensor([prompts[i] for i in rows], dtype=torch.long, device=device)
        steps = [t[:, 0].tolist() for t in model.generate(idx, max(limits[i] for i in rows), 0.0, eos_id=eot)]
        for j, i in enumerate(rows):
            reply = [step[j] for step in steps][: limits[i]]
            end = next((k for k, t in enumerate(reply) if t in (eot, tokenizer.eod_id)), len(reply))
            replies[i] = (tokenizer.decode(reply[:end]), end < len(reply) and reply[end] == eot)
    return replies


def _figures(rows: list[dict[str, Any]]) -> dict[str, Any]:
    n = max(1, len(rows))
    return {
        "items": len(rows),
        "exact_match": round(sum(r["exact"] for r in rows) / n, 4),
        "token_f1": round(sum(r["f1"] for r in rows) / n, 4),
        "ends_turn": round(sum(r["ended"] for r in rows) / n, 4),
    }


@torch.no_grad()
def evaluate_chat(
    model: LanguageModel, tokenizer: Tokenizer, conversations: Iterable[dict], max_items: int = 200, n_examples: int = 5
) -> dict[str, Any]:
    """Reply to up to `max_items` held-out conversations ({"messages", "task"?} each) and
    measure the replies (module docstring): the figures overall and per task, and the first
    `n_examples` replies beside their references. The model's train/eval mode is restored."""
    was_training = model.training
    model.eval()
    rows: list[dict[str, Any]] = []
    prompts: list[list[int]] = []
    limits: list[int] = []
    for conv in itertools.islice(conversations, max_items):
        messages = conv["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        reference = messages[last]["content"]
        prompts.append(chat_ids(tokenizer, messages[:last], add_generation_prompt=True))
        room = model.cfg.max_seq_len + 1 - len(prompts[-1])  # the reply must end within the context
        limits.append(max(1, min(room, 2 * len(tokenizer.encode(reference)) + REPLY_SLACK)))
        prompt = messages[last - 1]["content"] if last else ""
        rows.append({"task": conv.get("task"), "prompt": prompt, "reference": reference})
    try:
        replies = greedy_replies(model, tokenizer, prompts, limits)
    finally:
        model.train(was_training)
    for row, (reply, ended) in zip(rows, replies):
        exact = words(reply) == words(row["reference"])
        row.update(reply=reply, ended=ended, exact=exact, f1=token_f1(reply, row["reference"]))
    tasks = sorted({r["task"] for r in rows if r["task"]})
    return {
        **_figures(rows),
        "by_task": {t: _figures([r for r in rows if r["task"] == t]) for t in tasks},
        "examples": [{k: r[k] for k in ("prompt", "reference", "reply", "ended")} for r in rows[:n_examples]],
    }


def format_chat_eval(before: dict[str, Any] | None, after: dict[str, Any]) -> list[str]:
    """Lines for the console: each figure before → after fine-tuning, overall and per task."""

    def row(label: str, b: dict[str, Any] | None, a: dict[str, Any]) -> str:
        parts = [
            f"{name} {'' if b is None else f'{b[key]:.1%} → '}{a[key]:.1%}"
            for name, key in (("exact match", "exact_match"), ("word F1", "token_f1"), ("ends turn", "ends_turn"))
        ]
        return f"{label} ({a['items']}): " + ", ".join(parts)

    lines = [row("held-out replies", before, after)]
    if after.get("val_loss") is not None:  # a fine-tune's (simone/workflows/finetune.py)
        was = (before or {}).get("val_loss")
        was = "" if was is None else f"{was:.4f} → "
        lines.append(f"held-out loss on the assistant tokens: {was}{after['val_loss']:.4f}")
    for task, a in after["by_task"].items():
        lines.append(row(f"  {task}", (before or {}).get("by_task", {}).get(task), a))
    return lines


def chat_eval_markdown(chat_eval: dict[str, Any] | None) -> list[str]:
    """A fine-tune's section of the model card and report.md (none for another model): its
    conversations, the chat tokens it added to its parent, its replies before and after."""
    if not chat_eval:
        return []
    data = chat_eval.get("data") or {}
    lines = [
        "## Chat fine-tuning",
        "",
        f"Fine-tuned on {data.get('conversations')} conversations ({(data.get('pieces') or {}).get('val')} held "
        "out), the loss on the assistant's turns only (`simone finetune`).",
    ]
    if chat_eval.get("chat_tokens_added"):
        lines += [
            "The parent's tokenizer had no chat tokens: the 4 were added and their embedding rows set to the",
            "mean of the other rows before fine-tuning.",
        ]
    lines += [
        "",
        "Greedy replies to the held-out conversations:",
        "",
        "| model | replies | exact match | word F1 | ends with end-of-turn | loss on the assistant tokens |",
        "|---|---|---|---|---|---|",
    ]
    for label, key in (("before fine-tuning", "before"), ("after", "after")):
        f = chat_eval.get(key)
        if f:
            lines.append(
                f"| {label} | {f['items']} | {f['exact_match']:.1%} | {f['token_f1']:.1%} | {f['ends_turn']:.1%} "
                f"| {'–' if f.get('val_loss') is None else format(f['val_loss'], '.4f')} |"
            )
    return [*lines, ""]
