"""A file of prose followed by megabytes of spaces: curation flags it, and `simone run` still
finishes (the byte-level BPE once saw the run as one 3-million-character word and never
finished training its tokenizer)."""

from __future__ import annotations

import json

import pytest

from simone.cli import main
from simone.data.tokenizer import MAX_RUN_CHARS, load_tokenizer
from tests.conftest import make_corpus
from tests.curate_helpers import prose

SPACES = 3_000_000


def spaces_file_text() -> str:
    """About 20 KB of prose, then 3 MB of spaces before a last word: cleaning strips only
    trailing whitespace, so a run with text after it on the same line survives it."""
    return prose(11, 3400) + " " * SPACES + "end\n"


@pytest.mark.timeout(60)
def test_run_finishes_on_a_corpus_with_a_file_of_spaces(tmp_path, capsys):
    corpus = make_corpus(tmp_path / "corpus", docs_per_subdomain=2, words_per_doc=200)
    spaces_file = corpus / "poetry" / "poetry_a" / "spaces.txt"
    spaces_file.write_text(spaces_file_text(), encoding="utf-8")
    run_dir = tmp_path / "run"
    main(["run", "--data", str(corpus), "--preset", "tiny", "--run-dir", str(run_dir), "--max-steps", "2",
          "--package-dir", str(tmp_path / "pkgs"), "--set", "curate.workers=1"])
    capsys.readouterr()

    status = json.loads((run_dir / "status.json").read_text())
    assert status["stage"] == "done" and status["package"], status  # every stage ran to the end
    manifest = {m["path"]: m for m in map(json.loads, (run_dir / "data" / "manifest.jsonl").read_text().splitlines())}
    line = manifest["poetry/poetry_a/spaces.txt"]
    assert line["status"] == "flagged" and line["reasons"] == ["low_quality:whitespace_share"]
    assert line["quality"]["whitespace_share"] > 0.99
    assert f"the longest run is {SPACES:,} characters" in line["notes"]["low_quality:whitespace_share"]
    # a flag, not a quarantine: the file trained (or validated), its spaces included, and
    # its text comes back exactly from its tokens
    document = next(d for d in map(json.loads, (run_dir / "data" / "documents.jsonl").read_text().splitlines())
                    if d["path"] == "poetry/poetry_a/spaces.txt")
    tok = load_tokenizer(run_dir / "tokenizer")
    ids = tok.encode(document["text"])
    assert tok.decode(ids) == document["text"]
    assert max(len(tok.decode([i])) for i in set(ids)) <= MAX_RUN_CHARS
