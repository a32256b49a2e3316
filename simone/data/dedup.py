"""Word hashing, n-gram hashes, MinHash signatures and near-duplicate clustering.

A document becomes an array of stable 64-bit word hashes (blake2b, so every process and
every run agrees); word n-grams are hashed from it with NumPy, never as Python strings.
MinHash signatures follow datasketch's `affine32` scheme (murmur3 finaliser, then
`a*h + b` mod 2^32 with datasketch's own permutations), so they load into `MinHash` and
`MinHashLSH` unchanged; computing them in NumPy here is only faster than feeding
millions of shingles through `MinHash.update_batch` one Python call at a time.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np

_TOKEN = re.compile(r"[^\W_]+")
_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd constant for polynomial n-gram hashing


class WordHasher:
    """token -> stable uint64 hash (blake2b), cached: each distinct token is hashed once."""

    def __init__(self) -> None:
        self.cache: dict[str, int] = {}

    def __call__(self, tokens: list[str]) -> np.ndarray:
        cache = self.cache
        for token in set(tokens).difference(cache):
            cache[token] = int.from_bytes(hashlib.blake2b(token.encode("utf-8"), digest_size=8).digest(), "little")
        # a plain dict's __getitem__ through map(): no Python-level call per token
        return np.fromiter(map(cache.__getitem__, tokens), dtype=np.uint64, count=len(tokens))


def tokenize(text: str) -> list[str]:
    """Lower-case alphanumeric tokens (punctuation and case do not make a copy different)."""
    return _TOKEN.findall(text.lower())


def word_hashes(tokens: list[str], hasher: WordHasher) -> np.ndarray:
    return hasher(tokens)


def _fmix64(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> np.uint64(33))


def ngram_hashes(words: np.ndarray, n: int) -> np.ndarray:
    """uint64 hash of every word n-gram (len(words) - n + 1 of them; empty if too short)."""
    m = len(words) - n + 1
    if m <= 0:
        return np.zeros(0, dtype=np.uint64)
    with np.errstate(over="ignore"):
        h = words[:m].copy()
        for k in range(1, n):
            h = h * _MIX + words[k : k + m]
        return _fmix64(h)


# ----------------------------------------------------------------------------- MinHash


def _fmix32(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def minhash_permutations(num_perm: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    from datasketch import MinHash  # noqa: PLC0415  # deferred: datasketch brings scipy (0.4 s to import)

    a, b = MinHash(num_perm=num_perm, seed=seed, scheme="affine32").permutations
    return a.astype(np.uint32), b.astype(np.uint32)


def unique_sorted(values: np.ndarray) -> np.ndarray:
    """np.unique without the index bookkeeping (a plain sort is several times faster)."""
    if len(values) == 0:
        return values
    v = np.sort(values)
    return v[np.concatenate(([True], v[1:] != v[:-1]))]


def duplicated_mask(values: np.ndarray) -> np.ndarray:
    """True where the value occurs more than once in `values`."""
    if len(values) < 2:
        return np.zeros(len(values), dtype=bool)
    v = np.sort(values)
    dups = unique_sorted(v[1:][v[1:] == v[:-1]])
    if len(dups) == 0:
        return np.zeros(len(values), dtype=bool)
    idx = np.searchsorted(dups, values).clip(max=len(dups) - 1)
    return dups[idx] == values


def minhash_signature(shingles: np.ndarray, perms: tuple[np.ndarray, np.ndarray], chunk: int = 2048) -> np.ndarray:
    """datasketch-compatible affine32 MinHash of a set of uint64 shingle hashes."""
    a, b = perms
    sig = np.full(len(a), np.iinfo(np.uint32).max, dtype=np.uint32)
    hv = _fmix32((unique_sorted(shingles) >> np.uint64(32)).astype(np.uint32))
    block = np.empty((chunk, len(a)), dtype=np.uint32)  # reused: no allocation per chunk
    with np.errstate(over="ignore"):
        for i in range(0, len(hv), chunk):
            x = hv[i : i + chunk, None]
            blk = block[: len(x)]
            np.multiply(x, a, out=blk)
            blk += b
            np.minimum(sig, blk.min(axis=0), out=sig)
    return sig


def jaccard_estimate(s1: np.ndarray, s2: np.ndarray) -> float:
    return float(np.mean(s1 == s2))


@dataclass
class DupCandidate:
    key: str  # document id
    signature: np.ndarray
    rank: tuple  # smaller is better: which copy we keep


def near_duplicates(cands: list[DupCandidate], threshold: float, num_perm: int) -> dict[str, tuple[str, float]]:
    """{dropped id: (kept id, estimated Jaccard)} for every document near a better one.

    Candidates are visited best first; each is compared (via LSH) with the kept ones
    before it and dropped if one is at least `threshold` similar; otherwise it is kept.
    """
    from datasketch import MinHash, MinHashLSH  # noqa: PLC0415  # deferred: brings scipy (0.4 s to import)

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    sigs: dict[str, np.ndarray] = {}
    dropped: dict[str, tuple[str, float]] = {}
    for c in sorted(cands, key=lambda c: c.rank):
        mh = MinHash(hashvalues=c.signature, seed=1, scheme="affine32")
        best: tuple[str, float] | None = None
        for other in lsh.query(mh):
            j = jaccard_estimate(c.signature, sigs[other])
            if j >= threshold and (best is None or j > best[1]):
                best = (other, j)
        if best is not None:
            dropped[c.key] = best
        else:
            lsh.insert(c.key, mh)
            sigs[c.key] = c.signature
    return dropped


# ----------------------------------------------------------------------------- in-document repeats


def repeated_passages(grams: np.ndarray, n: int) -> tuple[int, float]:
    """(longest run of words inside a passage that occurs twice or more, share of words in such runs).

    `grams` are the document's word n-gram hashes in order; a word position is "repeated"
    when the n-gram starting there occurs elsewhere in the document too.
    """
    if len(grams) == 0:
        return 0, 0.0
    rep = duplicated_mask(grams)
    if not rep.any():
        return 0, 0.0
    # run lengths of consecutive repeated n-gram starts; a run of r starts covers r+n-1 words
    padded = np.concatenate(([False], rep, [False])).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    runs = edges[1::2] - edges[0::2]
    longest = int(runs.max()) + n - 1
    covered = int((runs + n - 1).sum())
    return longest, min(1.0, covered / (len(grams) + n - 1))


def sample_grams(grams: np.ndarray, modulus: int) -> np.ndarray:
    """The distinct n-gram hashes whose value is 0 mod `modulus` (same subset in every document)."""
    if modulus <= 1:
        return unique_sorted(grams)
    return unique_sorted(grams[grams % np.uint64(modulus) == 0])


def contained_pairs(
    grams: list[np.ndarray], min_share: float, min_grams: int = 10, max_docs: int = 32
) -> list[tuple[int, int, float]]:
    """(i, j, share) for documents i whose n-gram set lies at least `min_share` inside
    document j (j != i), from each document's sorted distinct (sampled) n-gram hashes.

    MinHash estimates Jaccard similarity, which is small when a short work sits inside a
    long anthology; containment catches that copy. One sort over all n-grams: only n-grams
    shared by two or more documents are counted pair by pair.
    """
    if len(grams) < 2:
        return []
    ids = np.concatenate([np.full(len(g), i, dtype=np.int32) for i, g in enumerate(grams)])
    allg = np.concatenate(grams)
    order = np.argsort(allg, kind="stable")
    g, d = allg[order], ids[order]
    starts = np.flatnonzero(np.concatenate(([True], g[1:] != g[:-1])))
    ends = np.concatenate((starts[1:], [len(g)]))
    counts: dict[tuple[int, int], int] = {}
    sizes = ends - starts
    # n-grams in very many documents are stock phrases, not copies; they only cost time
    for k in np.flatnonzero((sizes > 1) & (sizes <= max_docs)):
        docs = np.unique(d[starts[k] : ends[k]]).tolist()
        for a in docs:
            for b in docs:
                if a != b:
                    counts[(a, b)] = counts.get((a, b), 0) + 1
    out = []
    for (a, b), c in counts.items():
        n = len(grams[a])
        if n >= min_grams and c / n >= min_share:
            out.append((a, b, c / n))
    return sorted(out)
