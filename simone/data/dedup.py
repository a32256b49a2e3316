"""Word hashing, n-gram hashes, MinHash signatures and near-duplicate clustering.

A document becomes an array of stable 64-bit word hashes (blake2b, so every process and
every run agrees); word n-grams are hashed from it with NumPy, never as Python strings.
MinHash signatures follow datasketch's `affine32` scheme (murmur3 finaliser, then
`a*h + b` mod 2^32 with datasketch's own permutations), so they load into `MinHash` and
`MinHashLSH` unchanged; computing them in NumPy here is only faster than feeding
millions of shingles through `MinHash.update_batch` one Python call at a time.

The corpus-wide comparisons (containment, contamination) never hold every document's n-grams
at once: a document's sampled n-grams can wait on disk (`SpilledGrams`), and the comparisons
go through the 64-bit hash space one range at a time (`hash_ranges`), each range holding
about GRAMS_PER_PASS n-grams of the whole corpus; counts add up exactly across ranges.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_TOKEN = re.compile(r"[^\W_]+")
_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd constant for polynomial n-gram hashing
GRAMS_PER_PASS = 1 << 21  # n-gram hashes of the whole corpus compared at a time (~100 MB of work arrays)


class WordHasher:
    """token -> stable uint64 hash (blake2b), cached: each distinct token is hashed once
    (until the cache holds `max_tokens`; it then starts again, so it stays bounded)."""

    def __init__(self, max_tokens: int = 1 << 21) -> None:
        self.cache: dict[str, int] = {}
        self.max_tokens = max_tokens

    def __call__(self, tokens: list[str]) -> np.ndarray:
        if len(self.cache) > self.max_tokens:
            self.cache.clear()
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


@dataclass(frozen=True)
class SpilledGrams:
    """A document's sorted distinct n-gram hashes, kept on disk: uint64 values [start, stop) of file `path`."""

    path: str
    start: int
    stop: int

    @classmethod
    def append(cls, path: str, grams: np.ndarray) -> SpilledGrams:
        """Write `grams` at the end of `path` (created if missing)."""
        with open(path, "ab") as f:
            start = f.tell() // 8
            f.write(grams.astype(np.uint64).tobytes())
        return cls(path, start, start + len(grams))

    def __len__(self) -> int:
        return self.stop - self.start

    def read(self, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """The values in [lo, hi) (hi None: up to the top), found by binary search on a short-lived memmap."""
        if not len(self):
            return np.zeros(0, dtype=np.uint64)
        values = np.memmap(self.path, dtype=np.uint64, mode="r", offset=self.start * 8, shape=(len(self),))
        return np.array(in_range(values, lo, hi))


Grams = np.ndarray | SpilledGrams  # sorted distinct uint64 n-gram hashes, in memory or on disk


def in_range(grams: Grams, lo: int, hi: int | None) -> np.ndarray:
    """The values of sorted `grams` in [lo, hi) (hi None: up to the top)."""
    if isinstance(grams, SpilledGrams):
        return grams.read(lo, hi)
    a = np.searchsorted(grams, np.uint64(lo))
    return grams[a : len(grams) if hi is None else np.searchsorted(grams, np.uint64(hi))]


def hash_ranges(n_values: int, per_pass: int | None = None) -> list[tuple[int, int | None]]:
    """[lo, hi) ranges cutting the uint64 hash space into equal parts of ~`per_pass` (default
    GRAMS_PER_PASS) of `n_values` uniformly spread hashes each (the last hi is None: up to the top)."""
    parts = max(1, -(-n_values // max(1, per_pass or GRAMS_PER_PASS)))
    cuts = [k * 2**64 // parts for k in range(parts)]
    return list(zip(cuts, [*cuts[1:], None], strict=True))


def contained_pairs(
    grams: Sequence[Grams], min_share: float, min_grams: int = 10, max_docs: int = 32, per_pass: int | None = None
) -> list[tuple[int, int, float]]:
    """(i, j, share) for documents i whose n-gram set lies at least `min_share` inside
    document j (j != i), from each document's sorted distinct (sampled) n-gram hashes.

    MinHash estimates Jaccard similarity, which is small when a short work sits inside a
    long anthology; containment catches that copy. One sort per hash range over all n-grams in
    it: only n-grams shared by two or more documents are counted, pair by pair.
    """
    if len(grams) < 2:
        return []
    n_docs = len(grams)
    pair_keys, pair_counts = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    for lo, hi in hash_ranges(sum(len(g) for g in grams), per_pass):
        part = [in_range(g, lo, hi) for g in grams]
        ids = np.concatenate([np.full(len(g), i, dtype=np.int64) for i, g in enumerate(part)])
        allg = np.concatenate(part)
        order = np.argsort(allg, kind="stable")
        g, d = allg[order], ids[order]
        starts = np.flatnonzero(np.concatenate(([True], g[1:] != g[:-1])))
        sizes = np.diff(np.append(starts, len(g)))
        keys = [pair_keys]
        # n-grams in very many documents are stock phrases, not copies; they only cost time
        for size in np.unique(sizes[(sizes > 1) & (sizes <= max_docs)]):
            members = d[starts[sizes == size][:, None] + np.arange(size)]  # a row per n-gram: its documents
            left, right = np.nonzero(~np.eye(size, dtype=bool))  # every ordered pair of two of them
            keys.append((members[:, left] * n_docs + members[:, right]).ravel())
        pair_keys, where = np.unique(np.concatenate(keys), return_inverse=True)
        weights = np.concatenate((pair_counts, np.ones(len(where) - len(pair_counts), dtype=np.int64)))
        pair_counts = np.bincount(where, weights=weights, minlength=len(pair_keys)).astype(np.int64)
    out = []
    for key, c in zip(pair_keys.tolist(), pair_counts.tolist(), strict=True):
        i, j = divmod(key, n_docs)
        n = len(grams[i])
        if n >= min_grams and c / n >= min_share:
            out.append((i, j, c / n))
    return sorted(out)


def shared_with(queries: Sequence[Grams], pool: Sequence[Grams], per_pass: int | None = None) -> tuple[list[int], int]:
    """How many of each query's n-grams occur in any document of `pool`, and how many distinct
    n-grams `pool` has, going through the hash space one range at a time."""
    hits, n_pool = [0] * len(queries), 0
    for lo, hi in hash_ranges(sum(len(g) for g in (*queries, *pool)), per_pass):
        ref = [in_range(g, lo, hi) for g in pool]
        union = unique_sorted(np.concatenate(ref)) if ref else np.zeros(0, dtype=np.uint64)
        n_pool += len(union)
        for k, q in enumerate(queries):
            values = in_range(q, lo, hi)
            if len(union) and len(values):
                idx = np.searchsorted(union, values).clip(max=len(union) - 1)
                hits[k] += int(np.count_nonzero(union[idx] == values))
    return hits, n_pool


def overlap_counts(queries: Sequence[Grams], pool: Sequence[Grams], per_pass: int | None = None) -> np.ndarray:
    """counts[k, t]: how many of query k's n-grams document t of `pool` has, going through the
    hash space one range at a time."""
    counts = np.zeros((len(queries), len(pool)), dtype=np.int64)
    for lo, hi in hash_ranges(sum(len(g) for g in (*queries, *pool)), per_pass):
        part = [in_range(g, lo, hi) for g in pool]
        values = np.concatenate(part) if part else np.zeros(0, dtype=np.uint64)
        owner = np.repeat(np.arange(len(part)), [len(p) for p in part])
        order = np.argsort(values, kind="stable")
        values, owner = values[order], owner[order]
        for k, q in enumerate(queries):
            v = in_range(q, lo, hi)
            left, right = np.searchsorted(values, v, "left"), np.searchsorted(values, v, "right")
            n = right - left  # how many pool documents hold each of the query's n-grams
            if n.sum():
                firsts = np.repeat(left - np.cumsum(n) + n, n)  # each match: its run's start, minus matches before
                counts[k] += np.bincount(owner[firsts + np.arange(n.sum())], minlength=len(pool))
    return counts
