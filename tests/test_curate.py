"""The curate stage end to end on a small corpus made to hold every defect we look for."""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import random
from pathlib import Path

import pytest

from simone.config import preset
from simone.data.curate import CorpusError, curate, print_summary
from tests.curate_helpers import book, meta, prose, read_jsonl, write_doc

GOOD = [  # (rel path, title, author, seed)
    ("poetry/lyric/morning-songs.txt", "Morning Songs", "Ada Winter", 1),
    ("poetry/lyric/evening-hymns.txt", "Evening Hymns", "Basil Reed", 2),
    ("poetry/epic/the-long-road.txt", "The Long Road", "Cora Vale", 3),
    ("poetry/epic/harbor-tales.txt", "Harbor Lights", "Dane Moor", 4),
    ("history/ancient/river-kings.txt", "River Kings", "Edith Stone", 5),
    ("history/ancient/silver-towers.txt", "Silver Towers", "Felix Crane", 6),
    ("history/modern/market-street.txt", "Market Street", "Greta Hale", 7),
    ("history/modern/the-quiet-war.txt", "The Quiet War", "Hugo Lark", 8),
]


def _cfg(**curate):
    cfg = preset("tiny")
    cfg.curate.workers = 1
    for k, v in curate.items():
        setattr(cfg.curate, k, v)
    return cfg


