"""Gopher/C4-style document quality rules, computed over windows of a few thousand words.

Whole-book statistics punish long books that repeat themselves by design (scripture,
verse, litanies); a book fails a rule only when more than half of its windows fail it.
Each rule has a threshold; `relax` (0..1, per domain in config) widens every threshold.

Rules (value per window; the document's value is the median over its windows):
  mean_word_length   characters per whitespace word, must lie in [3, 10]
  symbol_word_ratio  ("#", "...", "…") per word, at most 0.1
  para_end_punct     share of paragraphs (of 8+ words) ending in punctuation, at least 0.1
                     (paragraphs, not lines: hard-wrapped books end lines mid-sentence;
                     low, because the First Folio ends most speeches without a stop)
  dup_line_frac      share of non-trivial lines that repeat another line, at most 0.3
  top_2gram_frac     share of characters in the most frequent word 2-gram, at most 0.2
  dup_5gram_frac     share of characters in repeated word 5-grams, at most 0.4 (Gopher
                     uses 0.15 for web pages; the KJV's formulaic books reach 0.31)
  stop_words         how many of 8 common English stop words appear, at least 2
  alpha_word_frac    share of whitespace words holding a letter, at least 0.8

One rule looks at the whole document instead (a flag, not a quarantine: see status.py):
  whitespace_share   share of characters that are whitespace, at most 0.5 (prose has about
                     0.2). Windows are cut at line ends, so a megabyte run of spaces with no
                     newline lands in one window and would pass the median; and cleaning
                     keeps a run inside a line, where it is not trailing whitespace.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from statistics import median

import numpy as np

from simone.data.dedup import WordHasher, duplicated_mask, ngram_hashes, tokenize, word_hashes

STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")
# a whitespace word without a letter (Latin, Greek, Cyrillic)
_NON_ALPHA_WORD = re.compile(r"(?<!\S)[^\sa-zA-Z\u00c0-\u024f\u0370-\u03ff\u0400-\u04ff]+(?!\S)")
_END_PUNCT = tuple(".!?;:,\"'’”)]»-—_*")


@dataclass(frozen=True)
class Rule:
    name: str
    low: float | None  # value must be >= low
    high: float | None  # value must be <= high


RULES = (
    Rule("mean_word_length", 3.0, 10.0),
    Rule("symbol_word_ratio", None, 0.1),
    Rule("para_end_punct", 0.1, None),
    Rule("dup_line_frac", None, 0.3),
    Rule("top_2gram_frac", None, 0.2),
    Rule("dup_5gram_frac", None, 0.4),
    Rule("stop_words", 2.0, None),
    Rule("alpha_word_frac", 0.8, None),
)


WHITESPACE = Rule("whitespace_share", None, 0.5)


def whitespace_share(text: str) -> float:
    """Share of the characters of `text` that are whitespace (0.0 for an empty text)."""
    if not text:
        return 0.0
    return 1.0 - sum(map(len, text.split())) / len(text)


@dataclass
class DocTokens:
    """A document's tokens as arrays, computed once and shared by quality and dedup."""

    hashes: np.ndarray  # uint64 per token
    lengths: np.ndarray  # characters per token

    @classmethod
    def of(cls, text: str, hasher: WordHasher) -> DocTokens:
        tokens = tokenize(text)
        return cls(word_hashes(tokens, hasher), np.fromiter(map(len, tokens), dtype=np.int64, count=len(tokens)))


def _text_values(text: str) -> dict[str, float]:
    words = text.split()
    n = max(1, len(words))
    # headings and short lines are not prose paragraphs: only count those of 8+ words
    paras = [p.rstrip() for p in text.split("\n\n") if len(p.split(None, 8)) > 8]
    lines = [ln.strip() for ln in text.split("\n")]
    lines = [ln for ln in lines if len(ln) > 3]
    return {
        "mean_word_length": sum(map(len, words)) / n,
        "symbol_word_ratio": (text.count("#") + text.count("...") + text.count("…")) / n,
        "para_end_punct": sum(1 for p in paras if p.endswith(_END_PUNCT)) / len(paras) if paras else 1.0,
        "dup_line_frac": (len(lines) - len(set(lines))) / max(1, len(lines)),
        "alpha_word_frac": 1.0 - len(_NON_ALPHA_WORD.findall(text)) / n,
    }


def _token_values(hashes: np.ndarray, lengths: np.ndarray, stop_ids: np.ndarray) -> dict[str, float]:
    chars = int(lengths.sum()) or 1
    top2 = dup5 = 0.0
    if len(hashes) > 2:
        bigrams = np.sort(ngram_hashes(hashes, 2))
        # longest run of equal values in the sorted bigrams = count of the most frequent one
        change = np.flatnonzero(np.concatenate(([True], bigrams[1:] != bigrams[:-1], [True])))
        runs = np.diff(change)
        i = int(np.argmax(runs))
        if runs[i] > 1:
            value = bigrams[change[i]]
            pos = int(np.flatnonzero(ngram_hashes(hashes, 2) == value)[0])
            top2 = float(runs[i] * (lengths[pos] + lengths[pos + 1]) / chars)
    if len(hashes) > 5:
        dup = duplicated_mask(ngram_hashes(hashes, 5))
        covered = np.zeros(len(hashes), dtype=bool)
        for k in range(5):
            covered[k : k + len(dup)] |= dup
        dup5 = float(lengths[covered].sum() / chars)
    return {"top_2gram_frac": top2, "dup_5gram_frac": dup5, "stop_words": float(np.isin(stop_ids, hashes).sum())}


def text_windows(text: str, n_windows: int) -> list[str]:
    """`text` cut at line ends into `n_windows` pieces of about equal length."""
    if n_windows <= 1:
        return [text]
    out: list[str] = []
    start = 0
    step = len(text) / n_windows
    for k in range(1, n_windows):
        cut = text.find("\n", int(k * step))
        if cut < 0 or cut <= start:
            continue
        out.append(text[start:cut])
        start = cut + 1
    out.append(text[start:])
    return out


def passes(rule: Rule, value: float, relax: float) -> bool:
    below = rule.low is not None and value < rule.low * (1.0 - relax)
    above = rule.high is not None and value > rule.high * (1.0 + relax)
    return not (below or above)


def assess(
    text: str, tokens: DocTokens, window_words: int, hasher: WordHasher, relax: float = 0.0
) -> tuple[dict[str, float], list[str]]:
    """(per-rule median values plus failing-window counts, rules the document fails).

    The text is cut into windows of about `window_words` tokens; a document fails a rule
    when more than half of its windows fail it.
    """
    n_windows = max(1, round(len(tokens.hashes) / max(1, window_words)))
    stop_ids = word_hashes(list(STOP_WORDS), hasher)
    bounds = np.linspace(0, len(tokens.hashes), n_windows + 1).astype(int)
    texts = text_windows(text, n_windows)
    per_window = []
    for k in range(n_windows):
        values = _token_values(
            tokens.hashes[bounds[k] : bounds[k + 1]], tokens.lengths[bounds[k] : bounds[k + 1]], stop_ids
        )
        if k < len(texts):
            values.update(_text_values(texts[k]))
        per_window.append(values)
    out: dict[str, float] = {}
    failed: list[str] = []
    for rule in RULES:
        vals = [pw[rule.name] for pw in per_window if rule.name in pw]
        out[rule.name] = round(median(vals), 4)
        bad = sum(1 for v in vals if not passes(rule, v, relax))
        if bad * 2 > len(vals):
            failed.append(rule.name)
        if bad:
            out[f"{rule.name}_failed_windows"] = bad
    out["windows"] = n_windows
    return out, failed
