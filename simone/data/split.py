"""Deterministic train/validation split by document, every domain in validation.

Each document's place is decided by a hash of (split_seed, document id), never by
Python's `random` or `hash()`, so the same corpus and seed always split the same way on
any machine, and adding a document does not move the others. A domain left without a
validation document (one document only) gets a held-out slice of one instead
(`hold_out_slice`), so every domain is evaluated.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import defaultdict
from dataclasses import dataclass


def split_key(doc_id: str, seed: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{doc_id}".encode(), digest_size=8).digest(), "big")


def assign_splits(
    docs: list[tuple[str, str]],
    val_fraction: float,
    seed: int,
    min_val_docs: int = 1,
    avoid_val: set[str] | frozenset[str] = frozenset(),
) -> dict[str, str]:
    """{doc id: "train" | "val"} for (doc id, domain) pairs.

    Per domain: about `val_fraction` of its documents (at least `min_val_docs`) go to
    validation, chosen by smallest hash; a domain with one document keeps it for training
    (a domain must be trained on before it can be evaluated; curation then holds out a
    slice of it, see `hold_out_slice`). Ids in `avoid_val` (e.g.
    files flagged as mislabelled) go to validation only when a domain has too few others.
    """
    by_domain: dict[str, list[str]] = defaultdict(list)
    for doc_id, domain in docs:
        by_domain[domain].append(doc_id)
    out: dict[str, str] = {}
    for ids in by_domain.values():
        ordered = sorted(ids, key=lambda i: (i in avoid_val, split_key(i, seed), i))
        n = len(ordered)
        n_val = 0 if n < 2 else min(n - 1, max(min_val_docs, round(val_fraction * n)))
        for k, doc_id in enumerate(ordered):
            out[doc_id] = "val" if k < n_val else "train"
    return out


# ----------------------------------------------------------------------------- held-out slices
#
# A domain with one document (a single book, a single file) has no document to spare for
# validation, so its validation text is the tail of that document: a share of its words,
# cut at a paragraph boundary, never trained on. Words, not tokens: curation runs before the
# tokenizer is trained (the curation report counts words too).

_WORD = re.compile(r"\S+")
_BOUNDARIES = ("\n\n", "\n")  # preferred cuts: a blank line, then a line break, then any space


@dataclass(frozen=True)
class HeldOutSlice:
    """The held-out tail of a document: `text[start:]` validates, `text[:start]` trains."""

    start: int  # character offset in the cleaned text
    words: int  # words in the slice
    train_words: int  # words left before it, for training


def min_words_to_hold_out(min_val_words: int) -> int:
    """Words a document needs before a slice can be held out: `min_val_words` for the slice
    and at least as many left for training."""
    return 2 * min_val_words


def hold_out_slice(text: str, fraction: float, min_val_words: int) -> HeldOutSlice | None:
    """Where to cut `text` so its tail (about `fraction` of its words, at least
    `min_val_words`) becomes validation text; None when the text is too short to leave
    `min_val_words` for training as well.

    The cut falls at the latest paragraph break (blank line, else line break) that gives the
    slice at least its share without more than doubling it; failing that, between two words.
    Depends only on the text and the two settings, so the same corpus cuts the same way.
    """
    min_val_words = max(1, min_val_words)
    starts = [m.start() for m in _WORD.finditer(text)]
    n = len(starts)
    want = max(min_val_words, math.ceil(fraction * n))
    if n - want < min_val_words:
        return None
    latest = n - want  # the slice is words[k:], k <= latest
    earliest = max(min_val_words, n - 2 * want)
    for sep in _BOUNDARIES:
        for k in range(latest, earliest - 1, -1):
            if sep in text[starts[k - 1] : starts[k]]:  # the whitespace before word k holds `sep`
                return HeldOutSlice(start=starts[k], words=n - k, train_words=k)
    return HeldOutSlice(start=starts[latest], words=want, train_words=latest)
