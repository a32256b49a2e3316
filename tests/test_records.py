"""Record files (JSON Lines, gzip, zstd, Parquet): every record numbered, bad ones named, streamed."""

from __future__ import annotations

import datetime
import decimal
import gzip
import json
import os
import tracemalloc

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from simone.data.corpus import is_record_file
from simone.data.records import Record, iter_records, record_id

ROWS = [{"text": f"Document number {i}.", "source": f"dom{i % 2}", "title": f"T{i}", "year": 1900 + i, "tags": ["a", str(i)]}
        for i in range(1, 7)]


def jsonl(rows) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def write_as(path, data: bytes):
    if path.name.endswith(".gz"):
        data = gzip.compress(data)
    elif path.name.endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


def outline(records):
    return [(r.number, r.reason or r.text) for r in records]


def test_names_and_ids():
    assert all(map(is_record_file, ["a.jsonl", "b/C.JSONL.GZ", "c.jsonl.zst", "d.parquet"]))
    assert not any(map(is_record_file, ["a.json", "a.txt", "a.jsonl.bz2", "jsonl"]))
    assert record_id("web/crawl/part-0.jsonl.gz", 7) == "web/crawl/part-0.jsonl.gz#7"


def test_jsonl_records_number_lines_and_carry_other_fields_as_meta(tmp_path):
    data = b"\xef\xbb\xbf" + jsonl(ROWS[:2]).replace(b"\n", b"\r\n", 1) + b"\n  \n" + json.dumps(ROWS[2]).encode()  # BOM, CRLF, blank lines, no final newline
    records = list(iter_records(write_as(tmp_path / "a.jsonl", data)))
    assert [r.number for r in records] == [1, 2, 5]  # a blank line is no record: numbers stay line numbers
    assert records[0] == Record(1, "Document number 1.", None, {"source": "dom1", "title": "T1", "year": 1901, "tags": ["a", "1"]})
    assert [r.text for r in records] == [r["text"] for r in ROWS[:3]]


def test_each_bad_record_gets_its_reason_and_the_good_ones_are_kept_in_order(tmp_path):
    lines = [
        b'{"text": "first", "d": "x"}',
        b'{"text": "not json',
        b'["text", "a list"]',
        b'{"title": "no text here", "d": "x"}',
        b'{"text": 42, "d": "x"}',
        b'{"text": null, "d": "x"}',
        b'{"text": "caf\xe9", "d": "x"}',
        b'{"text": "half a pair \\ud800", "d": "x"}',
        b'{"text": "' + b"long " * 100 + b'", "d": "x"}',
        b'{"text": "no domain"}',
        b'{"text": "blank domain", "d": "  "}',
        b'{"text": "number domain", "d": 3}',
        b'{"text": "last", "d": " y ", "title": "\\udc80"}',
    ]
    records = list(iter_records(write_as(tmp_path / "a.jsonl", b"\n".join(lines) + b"\n"), domain_field="d", max_record_bytes=200))
    assert outline(records) == [
        (1, "first"), (2, "bad_json"), (3, "bad_json"), (4, "no_text_field"), (5, "text_not_string"),
        (6, "text_not_string"), (7, "not_utf8"), (8, "not_utf8"), (9, "too_large"), (10, "bad_domain"),
        (11, "bad_domain"), (12, "bad_domain"), (13, "last")]
    assert all(r.problem and r.text is None for r in records if r.reason)
    assert "'d' is missing" in records[9].problem and "'text' is int" in records[4].problem
    last = records[-1]
    assert (last.domain, last.meta) == ("y", {"title": "\\udc80"})  # writable as UTF-8
    json.dumps(last.meta, ensure_ascii=False).encode("utf-8")


@pytest.mark.parametrize("name", ["a.jsonl.gz", "a.jsonl.zst", "a.parquet"])
def test_compressed_and_parquet_give_the_records_of_plain_jsonl(tmp_path, name):
    plain = list(iter_records(write_as(tmp_path / "a.jsonl", jsonl(ROWS)), domain_field="source"))
    path = tmp_path / name
    if name.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(ROWS), path, row_group_size=4)  # two row groups
    else:
        write_as(path, jsonl(ROWS))
    assert list(iter_records(path, domain_field="source")) == plain
    assert [(r.number, r.domain, r.meta["title"]) for r in plain[:2]] == [(1, "dom1", "T1"), (2, "dom0", "T2")]
    assert "source" not in plain[0].meta and "text" not in plain[0].meta


