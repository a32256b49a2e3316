"""`simone prepare --workers N`: the same shards at any N, duplicates found across workers, and
curation memory that does not grow with the corpus."""

from __future__ import annotations

import json
import random
import tracemalloc
from pathlib import Path

import pytest

from simone.cli import main
from simone.config import TokenizerConfig, preset
from simone.data import dedup
from simone.data.curate import curate
from simone.data.shards import build_shards, documents_slices
from simone.data.tokenizer import train_tokenizer
from tests.curate_helpers import book, meta, prose, read_jsonl, write_doc

WORDS = "the of and light law energy proof temple king river spirit motion reason σοφία 🙂".split()


def _documents(path: Path, n: int = 60) -> Path:
    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            row = {
                "id": f"d{i}",
                "domain": ("alpha", "beta", "gamma")[i % 3],
                "split": "val" if i % 5 == 0 else "train",
            }
            row["text"] = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 120)))
            if i == 7:
                row["slice"] = [0, len(row["text"])]
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def test_shards_are_byte_identical_at_one_and_two_workers(tmp_path):
    docs = _documents(tmp_path / "documents.jsonl")
    tok = train_tokenizer(docs, tmp_path / "tokenizer", TokenizerConfig(vocab_size=300, min_frequency=2))
    assert len(documents_slices(docs, 2000)) > 4  # several tasks for the workers
    built = []
    for name, workers, chunk_bytes in (("whole", 1, 1 << 30), ("one", 1, 2000), ("two", 2, 2000)):
        index = build_shards(docs, tok, tmp_path / name, 0.5, 3, workers=workers, chunk_bytes=chunk_bytes)
        files = [(tmp_path / name / f).read_bytes() for f in ("train.bin", "val.bin", "index.json")]
        built.append((index, files))
    assert built[0] == built[1] == built[2]
    index = built[0][0]
    assert index["splits"]["train"]["control_docs"] and index["splits"]["train"]["slices"] == ["d7"]
    assert sum(s["n_docs"] for s in index["splits"].values()) == 60


def test_a_bad_line_is_named_by_its_line_in_the_whole_file(tmp_path):
    docs = _documents(tmp_path / "documents.jsonl")
    tok = train_tokenizer(docs, tmp_path / "tokenizer", TokenizerConfig(vocab_size=300, min_frequency=2))
    lines = docs.read_text(encoding="utf-8").splitlines(keepends=True)
    lines[44] = "{not json\n"
    docs.write_text("".join(lines), encoding="utf-8")
    with pytest.raises(ValueError, match=r"documents.jsonl:45: not valid JSON"):
        build_shards(docs, tok, tmp_path / "data", workers=2, chunk_bytes=2000)


def _dup_corpus(root: Path) -> Path:
    for i, domain in enumerate(("poetry", "history", "letters", "sermons")):
        for j in range(3):
            title = f"Book {domain} {j}"
            write_doc(
                root,
                f"{domain}/sub/{j}.txt",
                book(title, "A. Writer", 10 * i + j),
                meta(title, "A. Writer", domain, "sub"),
            )
    original = (root / "poetry/sub/0.txt").read_text(encoding="utf-8")
    write_doc(root, "sermons/copy/exact.txt", original)  # another folder, so most likely another worker
    edited = original.replace(" the ", " a ", 3)
    write_doc(root, "letters/copy/edited.txt", edited)
    excerpt = "\n\n".join(prose(31, 4000).split("\n\n")[5:25])
    write_doc(root, "history/anthology/all.txt", "COLLECTED\n\n" + prose(31, 4000))
    write_doc(root, "letters/copy/excerpt.txt", "AN EXCERPT\n\n" + excerpt)
    return root


def test_duplicates_are_found_across_workers(tmp_path):
    corpus = _dup_corpus(tmp_path / "corpus")
    manifests = []
    for workers in (1, 2):
        cfg = preset("tiny")
        cfg.curate.workers = workers
        curate(corpus, tmp_path / f"out{workers}", cfg, progress=False)
        manifests.append(read_jsonl(tmp_path / f"out{workers}" / "manifest.jsonl"))
    assert manifests[0] == manifests[1]
    reasons = {r["path"]: r["reasons"] for r in manifests[1]}
    assert "exact_duplicate" in reasons["sermons/copy/exact.txt"] or "exact_duplicate" in reasons["poetry/sub/0.txt"]
    assert "near_duplicate" in reasons["letters/copy/edited.txt"]
    assert "near_duplicate" in reasons["letters/copy/excerpt.txt"]  # contained in the anthology


def _book_corpus(root: Path, n: int) -> Path:
    for i in range(n):
        write_doc(root, f"prose/sub/{i}.txt", f"BOOK {i}\n\n{prose(100 + i, 24_000)}\n")
    return root


def test_curation_memory_does_not_grow_with_the_corpus(tmp_path, monkeypatch):
    """The n-grams deduplication compares wait on disk and are compared a hash range at a time:
    4x the books, about the same peak."""
    monkeypatch.setattr(dedup, "GRAMS_PER_PASS", 20_000)  # the 8 books' n-grams (~48,000) take 3 passes
    cfg = preset("tiny")
    cfg.curate.workers = 1  # in this process, where tracemalloc sees it
    peaks = []
    for n in (2, 8, 32):  # the first run pays for the imports
        corpus = _book_corpus(tmp_path / f"c{n}", n)
        tracemalloc.start()
        curate(corpus, tmp_path / f"out{n}", cfg, progress=False)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[2] < 1.25 * peaks[1], [f"{p / 1e6:.2f} MB" for p in peaks]


def test_prepare_takes_workers(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RAYON_NUM_THREADS", "2")  # --workers sets it only where unset: keep this process's
    corpus = _book_corpus(tmp_path / "corpus", 3)
    run = tmp_path / "run"
    args = ["prepare", "--preset", "tiny", "--data", str(corpus), "--run-dir", str(run), "--workers", "2"]
    assert main(args) == 0
    assert json.loads((run / "config.json").read_text())["curate"]["workers"] == 2
    assert (run / "data" / "index.json").is_file()
    assert main(["prepare", "--workers", "0", "--run-dir", str(run)]) == 2
    assert "--workers 0" in capsys.readouterr().err
