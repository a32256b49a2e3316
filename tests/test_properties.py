"""Properties that must hold for any input, checked on inputs that hypothesis generates:
the tokenizer gives back every text exactly, curation gives every input file one manifest
line, and the token shards hold every document's tokens.

Each property runs a few dozen small examples (a few seconds); `database=None`: no failing
examples are stored between runs, so every run is judged on its own."""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simone.config import TokenizerConfig, preset
from simone.data.curate import curate
from simone.data.shards import build_shards
from simone.data.status import file_status
from simone.data.tokenizer import CHUNK_CHARS, MAX_RUN_CHARS, train_tokenizer
from tests.curate_helpers import book, meta, prose, read_jsonl, write_doc
from tests.test_tokenizer import make_text, write_documents

PROPERTY = settings(max_examples=40, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DOMAINS = ("a", "b", "c")

# any Unicode scalar value: surrogates are not characters and cannot be written as UTF-8
unicode_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=200)
whitespace_run = st.builds(lambda ch, n: ch * n, st.sampled_from([" ", "\t", "\n", "\r\n", "\u00a0", "\u3000"]),
                           st.integers(1, 3 * MAX_RUN_CHARS))
# arbitrary text with runs of whitespace longer than a pre-token may hold, sometimes long
# enough (repeated) that encoding cuts it into chunks
texts = st.builds(lambda parts, times: "".join(parts) * times,
                  st.lists(st.one_of(unicode_text, whitespace_run), max_size=8),
                  st.sampled_from([1, 1, 1, 2 * CHUNK_CHARS // 1000]))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("property_tokenizer")
    rng = random.Random(0)
    docs = [{"domain": d, "split": "train", "text": make_text(rng, 300) + " " * 1000 + make_text(rng, 50)}
            for d in DOMAINS for _ in range(2)]
    return train_tokenizer(write_documents(root / "documents.jsonl", docs), root / "tokenizer",
                           TokenizerConfig(vocab_size=400, min_frequency=2))


@PROPERTY
@given(text=texts)
def test_any_text_comes_back_exactly_from_its_tokens(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.eod_id not in ids and all(0 <= i < tokenizer.vocab_size for i in ids)


# ----------------------------------------------------------------------------- curation

# what a corpus file may be: (name of the kind, its bytes from a seed)
FILE_KINDS = {
    "prose": lambda seed, anchor: prose(seed, 80 + seed % 400).encode(),
    "book": lambda seed, anchor: book(f"Tale {seed}", "Ann Oak", seed).encode(),
    "short": lambda seed, anchor: b"a few words only",
    "empty": lambda seed, anchor: b"",
    "whitespace": lambda seed, anchor: b" \n\t " * (seed % 50),
    "spaces_inside": lambda seed, anchor: (prose(seed, 200) + " " * 5000 + "end").encode(),
    "binary": lambda seed, anchor: bytes(random.Random(seed).randrange(256) for _ in range(300)),
    "not_utf8": lambda seed, anchor: prose(seed, 120).encode() + b" caf\xe9 " + prose(seed + 1, 40).encode(),
    "utf16": lambda seed, anchor: prose(seed, 120).encode("utf-16"),
    "duplicate": lambda seed, anchor: anchor,
}
SIDECARS = (None, "meta", "bad_json", "only_sidecar")
corpus_files = st.lists(st.tuples(st.sampled_from(sorted(FILE_KINDS)), st.sampled_from(SIDECARS),
                                  st.integers(0, 10_000), st.sampled_from(["x", "y"])), max_size=8)
unicode_files = st.lists(unicode_text, max_size=3)


@settings(PROPERTY, max_examples=12)
@given(files=corpus_files, unicode=unicode_files)
def test_curation_gives_every_input_file_exactly_one_manifest_line(tmp_path_factory, files, unicode):
    base = Path(tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp()))
    root = base / "corpus"
    anchor = book("The Anchor", "Bea Elm", 1).encode()
    inputs = []
    for i in range(2):  # two real books: every domain has text to validate on
        inputs.append(str(write_doc(root, f"d/x/anchor{i}.txt", book(f"Anchor {i}", "Bea Elm", 1 + i),
                                    meta(f"Anchor {i}", "Bea Elm", "d", "x")).relative_to(root)))
    for i, (kind, sidecar, seed, sub) in enumerate(files):
        rel = f"d/{sub}/{kind}{i}.txt"
        if sidecar == "only_sidecar":  # a sidecar whose text is missing
            write_doc(root, rel, b"").unlink()
            (root / rel).with_suffix(".json").write_text(json.dumps(meta("Lost", "Nobody", "d", sub)))
            inputs.append(rel[: -len(".txt")] + ".json")
            continue
        write_doc(root, rel, FILE_KINDS[kind](seed, anchor), meta(f"{kind} {seed}", "Ann Oak", "d", sub)
                  if sidecar == "meta" else None, "{not json" if sidecar == "bad_json" else None)
        inputs.append(rel)
    for i, text in enumerate(unicode):
        inputs.append(str(write_doc(root, f"d/x/unicode{i}.txt", text).relative_to(root)))

    cfg = preset("tiny")
    cfg.curate.workers = 1
    result = curate(root, base / "data", cfg, progress=False)

    lines = read_jsonl(base / "data" / "manifest.jsonl")
    assert sorted(line["path"] for line in lines) == sorted(inputs)
    assert result.files == len(inputs)
    for line in lines:
        assert line["status"] == file_status(line["reasons"]), line
        assert all(line["notes"].get(code) for code in line["reasons"]
                   if code not in ("header_stripped",)), line  # every problem says why
    trained = {d["path"] for d in read_jsonl(base / "data" / "documents.jsonl")}
    assert trained == {line["path"] for line in lines if line["split"] is not None}
    assert not any(line["status"] == "quarantined" for line in lines if line["path"] in trained)


# ----------------------------------------------------------------------------- shards

documents = st.lists(st.fixed_dictionaries({"domain": st.sampled_from(DOMAINS),
                                            "split": st.sampled_from(["train", "val"]),
                                            "text": st.one_of(texts, st.just(""))}), max_size=10)


@PROPERTY
@given(docs=documents, control_token_prob=st.sampled_from([0.0, 0.5, 1.0]))
def test_the_shards_hold_every_documents_tokens_and_nothing_else(tokenizer, tmp_path_factory, docs, control_token_prob):
    base = Path(tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp()))
    for i, doc in enumerate(docs):
        doc["id"] = f"doc{i}"
    write_documents(base / "documents.jsonl", docs)
    index = build_shards(base / "documents.jsonl", tokenizer, base, control_token_prob)

    for split in ("train", "val"):
        info = index["splits"][split]
        tokens = np.fromfile(base / info["file"], dtype=index["dtype"])
        assert len(tokens) == info["n_tokens"]
        expected = {d["id"]: d for d in docs if d["split"] == split and d["text"]}
        assert sorted(entry[0] for entry in info["docs"]) == sorted(expected)  # each document once
        controlled = set(info["control_docs"])
        assert split == "train" or not controlled
        at = 0  # the documents, each with its control token and eod, tile the split
        for doc_id, domain, start, end, n_bytes in sorted(info["docs"], key=lambda e: e[2]):
            doc = expected[doc_id]
            if doc_id in controlled:
                assert tokens[start - 1] == tokenizer.domain_token_id(domain)
                at += 1
            assert start == at and domain == doc["domain"]
            assert tokenizer.decode(tokens[start:end].tolist()) == doc["text"]
            assert tokens[end] == tokenizer.eod_id and n_bytes == len(doc["text"].encode("utf-8"))
            at = end + 1
        assert at == info["n_tokens"]
        for domain, d in info["domains"].items():  # each domain one range holding its documents
            assert d["ranges"] == [[d["start"], d["end"]]]
            assert all(d["start"] <= e[2] <= e[3] < d["end"] for e in info["docs"] if e[1] == domain)
        assert sum(d["n_tokens"] for d in info["domains"].values()) == info["n_tokens"]