@pytest.mark.parametrize("codec", ["gz", "zst"])
@pytest.mark.parametrize("damage", ["truncate", "corrupt"])
def test_a_broken_stream_keeps_the_records_before_the_break(tmp_path, codec, damage):
    rows = [{"text": f"line {i} " + "x" * (i % 97)} for i in range(20000)]
    path = write_as(tmp_path / f"a.jsonl.{codec}", jsonl(rows))
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        del data[len(data) // 2:]
    else:
        data[len(data) // 2: len(data) // 2 + 8] = b"\xff" * 8
    path.write_bytes(bytes(data))
    *good, last = list(iter_records(path))
    assert last.reason == "bad_compression" and f"line {last.number}" in last.problem
    assert [r.text for r in good[:9000]] == [r["text"] for r in rows[:9000]]  # the half before the damage
    if damage == "truncate":  # all of it, up to the cut; corrupt deflate data can decode to garbage first
        assert [r.text for r in good] == [r["text"] for r in rows[: len(good)]]
        assert last.number == len(good) + 1


def test_a_broken_parquet_row_group_loses_only_its_rows(tmp_path):
    path = tmp_path / "a.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path, row_group_size=3)
    column = pq.ParquetFile(path).metadata.row_group(1).column(0)
    start = column.dictionary_page_offset if column.has_dictionary_page else column.data_page_offset
    data = bytearray(path.read_bytes())
    data[start: start + column.total_compressed_size] = b"\xff" * column.total_compressed_size
    path.write_bytes(bytes(data))
    records = list(iter_records(path))
    assert outline(records) == [(1, ROWS[0]["text"]), (2, ROWS[1]["text"]), (3, ROWS[2]["text"]), (4, "bad_row_group")]
    assert "rows 4-6" in records[-1].problem
    broken = write_as(tmp_path / "b.parquet", b"PAR1 not really")
    assert outline(iter_records(broken)) == [(1, "bad_parquet")]


def test_parquet_values_that_are_not_json_become_strings(tmp_path):
    path = tmp_path / "a.parquet"
    table = pa.table({
        "text": ["one", "two"], "when": [datetime.datetime(2020, 1, 2, 3, 4), None],
        "blob": [b"\x00ab", b"\xff"], "price": [decimal.Decimal("1.50"), decimal.Decimal("2.00")],
        "score": [float("nan"), 0.5], "info": [{"k": 1}, {"k": 2}], "body": ["x", "y"]})
    pq.write_table(table, path)
    one, two = iter_records(path, text_field="body")
    assert one.text == "x" and one.meta["text"] == "one"
    assert one.meta["when"] == "2020-01-02 03:04:00" and two.meta["when"] is None
    assert (one.meta["blob"], two.meta["blob"], one.meta["price"]) == ("\x00ab", "\\xff", "1.50")
    assert (one.meta["score"], two.meta["score"], one.meta["info"]) == ("nan", 0.5, {"k": 1})
    json.dumps(one.meta, allow_nan=False)
    assert [r.reason for r in iter_records(path, text_field="blob")] == ["text_not_string"] * 2
    assert [r.reason for r in iter_records(path, text_field="none")] == ["no_text_field"] * 2


def test_files_that_must_not_be_opened_give_one_record(tmp_path):
    os.mkfifo(tmp_path / "pipe.jsonl")  # would block a reader forever
    os.symlink(tmp_path / "pipe.jsonl", tmp_path / "link.jsonl")  # discovery resolves links; a late one is refused
    assert outline(iter_records(tmp_path / "pipe.jsonl")) == [(1, "not_regular_file")]
    assert outline(iter_records(tmp_path / "link.jsonl")) == [(1, "unreadable")]
    with pytest.raises(ValueError):
        next(iter_records(tmp_path / "a.txt"))


def test_a_large_file_is_streamed_and_a_huge_line_never_held(tmp_path):
    path = tmp_path / "big.jsonl"
    line = json.dumps({"text": "w " * 500_000}).encode() + b"\n"  # 1 MB a record
    with open(path, "wb") as f:
        f.writelines(line if i != 20 else b'{"text": "' + b"z" * 20_000_000 + b'"}\n' for i in range(50))
    assert path.stat().st_size > 65_000_000
    tracemalloc.start()
    try:
        reasons = [r.reason for r in iter_records(path, max_record_bytes=2 << 20)]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert reasons == [None] * 20 + ["too_large"] + [None] * 29
    assert peak < 12 << 20, f"peak {peak / 2**20:.1f} MiB"
