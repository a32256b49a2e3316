"""Tokenizer: exact round-trip of any Unicode, special tokens, train-split-only training."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from simone.config import TokenizerConfig
from simone.data.tokenizer import (CHUNK_CHARS, MAX_RUN_CHARS, domain_token, load_tokenizer, split_for_encoding,
                                   train_tokenizer)

WORDS = (
    "the of and to in that is was he for it with as his on be at by had not are but from "
    "light word law number energy motion reason virtue compiler function memory river king "
    "temple spirit atom force proof theorem history empire scholar lesson student reading"
).split()


def make_text(rng: random.Random, n_words: int) -> str:
    lines, line = [], []
    for _ in range(n_words):
        line.append(rng.choice(WORDS))
        if len(line) >= rng.randint(6, 14):
            lines.append(" ".join(line).capitalize() + ".")
            line = []
    lines.append(" ".join(line))
    return "\n".join(lines)


def write_documents(path: Path, docs: list[dict]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            row = {"id": d.get("id", f"doc{i}"), "path": f"{d['domain']}/x/{i}.txt", "domain": d["domain"],
                   "subdomain": "x", "title": f"T{i}", "author": "A", "split": d["split"],
                   "status": "ok", "quality_score": 1.0, "text": d["text"]}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def small_corpus(rng: random.Random, val_extra: str = "") -> list[dict]:
    docs = []
    for domain in ("technical", "philosophical", "biblical_classical"):
        for k in range(4):
            docs.append({"domain": domain, "split": "val" if k == 3 else "train", "text": make_text(rng, 300)})
    docs[3]["text"] += val_extra  # docs[3] is a val document
    return docs


CFG = TokenizerConfig(vocab_size=400, min_frequency=2)
ALIEN = " zqxjvkwpfyb"  # a "word" whose letters appear in no training text


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    docs = small_corpus(random.Random(0), val_extra="\n" + "\n".join([ALIEN.strip() + ALIEN] * 300))
    docs_path = write_documents(root / "documents.jsonl", docs)
    return train_tokenizer(docs_path, root / "tokenizer", CFG), docs_path, root


def random_unicode(rng: random.Random) -> str:
    """Random strings over the awkward parts of Unicode (no lone surrogates: not UTF-8)."""
    ranges = [(0x20, 0x7E), (0x00, 0x1F), (0x80, 0xFF), (0x300, 0x36F), (0x4E00, 0x9FFF),
              (0x1F300, 0x1F6FF), (0x0590, 0x06FF), (0xAC00, 0xD7A3), (0x2000, 0x206F),
              (0xE000, 0xF8FF), (0x10000, 0x10FFFF)]
    pieces = []
    for _ in range(rng.randint(0, 40)):
        r = rng.random()
        if r < 0.1:
            pieces.append(rng.choice(["\r\n", "\n", "  ", " ", "\t", "\u200d", "\ufeff", "e\u0301", "👩‍👩‍👧"]))
        elif r < 0.3:
            pieces.append(rng.choice(WORDS))
        else:
            lo, hi = rng.choice(ranges)
            cp = rng.randint(lo, hi)
            if 0xD800 <= cp <= 0xDFFF:
                cp = 0xFFFD
            pieces.append(chr(cp))
    return "".join(pieces)


def test_round_trip_on_random_unicode(trained):
    tok = trained[0]
    rng = random.Random(1234)
    texts = [random_unicode(rng) for _ in range(1500)]
    texts += ["", " leading space", "  two", "\r\n\r\n", "\x00", "trailing ", "<|endoftext|>",
              "<|domain:technical|> x", "e\u0301\u0301", "中文字符", "🙂" * 5, "\t\x7f\x1b[0m"]
    special_ids = {tok.eod_id} | {tok.domain_token_id(d) for d in tok.domains}
    batch = tok.encode_batch(texts)
    for text, ids_b in zip(texts, batch):
        ids = tok.encode(text)
        assert ids == ids_b
        assert tok.decode(ids) == text, repr(text)
        assert not special_ids & set(ids), f"plain text {text!r} produced a special token"
        assert all(0 <= i < tok.vocab_size for i in ids)


def test_long_text_chunking_matches_whole_encoding(tmp_path):
    rng = random.Random(7)
    # line endings with trailing whitespace: the places where a naive cut would change the
    # pre-tokenization (a chunk-final "\r\n" or " \n" is one piece, mid-text it is two)
    endings = ["\n", " \n", " \n\n", "  \n", "\r\n", "\r\n\r\n", "!\n", "\n\n"]
    text = "".join(make_text(rng, 30) + rng.choice(endings) for _ in range(1500))
    text = "  " + text + "\r\n\r\n \U0001F600"
    docs = write_documents(tmp_path / "d.jsonl", [{"domain": "d", "split": "train", "text": text}])
    tok = train_tokenizer(docs, tmp_path / "tok", CFG)
    assert len(text) > 2 * CHUNK_CHARS
    pieces = split_for_encoding(text, chunk_chars=1000)
    assert len(pieces) > 10 and "".join(pieces) == text
    whole = tok._plain.encode(text, add_special_tokens=False).ids
    assert [i for p in tok.encode_batch(pieces) for i in p] == whole
    assert tok.encode(text) == whole
    assert tok.decode(whole) == text


def test_eod_and_domain_tokens_are_single_special_tokens(trained):
    tok = trained[0]
    assert tok.domains == ["biblical_classical", "philosophical", "technical"]
    assert tok.eod_id == 0
    assert tok.decode([tok.eod_id]) == "<|endoftext|>"
    assert tok.encode("<|endoftext|>", allow_special=True) == [tok.eod_id]
    ids = set()
    for d in tok.domains:
        tid = tok.domain_token_id(d)
        ids.add(tid)
        assert tok.decode([tid]) == domain_token(d)
        assert tok.encode(domain_token(d), allow_special=True) == [tid]
        # as plain text the control string is ordinary characters, never the special id
        assert tid not in tok.encode(domain_token(d))
        assert tok.decode(tok.encode(domain_token(d))) == domain_token(d)
    assert len(ids) == 3 and tok.eod_id not in ids
    mixed = tok.encode("<|domain:technical|>Hello<|endoftext|>", allow_special=True)
    assert mixed[0] == tok.domain_token_id("technical") and mixed[-1] == tok.eod_id
    with pytest.raises(KeyError, match="technical"):
        tok.domain_token_id("nonexistent")


def test_vocab_size_and_load(trained):
    tok, _, root = trained
    assert tok.vocab_size == CFG.vocab_size + 4  # the BPE vocabulary, then the 4 chat tokens
    for p in (root / "tokenizer", root / "tokenizer" / "tokenizer.json"):
        again = load_tokenizer(p)
        assert again.vocab_size == tok.vocab_size and again.eod_id == tok.eod_id
        assert again.domains == tok.domains and again.sha256 == tok.sha256
        assert again.encode("the law of motion") == tok.encode("the law of motion")
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        load_tokenizer(root / "missing")


def test_trained_on_train_split_only(tmp_path, trained):
    tok, _, _ = trained
    # ALIEN repeats 600 times in a val document: had it been trained on, it would be one token
    assert len(tok.encode(ALIEN)) > 3
    docs = small_corpus(random.Random(0), val_extra="\n" + "\n".join([ALIEN.strip() + ALIEN] * 300))
    docs[3]["split"] = "train"  # the same document, now in training
    control = train_tokenizer(write_documents(tmp_path / "d.jsonl", docs), tmp_path / "t", CFG)
    assert len(control.encode(ALIEN)) <= 2


def test_retraining_skipped_when_unchanged(tmp_path):
    docs_path = write_documents(tmp_path / "documents.jsonl", small_corpus(random.Random(3)))
    out = tmp_path / "tokenizer"
    first = train_tokenizer(docs_path, out, CFG)
    mtime = (out / "tokenizer.json").stat().st_mtime_ns
    again = train_tokenizer(docs_path, out, CFG)
    assert (out / "tokenizer.json").stat().st_mtime_ns == mtime
    assert again.sha256 == first.sha256
    # a config change retrains
    bigger = train_tokenizer(docs_path, out, TokenizerConfig(vocab_size=420, min_frequency=2))
    assert bigger.vocab_size == 420 + 4 and (out / "tokenizer.json").stat().st_mtime_ns != mtime  # + the chat tokens
    # explicit domain list: those and only those get control tokens
    only = train_tokenizer(docs_path, tmp_path / "t2", CFG, domains=["technical", "extra"])
    assert only.domains == ["extra", "technical"]


def test_training_is_deterministic(tmp_path):
    docs_path = write_documents(tmp_path / "documents.jsonl", small_corpus(random.Random(5)))
    a = train_tokenizer(docs_path, tmp_path / "a", CFG)
    b = train_tokenizer(docs_path, tmp_path / "b", CFG)
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    assert a.sha256 == b.sha256


def test_no_training_documents_is_an_error(tmp_path):
    docs_path = write_documents(tmp_path / "documents.jsonl", [{"domain": "d", "split": "val", "text": "only val"}])
    with pytest.raises(ValueError, match="documents.jsonl: no documents with split 'train'"):
        train_tokenizer(docs_path, tmp_path / "tok", CFG)


@pytest.mark.timeout(30)
def test_a_long_run_of_spaces_trains_fast_and_round_trips(tmp_path):
    """3 MB of spaces inside a line was one pre-token, and BPE training time grows with the
    square of a pre-token's length: the run is now cut into pieces of MAX_RUN_CHARS."""
    text = make_text(random.Random(2), 3000) + " " * 3_000_000 + "end " + "x" * 10_000
    docs = write_documents(tmp_path / "d.jsonl", [{"domain": "d", "split": "train", "text": text}])
    tok = train_tokenizer(docs, tmp_path / "tok", CFG)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert max(len(tok.decode([i])) for i in set(ids)) <= MAX_RUN_CHARS
    assert len(ids) < len(text) // 10  # the spaces still merge into long tokens


def test_the_run_cut_leaves_ordinary_text_as_plain_byte_level_bpe_has_it(trained, tmp_path):
    """Text without runs of MAX_RUN_CHARS characters is split as GPT-2's byte-level
    pre-tokenizer alone splits it: the same merges give it the same ids."""
    import tokenizers
    from tokenizers import pre_tokenizers

    tok, docs_path, _ = trained
    saved = json.loads(tok.path.read_text(encoding="utf-8"))
    assert saved["pre_tokenizer"]["type"] == "Sequence"  # the cut lives in tokenizer.json
    saved["pre_tokenizer"] = json.loads(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True).__getstate__())
    plain = tokenizers.Tokenizer.from_str(json.dumps(saved))
    text = make_text(random.Random(4), 2000) + "\n" + " " * (MAX_RUN_CHARS - 1) + "-" * (MAX_RUN_CHARS - 1)
    assert plain.encode(text, add_special_tokens=False).ids == tok.encode(text)