def _snapshot(root: Path) -> dict[str, tuple]:
    """Everything about the tree that curation must not change (lstat: links not followed)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            if os.path.islink(p):
                out[str(p)] = ("link", os.readlink(p))
            elif p.is_file():
                out[str(p)] = ("file", hashlib.sha256(p.read_bytes()).hexdigest(), st.st_mode, st.st_mtime_ns)
            else:
                out[str(p)] = ("other", st.st_mode)
    return out


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """A corpus with good books and one file made to trigger each reason code."""
    root = tmp_path_factory.mktemp("zoo") / "corpus"
    for rel, title, author, seed in GOOD:
        domain, sub = rel.split("/")[:2]
        write_doc(root, rel, book(title, author, seed), meta(title, author, domain, sub))
    inputs = [rel for rel, *_ in GOOD]

    def add(rel, text, m=None, sidecar=None):
        write_doc(root, rel, text, m, sidecar)
        inputs.append(rel)

    d = "misc/odd/"
    add(d + "empty.txt", b"")
    rng = random.Random(0)
    add(d + "binary.txt", bytes(rng.randrange(256) for _ in range(5000)))
    add(d + "nul.txt", b"\x00" * 4096)
    good = book("Winter Letters", "Iris Penn", 20).encode("utf-8")
    add(d + "latin1.txt", good[:1000] + b"caf\xe9 " + good[1000:])  # invalid UTF-8 at byte 1003
    add(d + "utf16.txt", codecs.BOM_UTF16_LE + book("Summer Letters", "Jon Fry", 21).encode("utf-16-le"))
    add(d + "bom8.txt", codecs.BOM_UTF8 + book("Autumn Letters", "Kai Dunn", 22).encode("utf-8"))
    spring = book("Spring Letters", "Lea Bloom", 23)
    add(d + "mojibake.txt", spring + "\nThe sailorâ€™s daughter said the cafÃ© by the riverâ€™s edge was closed.\n")
    add(d + "stub.txt", "FAKE TEXT for 'Collected Works Vol 1' by Nobody. Replace with real content.")
    add(d + "short.txt", "A short note about the harbor and the ships that sailed in the morning.")
    # duplicates of GOOD[0] (exact, in another domain) and GOOD[4] (a lightly edited copy)
    add("history/modern/morning-songs-copy.txt", book("Morning Songs", "Ada Winter", 1),
        meta("Morning Songs", "Ada Winter", "history", "modern", quality=5.0))
    edited = book("River Kings", "Edith Stone", 5).split(" ")
    for i in range(40, len(edited), 120):
        edited[i] = "lighthouse"
    add("poetry/epic/river-kings-edited.txt", " ".join(edited), meta("River Kings", "Edith Stone", "poetry", "epic", quality=5.0))
    # an excerpt copied out of a longer book (Jaccard is low; containment is not)
    towers = book("Silver Towers", "Felix Crane", 6).split("\n\n")
    add("history/ancient/tower-excerpt.txt", "\n\n".join(towers[len(towers) // 3: len(towers) // 3 + 12]))
    # a book under the wrong title
    add(d + "wrong-title.txt", book("The Gardens of Saturn", "Mona Quill", 30),
        meta("Moby Dick", "Herman Melville", "misc", "odd"))
    # header block, no sidecar: metadata comes from the header
    header = "Title: Lantern Days\nAuthor: Nora Ash\nSource: test\n" + "=" * 80 + "\n\n"
    add(d + "with-header.txt", header + book("Lantern Days", "Nora Ash", 31))
    # Gutenberg boilerplate around the book
    add(d + "gutenberg.txt",
        "The Project Gutenberg EBook of Candle Nights, by Omar Dent\n\nThis eBook is for the use of anyone.\n\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK CANDLE NIGHTS ***\n\nProduced by Some Volunteers\n\n\n"
        + book("Candle Nights", "Omar Dent", 32)
        + "\n\n*** END OF THIS PROJECT GUTENBERG EBOOK CANDLE NIGHTS ***\n\nTHE FULL PROJECT GUTENBERG LICENSE\n"
        + "Please read this before you distribute or use this work.\n" * 20,
        meta("Candle Nights", "Omar Dent", "misc", "odd"))
    add(d + "bad-sidecar.txt", book("Paper Boats", "Pia Holt", 33), sidecar="{ not json")
    inputs.append(d + "orphan.json")
    (root / d / "orphan.json").write_text(json.dumps({"title": "Nothing Here"}))
    # unreadable entries: a directory named .txt, a dangling symlink, a symlink loop
    (root / d / "folder.txt").mkdir()
    inputs.append(d + "folder.txt")
    os.symlink(root / d / "missing-target.txt", root / d / "dangling.txt")
    inputs.append(d + "dangling.txt")
    os.symlink(root / d / "loop-b.txt", root / d / "loop-a.txt")
    os.symlink(root / d / "loop-a.txt", root / d / "loop-b.txt")
    inputs += [d + "loop-a.txt", d + "loop-b.txt"]
    os.symlink(root / "misc", root / d / "up")  # a directory symlink loop: must not be walked
    inputs.append(d + "up")  # ... but reported (symlinked_dir)
    # quality: symbols and numbers, not prose
    add(d + "table.txt", "\n".join(f"### {i} ... {i * 7} ... {i * 13} ###" for i in range(400)))
    # one long passage repeated inside one document
    passage = prose(40, 1100)
    add(d + "repeats.txt", book("Echo Valley", "Quinn Ray", 41, 800) + "\n\n" + passage + "\n\n" + prose(42, 600) + "\n\n" + passage,
        meta("Echo Valley", "Quinn Ray", "misc", "odd"))
    # a 10 MB file on one line
    line = " ".join(prose(43, 60).split())
    add(d + "one-line.txt", (line + " ") * (10_000_000 // (len(line) + 1)))

    snapshot = _snapshot(root)
    data = root.parent / "run" / "data"
    result = curate(root, data, _cfg(), progress=False)
    manifest = {r["path"]: r for r in read_jsonl(data / "manifest.jsonl")}
    return {"root": root, "data": data, "result": result, "manifest": manifest, "inputs": inputs, "snapshot": snapshot}


def _reasons(zoo, rel):
    return zoo["manifest"][rel]["reasons"]


def test_every_input_appears_exactly_once_in_the_manifest(zoo):
    lines = read_jsonl(zoo["data"] / "manifest.jsonl")
    paths = [r["path"] for r in lines]
    assert len(paths) == len(set(paths))
    assert sorted(paths) == sorted(zoo["inputs"])
    for r in lines:
        assert set(r) >= {"path", "domain", "subdomain", "status", "reasons", "sha256", "bytes", "chars", "words",
                          "dup_of", "title", "author", "quality"}
        assert r["status"] in ("kept", "flagged", "quarantined")


@pytest.mark.parametrize("rel, code, status", [
    ("misc/odd/empty.txt", "empty", "quarantined"),
    ("misc/odd/binary.txt", "binary", "quarantined"),
    ("misc/odd/nul.txt", "binary", "quarantined"),
    ("misc/odd/latin1.txt", "not_utf8", "quarantined"),
    ("misc/odd/utf16.txt", "encoding_fixed", "kept"),
    ("misc/odd/bom8.txt", "encoding_fixed", "kept"),
    ("misc/odd/mojibake.txt", "encoding_fixed", "kept"),
    ("misc/odd/stub.txt", "stub", "quarantined"),
    ("misc/odd/short.txt", "too_short", "quarantined"),
    ("history/modern/morning-songs-copy.txt", "exact_duplicate", "quarantined"),
    ("poetry/epic/river-kings-edited.txt", "near_duplicate", "quarantined"),
    ("history/ancient/tower-excerpt.txt", "near_duplicate", "quarantined"),
    ("misc/odd/wrong-title.txt", "title_mismatch", "flagged"),
    ("misc/odd/with-header.txt", "header_stripped", "kept"),
    ("misc/odd/gutenberg.txt", "boilerplate_stripped", "kept"),
    ("misc/odd/bad-sidecar.txt", "bad_sidecar", "flagged"),
    ("misc/odd/orphan.json", "orphan_sidecar", "quarantined"),
    ("misc/odd/folder.txt", "not_regular_file", "quarantined"),
    ("misc/odd/dangling.txt", "unreadable", "quarantined"),
    ("misc/odd/loop-a.txt", "unreadable", "quarantined"),
    ("misc/odd/repeats.txt", "low_quality:repeated_passage", "flagged"),
])
def test_each_reason_code_is_produced(zoo, rel, code, status):
    r = zoo["manifest"][rel]
    assert code in r["reasons"], (rel, r["reasons"], r.get("notes"))
    assert r["status"] == status, (rel, r["status"], r["reasons"])


def test_decode_problems_name_the_byte_offset(zoo):
    note = zoo["manifest"]["misc/odd/latin1.txt"]["notes"]["not_utf8"]
    assert "misc/odd/latin1.txt" in note and "byte 1003" in note
    assert "symlink loop" in zoo["manifest"]["misc/odd/loop-a.txt"]["notes"]["unreadable"]


def test_low_quality_rules_quarantine_non_prose(zoo):
    table = zoo["manifest"]["misc/odd/table.txt"]
    assert table["status"] == "quarantined"
    assert any(c.startswith("low_quality:") for c in table["reasons"])
    big = zoo["manifest"]["misc/odd/one-line.txt"]
    assert big["bytes"] >= 9_000_000 and big["status"] == "quarantined"
    assert any(c.startswith("low_quality:") for c in big["reasons"])
    for rel, *_ in GOOD:  # real prose passes every rule and has its values in the manifest
        q = zoo["manifest"][rel]["quality"]
        assert {"mean_word_length", "stop_words", "dup_5gram_frac", "windows"} <= set(q)
        assert not any(c.startswith("low_quality") for c in zoo["manifest"][rel]["reasons"])


def test_duplicates_keep_the_better_copy(zoo):
    m = zoo["manifest"]
    assert m["history/modern/morning-songs-copy.txt"]["dup_of"] == "poetry/lyric/morning-songs.txt"
    assert m["poetry/epic/river-kings-edited.txt"]["dup_of"] == "history/ancient/river-kings.txt"
    assert m["history/ancient/tower-excerpt.txt"]["dup_of"] == "history/ancient/silver-towers.txt"
    assert m["poetry/lyric/morning-songs.txt"]["status"] == "kept"
    assert m["history/ancient/river-kings.txt"]["status"] == "kept"
    clusters = {c["kept"]: c for c in zoo["result"].duplicate_clusters}
    assert "poetry/lyric/morning-songs.txt" in clusters
    # unrelated books are not duplicates of each other
    assert all(m[rel]["dup_of"] is None for rel, *_ in GOOD)


def test_metadata_from_sidecar_or_header(zoo):
    m = zoo["manifest"]
    assert (m["misc/odd/with-header.txt"]["title"], m["misc/odd/with-header.txt"]["author"]) == ("Lantern Days", "Nora Ash")
    assert m["misc/odd/wrong-title.txt"]["title"] == "Moby Dick"
    assert m["poetry/lyric/morning-songs.txt"]["domain"] == "poetry"
    assert m["poetry/lyric/morning-songs.txt"]["subdomain"] == "lyric"


def test_documents_hold_cleaned_text_of_kept_and_flagged_files(zoo):
    docs = read_jsonl(zoo["data"] / "documents.jsonl")
    by_id = {d["id"]: d for d in docs}
    assert len(by_id) == len(docs)
    m = zoo["manifest"]
    expected = {p for p, r in m.items() if r["status"] in ("kept", "flagged")}
    assert set(by_id) == expected
    assert "misc/odd/wrong-title.txt" in by_id  # flagged files train unless --strict
    for d in docs:
        assert set(d) >= {"id", "path", "domain", "subdomain", "title", "author", "split", "status", "quality_score", "text"}
        assert d["split"] in ("train", "val")
        assert "\r" not in d["text"] and "\n\n\n" not in d["text"]
    assert "Title: Lantern Days" not in by_id["misc/odd/with-header.txt"]["text"]
    assert by_id["misc/odd/with-header.txt"]["text"].startswith("LANTERN DAYS")
    assert by_id["misc/odd/utf16.txt"]["text"].startswith("SUMMER LETTERS")
    assert "\ufeff" not in by_id["misc/odd/bom8.txt"]["text"]
    fixed = by_id["misc/odd/mojibake.txt"]["text"]
    assert "sailor’s daughter said the café by the river’s edge" in fixed and "â€" not in fixed
    g = by_id["misc/odd/gutenberg.txt"]["text"]
    assert g.startswith("CANDLE NIGHTS") and "Gutenberg" not in g and "Produced by" not in g
    assert g.endswith(book("Candle Nights", "Omar Dent", 32).strip().split("\n")[-1])


def test_split_is_by_document_with_every_domain_in_validation(zoo):
    docs = read_jsonl(zoo["data"] / "documents.jsonl")
    domains = {d["domain"] for d in docs}
    for dom in domains:
        splits = [d["split"] for d in docs if d["domain"] == dom]
        if len(splits) >= 2:
            assert "val" in splits and "train" in splits, dom
    res = zoo["result"]
    assert res.documents_val >= len(domains) and res.documents_train > res.documents_val
    assert set(res.domains) >= domains


def test_corpus_is_byte_for_byte_unchanged(zoo):
    assert _snapshot(zoo["root"]) == zoo["snapshot"]


def test_rerun_gives_the_same_manifest_and_reuses_the_result(zoo, tmp_path):
    again = curate(zoo["root"], tmp_path / "data", _cfg(workers=2), progress=False)
    assert not again.reused
    assert (tmp_path / "data" / "manifest.jsonl").read_bytes() == (zoo["data"] / "manifest.jsonl").read_bytes()
    assert (tmp_path / "data" / "documents.jsonl").read_bytes() == (zoo["data"] / "documents.jsonl").read_bytes()
    reused = curate(zoo["root"], tmp_path / "data", _cfg(workers=2), progress=False)
    assert reused.reused and reused.status_counts == again.status_counts
    changed = curate(zoo["root"], tmp_path / "data", _cfg(workers=2, near_dup_threshold=0.95), progress=False)
    assert not changed.reused  # a setting changed: the work is redone


def test_a_changed_input_file_is_not_reused(tmp_path):
    root = tmp_path / "corpus"
    for i in range(3):
        write_doc(root, f"d/s/{i}.txt", book(f"Tale {i}", "Ed Orr", 600 + i), meta(f"Tale {i}", "Ed Orr", "d", "s"))
    first = curate(root, tmp_path / "data", _cfg(), progress=False)
    assert curate(root, tmp_path / "data", _cfg(), progress=False).reused
    write_doc(root, "d/s/0.txt", book("Tale 0", "Ed Orr", 700, 400))  # same name, new text
    again = curate(root, tmp_path / "data", _cfg(), progress=False)
    assert not again.reused and again.words_in != first.words_in


def test_report_is_self_contained_and_lists_problems(zoo):
    html = (zoo["data"] / "report.html").read_text(encoding="utf-8")
    assert html.startswith("<!doctype html>") and "<svg" in html
    assert "http://" not in html.replace("http://www.w3.org/2000/svg", "") and "https://" not in html
    assert "<script src" not in html
    for rel in ("misc/odd/wrong-title.txt", "misc/odd/stub.txt", "history/modern/morning-songs-copy.txt"):
        assert rel in html
    assert "title_mismatch" in html and "near_duplicate" in html


def test_print_summary_prints_counts(zoo, capsys):
    from rich.console import Console

    print_summary(zoo["result"], Console(file=None, force_terminal=False, width=120))
    out = capsys.readouterr().out
    assert "quarantined" in out and "poetry" in out


def test_strict_drops_flagged_files(zoo, tmp_path):
    res = curate(zoo["root"], tmp_path / "data", _cfg(strict=True), progress=False)
    ids = {d["id"] for d in read_jsonl(tmp_path / "data" / "documents.jsonl")}
    assert "misc/odd/wrong-title.txt" not in ids and "misc/odd/bad-sidecar.txt" not in ids
    assert "poetry/lyric/morning-songs.txt" in ids
    assert res.status_counts["flagged"] >= 2


def test_uncurated_ablation_only_reads_and_decodes(zoo, tmp_path):
    curate(zoo["root"], tmp_path / "data", _cfg(enabled=False), progress=False)
    m = {r["path"]: r for r in read_jsonl(tmp_path / "data" / "manifest.jsonl")}
    assert sorted(m) == sorted(zoo["inputs"])
    docs = {d["id"]: d for d in read_jsonl(tmp_path / "data" / "documents.jsonl")}
    for rel in ("misc/odd/stub.txt", "history/modern/morning-songs-copy.txt", "misc/odd/wrong-title.txt", "misc/odd/table.txt"):
        assert rel in docs, rel  # no dedup, quality or label filtering
    for rel in ("misc/odd/empty.txt", "misc/odd/binary.txt", "misc/odd/latin1.txt", "misc/odd/folder.txt"):
        assert rel not in docs and m[rel]["status"] == "quarantined"
    assert "Title: Lantern Days" not in docs["misc/odd/with-header.txt"]["text"]  # header still stripped
    assert "PROJECT GUTENBERG" in docs["misc/odd/gutenberg.txt"]["text"]  # boilerplate is not


def test_contamination_is_reported_and_decontaminate_moves_it(tmp_path):
    root = tmp_path / "corpus"
    shared = prose(100, 700)  # an edition duplicated inside several books of one domain
    for i in range(6):
        body = book(f"Volume {i} of Tides", "Rhea Sand", 200 + i, 1500) + "\n\n" + shared
        write_doc(root, f"sea/tides/vol{i}.txt", body, meta(f"Volume {i} of Tides", "Rhea Sand", "sea", "tides"))
    for i in range(4):
        write_doc(root, f"land/hills/hill{i}.txt", book(f"Hill {i}", "Saul Crag", 300 + i), meta(f"Hill {i}", "Saul Crag", "land", "hills"))
    res = curate(root, tmp_path / "d1", _cfg(), progress=False)
    m = {r["path"]: r for r in read_jsonl(tmp_path / "d1" / "manifest.jsonl")}
    val_sea = [p for p, r in m.items() if r["split"] == "val" and p.startswith("sea/")]
    val_land = [p for p, r in m.items() if r["split"] == "val" and p.startswith("land/")]
    assert val_sea and val_land
    for p in val_sea:
        assert "contamination" in m[p]["reasons"] and m[p]["status"] == "flagged"
    for p in val_land:
        assert "contamination" not in m[p]["reasons"]
    assert {c["path"] for c in res.contaminated} == set(val_sea)
    assert all(c["source"].startswith("sea/") for c in res.contaminated)

    moved = curate(root, tmp_path / "d2", _cfg(decontaminate=True), progress=False)
    assert any("'sea' has no validation documents" in w and "held-out slice" in w for w in moved.warnings)
    # the domain left without validation documents validates on a held-out slice instead
    assert moved.domains["sea"]["val"]["slices"] == 1 and moved.domains["land"]["val"]["slices"] == 0
    split_of = {d["id"]: d["split"] for d in read_jsonl(tmp_path / "d2" / "documents.jsonl")}
    for p in val_sea:
        assert split_of.get(p, split_of.get(p + "#train")) == "train"
    for p in val_land:
        assert split_of[p] == "val"


def test_missing_or_empty_corpus_is_one_clear_error(tmp_path):
    with pytest.raises(CorpusError, match="not found") as e:
        curate(tmp_path / "nope", tmp_path / "data", _cfg(), progress=False)
    assert str(tmp_path / "nope") in str(e.value)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.md").write_text("no texts here")
    with pytest.raises(CorpusError, match="no .txt files"):
        curate(tmp_path / "empty", tmp_path / "data", _cfg(), progress=False)


def test_flat_folder_and_single_file(tmp_path):
    flat = tmp_path / "flat"
    write_doc(flat, "a.txt", book("Alpha Stories", "Tess Ort", 400), meta("Alpha Stories", "Tess Ort", "fiction", "short"))
    write_doc(flat, "b.txt", book("Beta Stories", "Uma Vik", 401), meta("Beta Stories", "Uma Vik", "fiction", "short"))
    write_doc(flat, "c.txt", book("Gamma Notes", "Val Wex", 402))
    res = curate(flat, tmp_path / "d1", _cfg(), progress=False)
    m = {r["path"]: r for r in read_jsonl(tmp_path / "d1" / "manifest.jsonl")}
    assert m["a.txt"]["domain"] == "fiction" and m["a.txt"]["subdomain"] == "short"
    assert m["c.txt"]["domain"] == "default"
    assert res.domains["fiction"]["val"]["docs"] == 1

    assert m["c.txt"]["split"] == "train+val-slice"  # alone in its domain: a slice validates
    assert res.domains["default"]["val"] == {"docs": 0, "words": m["c.txt"]["holdout"]["words"], "slices": 1}

    single = curate(flat / "a.txt", tmp_path / "d2", _cfg(), progress=False)
    docs = read_jsonl(tmp_path / "d2" / "documents.jsonl")
    assert single.files == 1 and [(d["id"], d["split"]) for d in docs] == [("a.txt#train", "train"), ("a.txt#val", "val")]


def test_duplicate_with_the_right_label_is_kept_over_a_mislabelled_copy(tmp_path):
    root = tmp_path / "corpus"
    text = book("Quiet Harbor", "Ivo Lund", 500)
    # the mislabelled copy sorts first and claims a higher quality score
    write_doc(root, "a/x/aaa.txt", text, meta("Sermons on Fire", "Some Preacher", "a", "x", quality=10.0))
    write_doc(root, "b/y/zzz.txt", text, meta("Quiet Harbor", "Ivo Lund", "b", "y", quality=5.0))
    curate(root, tmp_path / "d", _cfg(), progress=False)
    m = {r["path"]: r for r in read_jsonl(tmp_path / "d" / "manifest.jsonl")}
    assert m["b/y/zzz.txt"]["status"] == "kept"
    assert m["a/x/aaa.txt"]["dup_of"] == "b/y/zzz.txt"


def test_a_file_that_breaks_processing_is_reported_not_fatal(tmp_path, monkeypatch):
    import simone.data.curate as curate_module

    root = tmp_path / "corpus"
    for i in range(3):
        write_doc(root, f"d/s/{i}.txt", book(f"Tale {i}", "Ed Orr", 800 + i), meta(f"Tale {i}", "Ed Orr", "d", "s"))
    real_clean = curate_module.clean_text

    def exploding(text, curate=True):
        if "TALE 1" in text:
            raise RecursionError("pathological text")
        return real_clean(text, curate)

    monkeypatch.setattr(curate_module, "clean_text", exploding)
    curate(root, tmp_path / "data", _cfg(), progress=False)
    m = {r["path"]: r for r in read_jsonl(tmp_path / "data" / "manifest.jsonl")}
    assert m["d/s/1.txt"]["status"] == "quarantined" and "pathological text" in m["d/s/1.txt"]["notes"]["unreadable"]
    assert m["d/s/0.txt"]["status"] == "kept" and m["d/s/2.txt"]["status"] == "kept"
