"""Corpus discovery: trees, flat folders, single files, sidecars and unreadable entries."""

from __future__ import annotations

import os

import pytest

from simone.data.corpus import CorpusError, discover_files, read_sidecar, SidecarError, split_header, title_from_filename


def test_tree_pairs_texts_with_sidecars_and_names_domains(tmp_path):
    (tmp_path / "bible" / "kjv").mkdir(parents=True)
    (tmp_path / "bible" / "kjv" / "genesis.txt").write_text("In the beginning.")
    (tmp_path / "bible" / "kjv" / "genesis.json").write_text('{"title": "Genesis"}')
    (tmp_path / "bible" / "kjv" / "exodus.txt").write_text("Now these are the names.")
    (tmp_path / "bible" / "lost.json").write_text("{}")
    (tmp_path / "README.md").write_text("not an input")
    (tmp_path / ".hidden.txt").write_text("ignored")
    files = {f.rel: f for f in discover_files(tmp_path)}
    assert sorted(files) == [".hidden.txt", "README.md", "bible/kjv/exodus.txt", "bible/kjv/genesis.txt", "bible/lost.json"]
    assert (files[".hidden.txt"].kind, files[".hidden.txt"].reason) == ("skipped", "hidden")
    assert files["README.md"].kind == "ignored"  # listed, not an input
    g = files["bible/kjv/genesis.txt"]
    assert (g.domain, g.subdomain, g.kind) == ("bible", "kjv", "text")
    assert g.sidecar is not None and g.sidecar.name == "genesis.json"
    assert files["bible/kjv/exodus.txt"].sidecar is None
    assert files["bible/lost.json"].kind == "orphan_sidecar"


def test_unreadable_entries_are_listed_not_walked(tmp_path):
    d = tmp_path / "dom" / "sub"
    d.mkdir(parents=True)
    (d / "ok.txt").write_text("fine")
    (d / "dir.txt").mkdir()
    os.symlink(d / "self.txt", d / "self.txt")  # a link to itself
    os.symlink(tmp_path, d / "back")  # a directory loop: never followed
    os.mkfifo(d / "pipe.txt")  # would block a reader forever
    files = {f.rel: f for f in discover_files(tmp_path)}
    assert files["dom/sub/ok.txt"].kind == "text"
    for rel, reason in (("dom/sub/dir.txt", "not_regular_file"), ("dom/sub/self.txt", "unreadable"), ("dom/sub/pipe.txt", "not_regular_file")):
        assert (files[rel].kind, files[rel].reason) == ("unreadable", reason), rel
        assert rel in files[rel].problem
    assert "a FIFO" in files["dom/sub/pipe.txt"].problem
    assert (files["dom/sub/back"].kind, files["dom/sub/back"].reason) == ("skipped", "symlinked_dir")
    assert not any("back/" in rel for rel in files)


def test_missing_empty_and_wrong_paths_raise_corpus_error(tmp_path):
    with pytest.raises(CorpusError, match="not found"):
        discover_files(tmp_path / "missing")
    with pytest.raises(CorpusError, match="no .txt files"):
        discover_files(tmp_path)
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(CorpusError, match="not a .txt"):
        discover_files(tmp_path / "x.csv")


def test_single_file_and_flat_folder(tmp_path):
    (tmp_path / "one.txt").write_text("text")
    [f] = discover_files(tmp_path / "one.txt")
    assert (f.rel, f.domain, f.folder_domain) == ("one.txt", "default", False)
    [f] = discover_files(tmp_path)
    assert f.rel == "one.txt" and not f.folder_domain


def test_sidecar_errors_and_header_parsing(tmp_path):
    p = tmp_path / "s.json"
    p.write_text('["a list"]')
    with pytest.raises(SidecarError, match="not an object"):
        read_sidecar(p)
    p.write_text('{"title": ')
    with pytest.raises(SidecarError, match="not valid JSON"):
        read_sidecar(p)
    meta, rest = split_header("Title: A\nWord Count: 1,234\n" + "=" * 20 + "\nBody.")
    assert meta == {"title": "A", "word_count": 1234} and rest == "Body."
    assert title_from_filename("dom/sub/Pride-and-Prejudice_1a2b3c4d.txt") == "Pride and Prejudice"


def test_file_names_that_are_not_utf8_are_read_and_reported(tmp_path):
    from simone.config import preset
    from simone.data.curate import curate
    from tests.curate_helpers import book, read_jsonl

    d = tmp_path / "corpus" / "dom" / "sub"
    d.mkdir(parents=True)
    with open(os.path.join(os.fsencode(d), b"caf\xe9.txt"), "wb") as f:
        f.write(book("Latin Names", "Ola Pym", 7).encode())
    cfg = preset("tiny")
    cfg.curate.workers = 1
    curate(tmp_path / "corpus", tmp_path / "data", cfg, progress=False)
    [line] = read_jsonl(tmp_path / "data" / "manifest.jsonl")
    assert line["path"] == "dom/sub/caf\\xe9.txt" and line["status"] == "kept"
