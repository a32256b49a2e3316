"""MinHash near-duplicates, in-document repeats and the deterministic split."""

from __future__ import annotations

import numpy as np
from datasketch import MinHash

from simone.data.dedup import (
    DupCandidate,
    WordHasher,
    jaccard_estimate,
    minhash_permutations,
    minhash_signature,
    near_duplicates,
    ngram_hashes,
    repeated_passages,
    tokenize,
    word_hashes,
)
from simone.data.split import assign_splits
from tests.curate_helpers import prose


def _sig(text: str, perms, hasher=None):
    hasher = hasher or WordHasher()
    return minhash_signature(ngram_hashes(word_hashes(tokenize(text), hasher), 5), perms)


def test_signature_matches_datasketch_reference():
    perms = minhash_permutations(64)
    shingles = ngram_hashes(word_hashes(tokenize(prose(1, 400)), WordHasher()), 5)
    ours = minhash_signature(shingles, perms)
    ref = MinHash(num_perm=64, seed=1, scheme="affine32", hashfunc=lambda v: v)
    ref.update_batch([int(v) for v in (np.unique(shingles) >> np.uint64(32))])
    assert np.array_equal(ours, ref.hashvalues)


def test_lightly_edited_copy_is_near_duplicate_and_unrelated_text_is_not():
    perms = minhash_permutations(112)
    original = prose(7, 3000)
    words = original.split(" ")
    for i in range(50, len(words), 150):  # ~0.7% of the words changed
        words[i] = "lighthouse"
    edited = " ".join(words)
    unrelated = prose(8, 3000)
    s_orig, s_edit, s_other = (_sig(t, perms) for t in (original, edited, unrelated))
    assert jaccard_estimate(s_orig, s_edit) > 0.8
    assert jaccard_estimate(s_orig, s_other) < 0.2
    dropped = near_duplicates(
        [DupCandidate("orig", s_orig, (0,)), DupCandidate("edit", s_edit, (1,)), DupCandidate("other", s_other, (2,))],
        threshold=0.8, num_perm=112)
    assert set(dropped) == {"edit"} and dropped["edit"][0] == "orig"


def test_word_hashes_are_stable_across_hashers_and_ignore_case_and_punctuation():
    a = word_hashes(tokenize("The Lord, the LORD!"), WordHasher())
    b = word_hashes(tokenize("the lord the lord"), WordHasher())
    assert np.array_equal(a, b) and a[0] == a[2]


def test_repeated_passages_finds_a_long_repeat():
    h = WordHasher()
    passage = prose(3, 500)
    doc = prose(1, 800) + "\n\n" + passage + "\n\n" + prose(2, 800) + "\n\n" + passage
    longest, share = repeated_passages(ngram_hashes(word_hashes(tokenize(doc), h), 13), 13)
    n_passage = len(tokenize(passage))
    assert n_passage - 5 <= longest <= n_passage + 5
    assert 0.3 < share < 0.5
    assert repeated_passages(ngram_hashes(word_hashes(tokenize(prose(4, 2000)), h), 13), 13)[0] < 30


def test_split_is_deterministic_per_domain_and_keeps_singletons_in_train():
    docs = [(f"a/x/{i}.txt", "a") for i in range(40)] + [(f"b/y/{i}.txt", "b") for i in range(3)] + [("c/z/0.txt", "c")]
    s1 = assign_splits(docs, 0.1, 1234, 1)
    s2 = assign_splits(list(reversed(docs)), 0.1, 1234, 1)
    assert s1 == s2
    assert sum(1 for d, dom in docs if dom == "a" and s1[d] == "val") == 4
    assert sum(1 for d, dom in docs if dom == "b" and s1[d] == "val") == 1  # min_val_docs_per_domain
    assert s1["c/z/0.txt"] == "train"
    s3 = assign_splits(docs, 0.1, 99, 1)
    assert s3 != s1  # the seed matters
    # adding a document does not move the others (hash of id, not position)
    s4 = assign_splits(docs + [("a/x/new.txt", "a")], 0.1, 1234, 1)
    moved = [d for d, _ in docs if d.startswith("b/") and s4[d] != s1[d]]
    assert not moved


def test_containment_finds_an_excerpt_that_jaccard_misses():
    from simone.data.dedup import contained_pairs, sample_grams

    h = WordHasher()
    long_book = prose(20, 8000)
    excerpt = long_book[len(long_book) // 2: len(long_book) // 2 + 6000]
    other = prose(21, 3000)
    grams = [sample_grams(ngram_hashes(word_hashes(tokenize(t), h), 13), 4) for t in (long_book, excerpt, other)]
    perms = minhash_permutations(112)
    assert jaccard_estimate(_sig(long_book, perms), _sig(excerpt, perms)) < 0.5
    pairs = contained_pairs(grams, 0.8)
    assert [(i, j) for i, j, _ in pairs] == [(1, 0)]


def test_flagged_documents_validate_only_when_a_domain_has_too_few_clean_ones():
    docs = [(f"a/{i}.txt", "a") for i in range(20)] + [("b/0.txt", "b"), ("b/1.txt", "b")]
    avoid = {f"a/{i}.txt" for i in range(10)} | {"b/0.txt", "b/1.txt"}
    s = assign_splits(docs, 0.1, 1234, 1, avoid_val=avoid)
    val_a = [d for d, dom in docs if dom == "a" and s[d] == "val"]
    assert len(val_a) == 2 and not set(val_a) & avoid
    assert sorted(s[d] for d in ("b/0.txt", "b/1.txt")) == ["train", "val"]  # no clean one: still one val
