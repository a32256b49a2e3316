"""Record-file corpora (.jsonl, .jsonl.gz, .jsonl.zst, .parquet) through discovery, curation and shards."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from simone.cli import main
from simone.config import preset
from simone.data.corpus import discover_files
from simone.data.curate import CorpusError, curate
from simone.data.records import RECORD_REASONS
from simone.data.status import QUARANTINE
from tests.curate_helpers import book, read_jsonl, write_doc

BOOKS = [  # (rel path, title, author, seed): three documents a domain, so the split has a choice to make
    ("poetry/lyric/morning-songs.txt", "Morning Songs", "Ada Winter", 1),
    ("poetry/lyric/evening-hymns.txt", "Evening Hymns", "Basil Reed", 2),
    ("poetry/epic/the-long-road.txt", "The Long Road", "Cora Vale", 3),
    ("history/ancient/river-kings.txt", "River Kings", "Edith Stone", 5),
    ("history/ancient/silver-towers.txt", "Silver Towers", "Felix Crane", 6),
    ("history/modern/market-street.txt", "Market Street", "Greta Hale", 7),
]


def _cfg(**data):
    cfg = preset("tiny")
    cfg.curate.workers = 1
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


def _record(i: int, **fields) -> dict:
    return {"text": book(f"Record {i}", "Ida Lane", 100 + i, 600), "title": f"Record {i}", **fields}


def _write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def _cli(verb: str, root: Path, run: Path, *flags: str) -> int:
    return main([verb, "--data", str(root), "--preset", "tiny", "--run-dir", str(run), *flags])


def test_a_txt_corpus_written_as_jsonl_trains_the_same_documents_tokenizer_and_shards(tmp_path):
    txt, jsonl = tmp_path / "txt", tmp_path / "jsonl"
    folders: dict[str, list] = {}
    for rel, title, author, seed in sorted(BOOKS):  # records in the order the .txt files sort in
        text = book(title, author, seed, 700)
        write_doc(txt, rel, text, {"title": title, "author": author})
        # the .txt path as the record's `id`: it decides the split as the path does
        folders.setdefault(rel.rsplit("/", 1)[0], []).append(
            {"id": rel, "text": text, "title": title, "author": author}
        )
    for folder, rows in folders.items():
        _write_jsonl(jsonl / folder / "records.jsonl", rows)
    assert _cli("prepare", txt, tmp_path / "run_txt", "--set", "curate.workers=1") == 0
    assert _cli("prepare", jsonl, tmp_path / "run_jsonl", "--set", "curate.workers=1") == 0
    a, b = (tmp_path / "run_txt" / "data", tmp_path / "run_jsonl" / "data")

    # ids differ by design (PATH vs FILE#N): documents compared by everything else, in order
    def docs(data):
        return [{k: v for k, v in d.items() if k not in ("id", "path")} for d in read_jsonl(data / "documents.jsonl")]

    assert docs(a) == docs(b) and {d["split"] for d in docs(a)} == {"train", "val"}
    assert [d["id"] for d in read_jsonl(b / "documents.jsonl")][:2] == [
        "history/ancient/records.jsonl#1",
        "history/ancient/records.jsonl#2",
    ]
    txt_lines, rec_lines = read_jsonl(a / "manifest.jsonl"), read_jsonl(b / "manifest.jsonl")
    # each record's text is its .txt's bytes
    assert [r["sha256"] for r in txt_lines] == [r["sha256"] for r in rec_lines]
    assert list(rec_lines[0])[:3] == ["path", "file", "record"] and rec_lines[0]["record"] == 1
    vocab = [
        json.loads((tmp_path / run / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]
        for run in ("run_txt", "run_jsonl")
    ]
    assert vocab[0] == vocab[1]
    for shard in ("train.bin", "val.bin"):
        assert (a / shard).read_bytes() == (b / shard).read_bytes()
    # the ids, not the places in the file, decide the splits: the records reversed split the same
    for folder, rows in folders.items():
        _write_jsonl(tmp_path / "reversed" / folder / "records.jsonl", rows[::-1])
    curate(tmp_path / "reversed", tmp_path / "rev", _cfg(), progress=False)
    split_of = [
        {d["title"]: d["split"] for d in read_jsonl(data / "documents.jsonl")} for data in (b, tmp_path / "rev")
    ]
    assert split_of[0] == split_of[1]


def test_bad_records_get_one_line_each_and_the_good_ones_are_kept(tmp_path):
    root = tmp_path / "corpus"
    _write_jsonl(
        root / "web/forum/mixed.jsonl",
        [
            _record(1),
            '{"text": "not json',
            {"title": "no text here"},
            {"text": 42},
            _record(5),
            _record(6, text=book("L", "M", 9, 2000)),
        ],
    )
    gz = gzip.compress("".join(json.dumps(_record(i)) + "\n" for i in (7, 8)).encode())
    (root / "web/forum/cut.jsonl.gz").write_bytes(gz[:-8])  # the trailer cut off: truncated
    cfg = _cfg()
    cfg.curate.max_file_bytes = 8000  # a limit per record (the file is over it, its records are not), not per file
    res = curate(root, tmp_path / "data", cfg, progress=False)
    lines = {r["path"]: r for r in read_jsonl(tmp_path / "data" / "manifest.jsonl")}
    assert {p: (r["status"], r["reasons"][:1]) for p, r in lines.items() if r["status"] == "quarantined"} == {
        "web/forum/mixed.jsonl#2": ("quarantined", ["bad_json"]),
        "web/forum/mixed.jsonl#3": ("quarantined", ["no_text_field"]),
        "web/forum/mixed.jsonl#4": ("quarantined", ["text_not_string"]),
        "web/forum/mixed.jsonl#6": ("quarantined", ["too_large"]),
        "web/forum/cut.jsonl.gz#3": ("quarantined", ["bad_compression"]),
    }
    assert "its fields: title" in lines["web/forum/mixed.jsonl#3"]["notes"]["no_text_field"]
    kept = [
        "web/forum/cut.jsonl.gz#1",
        "web/forum/cut.jsonl.gz#2",
        "web/forum/mixed.jsonl#1",
        "web/forum/mixed.jsonl#5",
    ]
    assert [d["path"] for d in read_jsonl(tmp_path / "data" / "documents.jsonl") if "#val" not in d["id"]] == kept
    fifth = lines["web/forum/mixed.jsonl#5"]
    assert (fifth["file"], fifth["record"]) == ("web/forum/mixed.jsonl", 5)
    assert res.files == 9 and res.reason_counts["bad_json"] == 1
    assert QUARANTINE | {"not_utf8", "too_large", "unreadable", "not_regular_file"} >= RECORD_REASONS


def test_the_domain_field_names_each_records_domain(tmp_path):
    root = tmp_path / "corpus"
    _write_jsonl(
        root / "all.jsonl",
        [_record(i, source=s) for i, s in enumerate(["news", "news", "tales", "tales", "news"])] + [_record(9)],
    )
    curate(root, tmp_path / "data", _cfg(domain_field="source"), progress=False)
    docs = read_jsonl(tmp_path / "data" / "documents.jsonl")
    assert {d["path"]: d["domain"] for d in docs if "#val" not in d["id"]} == {
        "all.jsonl#1": "news",
        "all.jsonl#2": "news",
        "all.jsonl#3": "tales",
        "all.jsonl#4": "tales",
        "all.jsonl#5": "news",
    }
    last = read_jsonl(tmp_path / "data" / "manifest.jsonl")[-1]
    assert (last["path"], last["reasons"]) == ("all.jsonl#6", ["bad_domain"])


def test_parquet_and_mixed_folders_curate_from_the_cli(tmp_path):
    root = tmp_path / "corpus"
    write_doc(root, "tales/old/a-tale.txt", book("A Tale", "Ida Lane", 40, 600), {"title": "A Tale"})
    _write_jsonl(root / "tales/old/more.jsonl", [_record(1), _record(2)])
    rows = [_record(i, year=1900 + i) for i in (3, 4, 5)]
    (root / "plays/new").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), root / "plays/new/part-0.parquet", row_group_size=2)
    assert _cli("curate", root, tmp_path / "run", "--set", "curate.workers=2") == 0
    lines = read_jsonl(tmp_path / "run" / "data" / "manifest.jsonl")
    assert [(r["path"], r["domain"], r["subdomain"], r["status"]) for r in lines] == [
        ("plays/new/part-0.parquet#1", "plays", "new", "kept"),
        ("plays/new/part-0.parquet#2", "plays", "new", "kept"),
        ("plays/new/part-0.parquet#3", "plays", "new", "kept"),
        ("tales/old/a-tale.txt", "tales", "old", "kept"),
        ("tales/old/more.jsonl#1", "tales", "old", "kept"),
        ("tales/old/more.jsonl#2", "tales", "old", "kept"),
    ]
    assert lines[0]["title"] == "Record 3" and "file" not in lines[3]
    # one record file as --data
    assert _cli("curate", root / "tales/old/more.jsonl", tmp_path / "one") == 0
    one = read_jsonl(tmp_path / "one" / "data" / "manifest.jsonl")
    assert [r["path"] for r in one] == ["more.jsonl#1", "more.jsonl#2"]


def test_a_text_field_no_record_has_is_one_clear_error(tmp_path, capsys):
    root = tmp_path / "corpus"
    _write_jsonl(root / "all.jsonl", [_record(1), _record(2)])
    assert _cli("curate", root, tmp_path / "run", "--text-field", "body") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no record has the text field 'body' (--text-field" in err
    assert "its fields: text, title" in err
    _write_jsonl(root / "all.jsonl", ['{"body', {"text": "x"}])
    with pytest.raises(CorpusError, match="no record has the text field 'body'"):  # a bad JSON line does not hide it
        curate(root, tmp_path / "data", _cfg(text_field="body"), progress=False)


def test_record_ids_and_file_names_never_clash(tmp_path):
    root = tmp_path / "corpus"
    _write_jsonl(root / "d/s/a.jsonl", [_record(1)])
    (root / "d/s/a.jsonl#1").symlink_to(tmp_path)  # a linked folder (a line of its own) named like record 1 of a.jsonl
    (root / "d/s/caf\\xe9.jsonl").write_text("{}\n")
    (root / "d/s").joinpath(b"caf\xe9.jsonl".decode("utf-8", "surrogateescape")).write_text("{}\n")  # prints alike
    rels = sorted(sf.rel for sf in discover_files(root))
    assert rels == ["d/s/a.jsonl", "d/s/a.jsonl#1#2", "d/s/caf\\xe9.jsonl", "d/s/caf\\xe9.jsonl~2"]


def test_doctor_and_the_plan_see_a_corpus_of_record_files_only(tmp_path):
    from simone.workflows import doctor
    from simone.workflows.pipeline import estimated_train_tokens

    corpus = tmp_path / "corpus" / "bible" / "kjv"
    corpus.mkdir(parents=True)
    _write_jsonl(corpus / "all.jsonl", [_record(i) for i in range(3)])
    with gzip.open(corpus / "more.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps(_record(9)) + "\n")
    check = doctor.check_corpus(tmp_path / "corpus")
    assert check.ok and "0 text files, 2 record files" in check.detail
    cfg = _cfg()
    cfg.data.data_dir = str(tmp_path / "corpus")
    assert estimated_train_tokens(cfg) > 0
