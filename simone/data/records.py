"""Read one record file of a corpus (JSON Lines, plain, gzip or zstd; or Parquet) as a stream of records.

A record file holds many documents: one JSON object a line, or one Parquet row. Each is
yielded as a `Record` numbered from 1: for JSON Lines its line number (a blank line is no
record, so numbers may skip one), for Parquet its row number in the file. The number is
stable, so `record_id(rel, number)` names the same document on every run. A record that
cannot be a document still comes out, with a manifest reason code and a note, and the
records after it are read as usual. A compressed stream that breaks ends the file with one
`bad_compression` record at the line where it broke (gzip checks a whole member at its end,
so lines of a corrupt stream may come out garbled before that); a Parquet row group that
cannot be read gives one `bad_row_group` record at its first unread row, and the next
group is read.

Nothing here holds a whole file: JSON Lines are split out of bounded chunks of the
(decompressed) stream, and a line over the size limit is dropped as it streams past;
Parquet is read a few rows at a time. The file is opened by `corpus.open_regular`, the one way
a corpus file is opened: regular files only, no final symlink followed, never blocking.
"""

from __future__ import annotations

import codecs
import gzip
import json
import math
import os
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import zstandard

from simone.data.corpus import RECORD_SUFFIXES, UnsafeFile, open_regular, record_suffix

RECORD_MAX_BYTES = 64 * 1024 * 1024  # a longer JSON line (or Parquet text) is a `too_large` record
# the manifest reason codes a record can get (all keep it out of training)
RECORD_REASONS = frozenset(
    {
        "bad_json",
        "no_text_field",
        "text_not_string",
        "bad_domain",
        "not_utf8",
        "too_large",
        "bad_compression",
        "bad_row_group",
        "bad_parquet",
        "unreadable",
        "not_regular_file",
    }
)
_CHUNK = 1 << 20  # bytes of (decompressed) JSON Lines handled at a time
_ZSTD_PIECE = 1 << 10  # compressed bytes fed at a time: zstd expands at most ~32,000x, so <= 32 MiB out
_PARQUET_BATCH = 64  # rows converted to Python at a time
_BROKEN_STREAM = (EOFError, zlib.error, gzip.BadGzipFile, zstandard.ZstdError)


@dataclass
class Record:
    """One record of a record file. A record that is no document has `reason` (one of
    `RECORD_REASONS`) and `problem` (why, in words) set, and no text."""

    number: int  # 1-based: the line of a JSON Lines file, the row of a Parquet file
    text: str | None = None
    domain: str | None = None  # the `domain_field` value; None when no domain field is named
    meta: dict[str, Any] = field(default_factory=dict)  # every other field, as JSON values
    problem: str | None = None
    reason: str | None = None


def record_id(rel: str, number: int) -> str:
    """The stable document id of record `number` of the record file at `rel` (corpus-relative)."""
    return f"{rel}#{number}"


def iter_records(
    path: str | Path,
    text_field: str = "text",
    domain_field: str | None = None,
    max_record_bytes: int = RECORD_MAX_BYTES,
) -> Iterator[Record]:
    """Every record of the record file at `path`, in file order (see the module docstring).

    A record's text is its `text_field`; its domain, when `domain_field` is named, that
    field's value (a non-empty string, else the record is `bad_domain`); all other fields
    are its `meta`. A file that cannot be opened gives one record saying why.
    """
    suffix = record_suffix(path)
    if suffix is None:
        raise ValueError(f"{path}: not a record file ({', '.join(RECORD_SUFFIXES)})")
    try:
        fd = open_regular(path)
    except UnsafeFile as e:
        yield _bad(1, e.code, e.message)
        return
    with os.fdopen(fd, "rb") as f:
        if suffix == ".parquet":
            yield from _parquet_records(f, text_field, domain_field, max_record_bytes)
        else:
            yield from _jsonl_records(f, suffix, text_field, domain_field, max_record_bytes)


# ----------------------------------------------------------------------------- JSON Lines


def _jsonl_records(
    f: BinaryIO, suffix: str, text_field: str, domain_field: str | None, max_bytes: int
) -> Iterator[Record]:
    number = 0  # the last line read whole
    try:
        for number, line in enumerate(_lines(_decompressed(f, suffix), max_bytes), 1):
            if line is None:
                yield _bad(
                    number, "too_large", f"line over the limit of {max_bytes / 2**20:.1f} MiB a record; not read"
                )
                continue
            if number == 1:
                line = line.removeprefix(codecs.BOM_UTF8)
            if line.strip():
                yield _json_record(number, line, text_field, domain_field, max_bytes)
    except _BROKEN_STREAM as e:
        yield _bad(
            number + 1,
            "bad_compression",
            f"the {suffix[6:]} stream breaks in line {number + 1} ({_one_line(e)}); the rest of the file is lost",
        )
    except OSError as e:
        yield _bad(number + 1, "unreadable", f"cannot read from line {number + 1} on ({e.strerror or e})")


