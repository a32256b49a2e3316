"""A corpus of a few books still validates: a domain with one document holds out a slice.

The slice is the tail of the document, cut at a paragraph break; it is recorded in the split
(documents.jsonl, manifest.jsonl), shown in the curation and validation reports, and never
trained on (neither by the tokenizer nor by the model). A domain too short to spare a slice
stops `simone prepare` with one line saying how much text it needs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from simone.cli import main
from simone.config import preset
from simone.data.curate import curate
from simone.data.split import hold_out_slice
from tests.curate_helpers import book, meta, prose, read_jsonl, write_doc


def _cfg():
    cfg = preset("tiny")
    cfg.curate.workers = 1
    return cfg


# ----------------------------------------------------------------------------- the cut


def test_slice_is_the_tail_cut_at_a_blank_line_with_a_floor():
    text = prose(1, 3000)
    cut = hold_out_slice(text, 0.1, 200)
    n = len(text.split())
    assert text[cut.start - 2:cut.start] == "\n\n"  # a paragraph break
    assert cut.words == len(text[cut.start:].split()) and cut.train_words + cut.words == n
    assert 0.1 * n <= cut.words <= 0.2 * n  # its share, not more than doubled by the paragraph
    small = prose(2, 600)
    assert hold_out_slice(small, 0.1, 200).words >= 200  # the floor beats the fraction
    # one paragraph, no line breaks: cut between words, exactly at the share
    flat = " ".join(prose(3, 2000).split())
    flat_cut = hold_out_slice(flat, 0.1, 50)
    assert flat_cut.words == -(-len(flat.split()) // 10) and flat[flat_cut.start - 1] == " "
    # too short to leave the floor to both sides
    assert hold_out_slice("word " * 399, 0.1, 200) is None
    assert hold_out_slice("word " * 400, 0.1, 200) is not None


def test_single_document_domain_is_split_into_train_and_val_parts(tmp_path):
    root = tmp_path / "corpus"
    write_doc(root, "solo/one/book.txt", book("Lone Harbor", "Ada Winter", 1, 3000), meta("Lone Harbor", "Ada Winter", "solo", "one"))
    for i in range(4):
        write_doc(root, f"many/sub/{i}.txt", book(f"Tale {i}", "Ed Orr", 10 + i), meta(f"Tale {i}", "Ed Orr", "many", "sub"))
    res = curate(root, tmp_path / "data", _cfg(), progress=False)
    docs = read_jsonl(tmp_path / "data" / "documents.jsonl")
    parts = {d["id"]: d for d in docs if d["path"] == "solo/one/book.txt"}
    assert set(parts) == {"solo/one/book.txt#train", "solo/one/book.txt#val"}
    train, val = parts["solo/one/book.txt#train"], parts["solo/one/book.txt#val"]
    assert (train["split"], val["split"]) == ("train", "val")
    assert train["slice"][0] == 0 and train["slice"][1] == val["slice"][0]
    assert val["text"] and val["text"] not in train["text"]
    manifest = {r["path"]: r for r in read_jsonl(tmp_path / "data" / "manifest.jsonl")}
    solo = manifest["solo/one/book.txt"]
    assert solo["split"] == "train+val-slice" and solo["holdout"]["start_char"] == val["slice"][0]
    assert solo["holdout"]["words"] == len(val["text"].split()) >= 200
    # the domain with several documents splits by document, as before: no slice
    assert all("slice" not in d for d in docs if d["domain"] == "many")
    assert res.domains["solo"]["val"]["slices"] == 1 and res.domains["solo"]["val"]["docs"] == 0
    assert res.domains["many"]["val"]["slices"] == 0 and res.domains["many"]["val"]["docs"] >= 1
    assert res.domains["solo"]["train"]["words"] + res.domains["solo"]["val"]["words"] == solo["words"]
    html = (tmp_path / "data" / "report.html").read_text(encoding="utf-8")
    assert "val slices" in html and "train+val-slice" in html
    # reproducible: the same corpus and settings cut at the same place
    curate(root, tmp_path / "again", _cfg(), progress=False)
    assert (tmp_path / "again" / "documents.jsonl").read_bytes() == (tmp_path / "data" / "documents.jsonl").read_bytes()


# ----------------------------------------------------------------------------- too small


def test_a_corpus_too_small_to_hold_out_fails_at_prepare_with_one_line(tmp_path, capsys):
    root = tmp_path / "corpus"
    write_doc(root, "big/a/0.txt", book("Tale A", "Ed Orr", 1, 2000), meta("Tale A", "Ed Orr", "big", "a"))
    write_doc(root, "tiny/a/0.txt", book("Short Tale", "Ed Orr", 2, 300), meta("Short Tale", "Ed Orr", "tiny", "a"))
    run_dir = tmp_path / "run"
    rc = main(["prepare", "--data", str(root), "--preset", "tiny", "--run-dir", str(run_dir), "--set", "curate.workers=1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "Traceback" not in err
    assert "in domain 'tiny'" in err and "need at least 400 to hold out validation" in err
    # it stopped in curation: no tokenizer, no shards
    assert not (run_dir / "tokenizer" / "tokenizer.json").exists() and not (run_dir / "data" / "train.bin").exists()
    # a lower floor lets the same corpus through
    assert main(["prepare", "--data", str(root), "--preset", "tiny", "--run-dir", str(tmp_path / "run2"),
                 "--set", "curate.workers=1", "--set", "data.min_val_words=50"]) == 0


# ----------------------------------------------------------------------------- the whole run


def _run(corpus: Path, tmp_path: Path, capsys) -> tuple[Path, dict]:
    """`simone run --preset tiny` on `corpus`, briefly; returns the run dir and its validation report."""
    run_dir = tmp_path / "run"
    rc = main(["run", "--data", str(corpus), "--preset", "tiny", "--run-dir", str(run_dir), "--max-steps", "40",
               "--package-dir", str(tmp_path / "pkgs"), "--set", "train.eval_every=20", "--set", "curate.workers=1",
               "--set", "train.num_epochs=50", "--set", "train.min_epochs=50"])
    out = capsys.readouterr().out
    assert rc == 0, out
    report = json.loads((run_dir / "validation" / "report.json").read_text())
    assert report["ok"], report["failed"]
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    assert any(e.get("kind") == "eval" for e in evals)  # training evaluated along the way
    return run_dir, report


def _contains(haystack: np.ndarray, needle: list[int]) -> bool:
    if len(needle) > len(haystack):
        return False
    windows = np.lib.stride_tricks.sliding_window_view(haystack, len(needle))
    return bool((windows == np.asarray(needle, dtype=haystack.dtype)).all(axis=1).any())


def _assert_slices_never_trained_on(run_dir: Path) -> list[str]:
    """Every held-out slice is in val.bin, none of it in train.bin or the tokenizer's training
    text; returns the sliced domains."""
    from simone.data.tokenizer import _train_texts, load_tokenizer

    docs = read_jsonl(run_dir / "data" / "documents.jsonl")
    slices = [d for d in docs if d["split"] == "val" and "slice" in d]
    assert slices
    tok = load_tokenizer(run_dir / "tokenizer" / "tokenizer.json")
    train = np.fromfile(run_dir / "data" / "train.bin", dtype=np.uint16)
    val = np.fromfile(run_dir / "data" / "val.bin", dtype=np.uint16)
    tokenizer_text = "".join(_train_texts(run_dir / "data" / "documents.jsonl"))
    for s in slices:
        ids = tok.encode(s["text"])
        for at in (0, len(ids) // 2, len(ids) - 24):
            assert _contains(val, ids[at + 1:at + 24])
            assert not _contains(train, ids[at + 1:at + 24]), s["id"]
        head = [d for d in docs if d["id"] == s["path"] + "#train"][0]
        head_ids = tok.encode(head["text"])
        assert _contains(train, head_ids[-30:-5])  # the check can see text that does train
        assert " ".join(s["text"].split()[:30]) not in " ".join(tokenizer_text.split())
    return sorted({s["domain"] for s in slices})


def test_run_on_one_file(tmp_path, capsys):
    corpus = tmp_path / "book.txt"
    corpus.write_text(book("Only Book", "Ada Winter", 5, 4000), encoding="utf-8")
    run_dir, report = _run(corpus, tmp_path, capsys)
    assert list(report["per_domain"]) == ["default"] and report["per_domain"]["default"]["bpb"] > 0
    assert report["held_out_slices"] == {"default": 1}
    assert "held-out slice" in (run_dir / "validation" / "report.md").read_text()
    assert _assert_slices_never_trained_on(run_dir) == ["default"]


def test_run_on_one_book_per_domain(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    for i, domain in enumerate(("scripture", "poetry", "history")):
        write_doc(corpus, f"{domain}/main/book.txt", book(f"Book of {domain}", "Ed Orr", 20 + i, 2000))
    run_dir, report = _run(corpus, tmp_path, capsys)
    assert set(report["per_domain"]) == {"scripture", "poetry", "history"}
    assert all(v["bpb"] > 0 for v in report["per_domain"].values())
    assert report["held_out_slices"] == {"scripture": 1, "poetry": 1, "history": 1}
    md = (run_dir / "validation" / "report.md").read_text()
    assert all(f"**{d}**" in md for d in ("scripture", "poetry", "history"))
    assert _assert_slices_never_trained_on(run_dir) == ["history", "poetry", "scripture"]


def test_run_on_one_single_document_domain_beside_a_many_document_one(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    write_doc(corpus, "solo/main/book.txt", book("Lone Harbor", "Ada Winter", 30, 2500))
    for i in range(5):
        write_doc(corpus, f"many/sub/{i}.txt", book(f"Tale {i}", "Ed Orr", 40 + i, 500))
    run_dir, report = _run(corpus, tmp_path, capsys)
    assert set(report["per_domain"]) == {"solo", "many"}
    assert all(v["bpb"] > 0 for v in report["per_domain"].values())
    assert report["held_out_slices"] == {"solo": 1}  # "many" validates on whole documents
    assert _assert_slices_never_trained_on(run_dir) == ["solo"]


# ----------------------------------------------------------------------------- ablation


def test_uncurated_ablation_never_trains_on_the_clean_held_out_slice(tmp_path):
    """The uncurated variant reads the same file with its licence left in, so its own cut
    falls elsewhere: its training text is cut where the clean slice begins, not dropped."""
    import copy

    from simone.workflows.ablate import prepare_shared, prepare_uncurated
    from simone.rundir import RunDir

    corpus = tmp_path / "corpus"
    gutenberg = ("*** START OF THIS PROJECT GUTENBERG EBOOK LONE HARBOR ***\n\n" + book("Lone Harbor", "Ada Winter", 50, 2500)
                 + "\n\n*** END OF THIS PROJECT GUTENBERG EBOOK LONE HARBOR ***\n\n"
                 + "Please read this before you distribute or use this work.\n" * 40)
    write_doc(corpus, "solo/main/book.txt", gutenberg, meta("Lone Harbor", "Ada Winter", "solo", "main"))
    for i in range(4):
        write_doc(corpus, f"many/sub/{i}.txt", book(f"Tale {i}", "Ed Orr", 60 + i, 500), meta(f"Tale {i}", "Ed Orr", "many", "sub"))
    cfg = _cfg()
    cfg.data.data_dir = str(corpus)
    shared = prepare_shared(cfg, tmp_path / "ablation")
    uncurated = copy.deepcopy(cfg)
    uncurated.curate.enabled = False
    run = RunDir(tmp_path / "ablation" / "runs" / "uncurated").make()
    prepare_uncurated(uncurated, shared, run)
    clean_slice = [d for d in read_jsonl(shared.documents) if d["split"] == "val" and "slice" in d]
    assert [d["path"] for d in clean_slice] == ["solo/main/book.txt"]
    words = " ".join(clean_slice[0]["text"].split()[:20])
    solo_train = [d for d in read_jsonl(run.documents) if d["domain"] == "solo" and d["split"] == "train"]
    assert solo_train and all(len(d["text"].split()) > 1000 for d in solo_train)  # still trains on the book
    assert all(words not in " ".join(d["text"].split()) for d in solo_train)
