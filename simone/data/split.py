"""Deterministic train/validation split by document, every domain in validation.

Each document's place is decided by a hash of (split_seed, document id), never by
Python's `random` or `hash()`, so the same corpus and seed always split the same way on
any machine, and adding a document does not move the others.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict


def split_key(doc_id: str, seed: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{doc_id}".encode("utf-8"), digest_size=8).digest(), "big")


def assign_splits(docs: list[tuple[str, str]], val_fraction: float, seed: int, min_val_docs: int = 1,
                  avoid_val: set[str] | frozenset[str] = frozenset()) -> dict[str, str]:
    """{doc id: "train" | "val"} for (doc id, domain) pairs.

    Per domain: about `val_fraction` of its documents (at least `min_val_docs`) go to
    validation, chosen by smallest hash; a domain with one document keeps it for training
    (a domain must be trained on before it can be evaluated). Ids in `avoid_val` (e.g.
    files flagged as mislabelled) go to validation only when a domain has too few others.
    """
    by_domain: dict[str, list[str]] = defaultdict(list)
    for doc_id, domain in docs:
        by_domain[domain].append(doc_id)
    out: dict[str, str] = {}
    for domain, ids in by_domain.items():
        ordered = sorted(ids, key=lambda i: (i in avoid_val, split_key(i, seed), i))
        n = len(ordered)
        n_val = 0 if n < 2 else min(n - 1, max(min_val_docs, round(val_fraction * n)))
        for k, doc_id in enumerate(ordered):
            out[doc_id] = "val" if k < n_val else "train"
    return out