def _decompressed(f: BinaryIO, suffix: str) -> Iterator[bytes]:
    """The file's bytes, decompressed, in pieces of bounded size; a broken or truncated
    stream raises one of `_BROKEN_STREAM` after the pieces before the break."""
    if suffix == ".jsonl.gz":
        g = gzip.GzipFile(fileobj=f)
        while chunk := g.read1(_CHUNK):  # what one step decodes: no line lost before a break
            yield chunk
    elif suffix == ".jsonl.zst":
        # zstandard's stream reader ends quietly on a truncated stream; frame by frame with
        # decompressobj, whose `eof` tells a frame's true end
        zd = zstandard.ZstdDecompressor()
        d, mid_frame = zd.decompressobj(), False
        while piece := f.read(_ZSTD_PIECE):
            while piece:
                yield d.decompress(piece)
                mid_frame, piece = not d.eof, d.unused_data if d.eof else b""
                if d.eof:
                    d = zd.decompressobj()
        if mid_frame:
            raise EOFError("it ends inside a frame: truncated")
    else:
        while chunk := f.read(_CHUNK):
            yield chunk


def _lines(chunks: Iterable[bytes], max_bytes: int) -> Iterator[bytes | None]:
    """The lines of a byte stream without their line ends; None in place of a line over
    `max_bytes`, which is dropped as it streams past rather than held."""
    part, over = bytearray(), False  # the line so far; whether it is already too long
    for chunk in chunks:
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            if not over:
                part += chunk[start:end]
            yield None if over or len(part) > max_bytes else bytes(part)
            part.clear()
            over, start = False, end + 1
        if not over:
            part += chunk[start:]
            if len(part) > max_bytes:
                part.clear()
                over = True
    if part or over:  # a last line with no line end
        yield None if over else bytes(part)


def _json_record(number: int, line: bytes, text_field: str, domain_field: str | None, max_bytes: int) -> Record:
    try:
        row = json.loads(line.decode("utf-8"))
        if not isinstance(row, dict):
            return _bad(number, "bad_json", f"a JSON {type(row).__name__}, not an object")
        return _record(number, row, text_field, domain_field, max_bytes)
    except UnicodeDecodeError as e:
        return _bad(number, "not_utf8", f"not UTF-8 at byte {e.start} of the line")
    except RecursionError:
        return _bad(number, "bad_json", "not usable JSON (nested too deeply)")
    except ValueError as e:  # not JSON, or e.g. an integer of more than 4300 digits
        return _bad(number, "bad_json", f"not valid JSON ({e})")


# ----------------------------------------------------------------------------- Parquet


def _parquet_records(f: BinaryIO, text_field: str, domain_field: str | None, max_bytes: int) -> Iterator[Record]:
    # deferred on purpose: heavy, and only Parquet corpora need it
    import pyarrow as pa  # noqa: PLC0415
    import pyarrow.parquet as pq  # noqa: PLC0415

    broken = (pa.ArrowException, OSError, ValueError)
    try:
        pf = pq.ParquetFile(f)
        sizes = [pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)]
    except broken as e:
        yield _bad(1, "bad_parquet", f"not a readable Parquet file ({_one_line(e)}); not read")
        return
    first = 1  # the number of the group's first row
    for group, size in enumerate(sizes):
        number = first
        try:
            for batch in pf.iter_batches(batch_size=_PARQUET_BATCH, row_groups=[group]):
                for row in batch.to_pylist():
                    yield _record(number, row, text_field, domain_field, max_bytes)
                    number += 1
        except broken as e:
            yield _bad(
                number,
                "bad_row_group",
                f"row group {group + 1} cannot be read from row {number} on "
                f"({_one_line(e)}); rows {number}-{first + size - 1} lost",
            )
        first += size


# ----------------------------------------------------------------------------- both


def _record(number: int, row: dict[str, Any], text_field: str, domain_field: str | None, max_bytes: int) -> Record:
    """The record made of one parsed row (a dict the caller gives up)."""
    if text_field not in row:
        fields = ", ".join(_printable(str(k)) for k in list(row)[:12]) + (", …" if len(row) > 12 else "")
        return _bad(number, "no_text_field", f"no {text_field!r} field (its fields: {fields or 'none'})")
    text = row.pop(text_field)
    if not isinstance(text, str):
        return _bad(number, "text_not_string", f"{text_field!r} is {_kind(text)}, not a string")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as e:  # a lone surrogate, written in JSON as an escape like \ud800
        return _bad(number, "not_utf8", f"{text_field!r} holds an unpaired surrogate at character {e.start}")
    if size > max_bytes:
        return _bad(number, "too_large", f"{text_field!r} is over the limit of {max_bytes / 2**20:.1f} MiB a record")
    domain = None
    if domain_field is not None:
        domain = row.pop(domain_field, _MISSING)
        if not isinstance(domain, str) or not domain.strip():
            return _bad(number, "bad_domain", f"{domain_field!r} is {_kind(domain)}, not a non-empty string")
        domain = domain.strip()
    return Record(number, text, domain, {_printable(str(k)): _jsonable(v) for k, v in row.items()})


_MISSING = object()


def _kind(value: Any) -> str:
    if value is _MISSING:
        return "missing"
    return "null" if value is None else "empty" if isinstance(value, str) else type(value).__name__


def _jsonable(value: Any) -> Any:
    """A metadata value as JSON: scalars, lists and objects kept; anything else (a
    timestamp, a decimal, bytes, a non-finite float) as a string."""
    if isinstance(value, str):
        return _printable(value)
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {_printable(str(k)): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):  # a Parquet map comes as a list of (key, value)
        return [_jsonable(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return str(value)


def _printable(s: str) -> str:
    """`s`, with any lone surrogate written as `\\udXXX` so that it can be written as UTF-8."""
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return s.encode("utf-8", "backslashreplace").decode("utf-8")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _bad(number: int, reason: str, problem: str) -> Record:
    return Record(number, problem=problem, reason=reason)
