"""Token shards: documents decode back exactly, deterministic bytes, dtype choice, domain ranges."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import tokenizers

from simone.config import TokenizerConfig
from simone.data.shards import TokenShard, build_shards, token_dtype
from simone.data.tokenizer import Tokenizer, train_tokenizer

WORDS = "the of and light law energy proof temple king river spirit motion reason 1611 σοφία 中文 🙂".split()
DOMAINS = ("technical", "philosophical", "biblical_classical", "historical_scientific")


def write_documents(path: Path, docs: list[dict]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            row = {"id": d.get("id", f"doc{i}"), "path": f"{d['domain']}/x/{i}.txt", "domain": d["domain"],
                   "subdomain": "x", "title": f"T{i}", "author": "A", "split": d["split"],
                   "status": "ok", "quality_score": 1.0, "text": d["text"]}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def corpus(seed: int = 0) -> list[dict]:
    """Documents of four domains, interleaved in the file, two val docs per domain."""
    rng = random.Random(seed)
    docs = []
    for k in range(5):
        for domain in DOMAINS:
            n = rng.randint(20, 200)
            text = " ".join(rng.choice(WORDS) for _ in range(n))
            text = text.replace(" the ", "\nthe ", 3) + rng.choice(["", "\r\n", "  ", " <|endoftext|> x"])
            docs.append({"id": f"{domain}-{k}", "domain": domain, "split": "val" if k in (1, 3) else "train",
                         "text": text})
    return docs


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    docs = corpus()
    docs_path = write_documents(root / "documents.jsonl", docs)
    tok = train_tokenizer(docs_path, root / "tokenizer", TokenizerConfig(vocab_size=320, min_frequency=2))
    index = build_shards(docs_path, tok, root / "data")
    return tok, docs, docs_path, index, root


def test_every_document_decodes_back(built):
    tok, docs, _, index, root = built
    by_id = {d["id"]: d for d in docs}
    seen = []
    for split in ("train", "val"):
        shard = TokenShard(root / "data", split)
        assert shard.n_tokens == index["splits"][split]["n_tokens"] == len(shard.tokens)
        for doc_id, domain, start, end, n_bytes in shard.docs:
            doc = by_id[doc_id]
            assert doc["split"] == split and doc["domain"] == domain
            assert tok.decode(shard.tokens[start:end].tolist()) == doc["text"]
            assert int(shard.tokens[end]) == tok.eod_id
            assert n_bytes == len(doc["text"].encode("utf-8"))
            seen.append(doc_id)
        # eod appears exactly once per document: literal "<|endoftext|>" in text stays text
        assert int((np.asarray(shard.tokens) == tok.eod_id).sum()) == len(shard.docs)
        assert shard.n_bytes == sum(len(by_id[d[0]]["text"].encode()) for d in shard.docs)
        assert shard.bytes_per_token() == pytest.approx(shard.n_bytes / shard.n_tokens)
    assert sorted(seen) == sorted(by_id)


def test_domains_are_contiguous_ranges(built):
    _, docs, _, _, root = built
    for split in ("train", "val"):
        shard = TokenShard(root / "data", split)
        assert shard.domains == sorted(DOMAINS)
        cursor = 0
        for domain in shard.domains:
            start, end = shard.domain_range(domain)
            info = shard.info["domains"][domain]
            assert start == cursor and info["ranges"] == [[start, end]]
            assert info["n_tokens"] == end - start
            mine = [d for d in shard.docs if d[1] == domain]
            assert info["n_docs"] == len(mine) == sum(1 for d in docs if d["domain"] == domain and d["split"] == split)
            # the domain's documents tile its range exactly: doc, eod, doc, eod, ...
            pos = start
            for _, _, s, e, _ in mine:
                assert s == pos
                pos = e + 1
            assert pos == end
            assert info["n_bytes"] == sum(d[4] for d in mine)
            assert shard.bytes_per_token(domain) == pytest.approx(info["n_bytes"] / info["n_tokens"])
            cursor = end
        assert cursor == shard.n_tokens
        with pytest.raises(KeyError, match="nope"):
            shard.domain_range("nope")


def test_build_is_deterministic_and_skipped_when_unchanged(built, tmp_path):
    tok, docs, docs_path, index, root = built
    again = build_shards(docs_path, tok, tmp_path / "data")
    assert again == index
    for name in ("train.bin", "val.bin", "index.json"):
        assert (tmp_path / "data" / name).read_bytes() == (root / "data" / name).read_bytes()
    mtime = (tmp_path / "data" / "train.bin").stat().st_mtime_ns
    assert build_shards(docs_path, tok, tmp_path / "data") == index
    assert (tmp_path / "data" / "train.bin").stat().st_mtime_ns == mtime
    assert not (tmp_path / "data" / ".shards-tmp").exists()
    # changed documents: rebuilt
    changed = write_documents(tmp_path / "changed.jsonl", docs[:-1])
    smaller = build_shards(changed, tok, tmp_path / "data")
    assert sum(s["n_docs"] for s in smaller["splits"].values()) == len(docs) - 1


def test_memmap_is_read_only_and_dtype_uint16(built):
    tok, _, _, index, root = built
    assert index["dtype"] == "uint16" and index["vocab_size"] == tok.vocab_size
    assert index["tokenizer_sha256"] == tok.sha256
    shard = TokenShard(root / "data", "train")
    assert shard.tokens.dtype == np.uint16
    with pytest.raises((ValueError, TypeError)):
        shard.tokens[0] = 1


def test_token_dtype_choice():
    assert token_dtype(512) == np.uint16
    assert token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32
    assert token_dtype(100_000) == np.uint32


def test_large_vocabulary_is_stored_as_uint32(built, tmp_path):
    tok, _, _, _, root = built
    hf = tokenizers.Tokenizer.from_file(str(root / "tokenizer" / "tokenizer.json"))
    hf.add_tokens([f"qq{i}qq" for i in range(66_000)] + ["Zanzibarian"])
    big = Tokenizer(hf, "<|endoftext|>")
    assert big.vocab_size > 65536
    docs = [{"id": "a", "domain": "d", "split": "train", "text": "the Zanzibarian law"},
            {"id": "b", "domain": "d", "split": "val", "text": "light Zanzibarian"}]
    index = build_shards(write_documents(tmp_path / "docs.jsonl", docs), big, tmp_path / "data")
    assert index["dtype"] == "uint32"
    for split, doc in (("train", docs[0]), ("val", docs[1])):
        shard = TokenShard(tmp_path / "data", split)
        assert shard.tokens.dtype == np.uint32 and int(shard.tokens.max()) > 65535
        _, _, s, e, _ = shard.docs[0]
        assert big.decode(shard.tokens[s:e].tolist()) == doc["text"]


def test_errors_name_the_file(tmp_path, built):
    tok = built[0]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x", "domain": "d", "split": "test", "text": "hi"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        build_shards(bad, tok, tmp_path / "data")
    with pytest.raises(FileNotFoundError, match="index.json"):
        TokenShard(tmp_path / "nothing", "train")
