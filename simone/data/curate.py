"""The curate stage: read every corpus file, clean, deduplicate, flag, split and report.

    curate(corpus, data_dir, cfg) -> CurateResult

writes into `data_dir`:
  manifest.jsonl    one line per input file (every one, whatever became of it):
                    {path, domain, subdomain, status: kept|flagged|quarantined, reasons,
                     sha256, bytes, chars, words, dup_of, title, author, quality, split,
                     holdout, notes}; a record file has one line per record instead, `path`
                    its id `FILE#N` and `file`, `record` (N) after it
  documents.jsonl   one line per training/validation document (cleaned text):
                    {id, path, domain, subdomain, title, author, split, status,
                     quality_score, text}; a document with a held-out slice is two lines,
                    ids `PATH#train` and `PATH#val`, each with `slice`: [start, end], the
                    characters of the cleaned text it holds
  report.html       the curation report (self-contained; opens offline)
  curate.stamp.json inputs + settings fingerprint and the result, for reuse

Steps: (1) per file, in a process pool: decode, clean, metadata, stub/length/quality
rules, label check, word hashes -> MinHash signature and sampled 13-grams; the cleaned text
and the 13-grams are spooled to disk, never held for the whole corpus (the corpus-wide 13-gram
comparisons read them back a hash range at a time: dedup.py). Each record of a record file is
a document as a `.txt` of its text would be (its other fields stand for a sidecar's metadata),
with `curate.max_file_bytes` and `curate.max_file_seconds` per record, not per record file; a
record file is read by one worker (a corpus of several record files spreads over the workers).
(2) exact duplicates by hash of the cleaned text, then near duplicates by MinHash LSH; the
better copy is kept (its label fits its text, then higher quality score, then longer).
(3) split by document (a record with a string `id` field by that id, else by its path).
(4) contamination: validation documents sharing 13-grams with training.
(5) held-out slices: a domain left without a validation document (it has one document)
validates on the tail of its longest document, which is then trained on only up to the cut
(manifest `split`: "train+val-slice", `holdout`: where); a domain too short for that stops
curation with a `CorpusError`. (6) write the outputs. The corpus itself is only ever opened
for reading.

A hostile corpus cannot stop the stage or lose a file: every entry gets a manifest line,
nothing outside the corpus is read, a worker process that dies (out of memory, killed)
costs only the file it was reading, and each file has a CPU-time budget.

Reason codes and the status they give:
  quarantined  empty binary not_utf8 unreadable orphan_sidecar stub too_short
               exact_duplicate near_duplicate low_quality:<rule>
               outside_corpus (a link leading out of the corpus; never opened)
               not_regular_file (a FIFO, device, socket or folder named like a text; never opened)
               too_large (over curate.max_file_bytes; never read) timed_out (over
               curate.max_file_seconds of CPU) hidden (a dot-file or dot-folder; never read)
               symlinked_dir (a linked folder; never walked)
               bad_json no_text_field text_not_string bad_domain bad_compression
               bad_row_group bad_parquet (a record that is no document: see records.py)
  flagged      title_mismatch bad_sidecar contamination low_quality:repeated_passage
               low_quality:whitespace_share (mostly whitespace: a run of spaces inside a line)
  (kept)       encoding_fixed header_stripped boilerplate_stripped (what cleaning did)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing as mp
import os
import re
import shutil
import signal
import sys
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console, Group
from rich.markup import escape
from rich.table import Table
from tqdm import tqdm  # type: ignore[import-untyped]  # no stubs installed (types-tqdm)

from simone.config import Config
from simone.data.clean import DecodeProblem, clean_text, decode_bytes, is_stub
from simone.data.corpus import (
    CorpusError,
    SidecarError,
    SourceFile,
    UnsafeFile,
    discover_files,
    read_regular_file,
    read_sidecar,
    title_from_filename,
    too_large_note,
)
from simone.data.dedup import (
    DupCandidate,
    SpilledGrams,
    WordHasher,
    contained_pairs,
    minhash_permutations,
    minhash_signature,
    near_duplicates,
    ngram_hashes,
    overlap_counts,
    repeated_passages,
    sample_grams,
    shared_with,
)
from simone.data.labels import check_label
from simone.data.quality import WHITESPACE, DocTokens, assess, passes, whitespace_share
from simone.data.records import RECORD_REASONS, Record, iter_records, record_id
from simone.data.report import write_report
from simone.data.split import assign_splits, hold_out_slice, min_words_to_hold_out
from simone.data.status import NOT_DOCUMENTS, file_status
from simone.rundir import atomic_write_json, read_json

__all__ = ["CorpusError", "CurateResult", "curate", "print_summary", "summary"]

CURATE_VERSION = 1  # bump when the output of curation changes for the same inputs
SLICED = "train+val-slice"  # manifest split of a document whose tail is held out for validation
CONTAMINATION_SAMPLE = 4  # keep 1 in 4 distinct 13-grams (the same ones in every document)
_WHITESPACE_RUN = re.compile(r"\s+")


@dataclass
class CurateResult:
    """What curation did. Paths point into `data_dir`; counts are over input files."""

    corpus: str
    data_dir: str
    manifest: str
    documents: str
    report: str
    files: int = 0
    bytes_in: int = 0
    words_in: int = 0  # words of every decodable file as read, before any cleaning
    status_counts: dict[str, int] = field(default_factory=dict)  # kept / flagged / quarantined
    reason_counts: dict[str, int] = field(default_factory=dict)
    # {domain: {"train": {"docs", "words"}, "val": {"docs", "words", "slices"}, "dropped": {...}}},
    # and the same per "domain/subdomain"; a sliced document counts as a training doc, its
    # held-out tail as a validation slice (val words include the slices' words)
    domains: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    subdomains: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    documents_train: int = 0
    documents_val: int = 0
    val_slices: int = 0  # documents whose tail is held out for validation (see SLICED)
    words_train: int = 0
    words_val: int = 0
    duplicate_clusters: list[dict[str, Any]] = field(default_factory=list)
    contaminated: list[dict[str, Any]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # non-.txt files seen, not inputs
    warnings: list[str] = field(default_factory=list)  # e.g. a domain left without validation
    enabled: bool = True
    strict: bool = False
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)  # seconds per step
    reused: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- per-file work


@dataclass
class _Settings:
    """What a worker needs (picklable; no Config so workers never import more than this)."""

    enabled: bool
    min_words: int
    window_words: int
    shingle_words: int
    contamination_ngram: int
    repeated_passage_words: int
    domain_relax: dict[str, float]
    perms: tuple[np.ndarray, np.ndarray] | None
    spool: str
    max_file_bytes: int
    max_file_seconds: float
    text_field: str
    domain_field: str | None


_hasher: WordHasher | None = None  # one per worker process: token -> hash cache


def _process_file(args: tuple[int, SourceFile, _Settings]) -> list[dict[str, Any]]:
    """Everything about one file that does not need the other files: its manifest record,
    or one for each record of a record file (read a record at a time).

    A file or record that breaks the processing itself is reported (as `unreadable`, with
    the error, or `timed_out`), never allowed to stop the stage: read anything, lose nothing.
    """
    index, sf, st = args
    marker = _started_marker(st, index)
    marker.touch()  # names the file in hand if this worker dies (see _run_workers)
    try:
        if sf.kind != "records":
            return [_process_one(index, sf, st)]
        recs = []
        try:
            for record in iter_records(sf.path, st.text_field, st.domain_field, st.max_file_bytes):
                one = dataclasses.replace(sf, rel=record_id(sf.rel, record.number), size=0)  # its bytes: its text's
                recs.append(_process_one(index, one, st, record) | {"file": sf.rel, "record": record.number})
        except Exception as e:  # the reader itself failed: the records read so far stay
            recs.append(_failed_record(index, sf, "unreadable", f"{sf.rel}: reading stopped ({type(e).__name__}: {e})"))
        return recs
    finally:
        marker.unlink(missing_ok=True)


def _process_one(index: int, sf: SourceFile, st: _Settings, record: Record | None = None) -> dict[str, Any]:
    """One file (or one record of a record file) within its CPU-time budget."""
    try:
        with _cpu_time_limit(st.max_file_seconds):
            return _process_file_inner(index, sf, st) if record is None else _process_record(index, sf, st, record)
    except _FileTimeout:
        return _failed_record(
            index,
            sf,
            "timed_out",
            f"{sf.rel}: processing used more than {st.max_file_seconds:g} s of CPU (curate.max_file_seconds); given up",
        )
    except Exception as e:
        return _failed_record(index, sf, "unreadable", f"{sf.rel}: could not be processed ({type(e).__name__}: {e})")


def _failed_record(index: int, sf: SourceFile, code: str, note: str) -> dict[str, Any]:
    return _problem(_blank_record(index, sf) | {"status": "quarantined"}, code, note)


def _started_marker(st: _Settings, index: int) -> Path:
    return Path(st.spool) / f"{index}.started"


class _FileTimeout(Exception):
    """Raised by the CPU-time alarm inside the work on one file."""


_armed = False  # the alarm raises only while a file is being processed


def _on_cpu_alarm(signum, frame) -> None:
    if _armed:
        raise _FileTimeout()


@contextmanager
def _cpu_time_limit(seconds: float):
    """Raise `_FileTimeout` after `seconds` of CPU time (a regular expression or a
    pathological text cannot spin forever). CPU time, not wall time, so a loaded machine
    does not time files out; a no-op off the main thread, where signals cannot be set."""
    global _armed
    if (
        not seconds
        or seconds <= 0
        or threading.current_thread() is not threading.main_thread()
        or not hasattr(signal, "setitimer")
    ):
        yield
        return
    previous = signal.signal(signal.SIGVTALRM, _on_cpu_alarm)
    _armed = True
    signal.setitimer(signal.ITIMER_VIRTUAL, seconds)
    try:
        yield
    finally:
        _armed = False
        signal.setitimer(signal.ITIMER_VIRTUAL, 0)
        signal.signal(signal.SIGVTALRM, previous)


def _blank_record(index: int, sf: SourceFile) -> dict[str, Any]:
    return {
        "path": sf.rel,
        "domain": sf.domain,
        "subdomain": sf.subdomain,
        "status": "kept",
        "reasons": [],
        "sha256": None,
        "bytes": sf.size,
        "chars": 0,
        "words": 0,
        "dup_of": None,
        "title": None,
        "author": None,
        "quality": {},
        "notes": {},
        "_index": index,
    }


def _problem(rec: dict[str, Any], code: str, note: str) -> dict[str, Any]:
    rec["reasons"].append(code)
    rec["notes"][code] = note
    return rec


def _process_file_inner(index: int, sf: SourceFile, st: _Settings) -> dict[str, Any]:
    rec = _blank_record(index, sf)
    problem = partial(_problem, rec)
    if sf.kind in ("unreadable", "skipped"):  # never opened
        if sf.reason in NOT_DOCUMENTS:
            rec["_not_a_document"] = True
        return problem(sf.reason or "unreadable", sf.problem or "cannot open")
    if sf.size > st.max_file_bytes:
        return problem("too_large", f"{sf.rel}: {too_large_note(sf.size, st.max_file_bytes)} (curate.max_file_bytes)")
    if sf.kind == "orphan_sidecar":
        try:
            _read_raw(sf.path, rec, st.max_file_bytes)
        except UnsafeFile as e:
            return problem(e.code, f"{sf.rel}: {e.message}")
        return problem("orphan_sidecar", sf.problem or "sidecar without its text")

    # metadata: sidecar first, header block fills in what it lacks
    meta: dict[str, Any] = {}
    if sf.sidecar_problem is not None:
        problem("bad_sidecar", sf.sidecar_problem)
    elif sf.sidecar is not None:
        try:
            meta = read_sidecar(sf.sidecar)
        except SidecarError as e:
            problem("bad_sidecar", f"{sf.sidecar.name}: {e}")
    try:
        raw = _read_raw(sf.path, rec, st.max_file_bytes)
    except UnsafeFile as e:
        return problem(e.code, f"{sf.rel}: {e.message}")
    return _process_text(rec, sf, st, raw, meta)


def _process_record(index: int, sf: SourceFile, st: _Settings, record: Record) -> dict[str, Any]:
    """One record of a record file (`sf.rel` its id): processed as a `.txt` of its text with
    its other fields for a sidecar, or, for a record that is no document, its reason."""
    rec = _blank_record(index, sf) | {"_index": f"{index}-{record.number}"}
    if record.reason:
        return _problem(rec, record.reason, f"{sf.rel}: {record.problem}")
    raw = (record.text or "").encode("utf-8")
    rec["bytes"], rec["sha256"] = len(raw), hashlib.sha256(raw).hexdigest()
    if isinstance(record.meta.get("id"), str):  # its own id decides its split (see _split_keys)
        rec["_id"] = record.meta["id"]
    return _process_text(rec, sf, st, raw, record.meta, record.domain)


def _process_text(
    rec: dict[str, Any], sf: SourceFile, st: _Settings, raw: bytes, meta: dict[str, Any], domain: str | None = None
) -> dict[str, Any]:
    """The rest of `rec` from a document's bytes and metadata: decoding, cleaning, the quality
    and label rules, the hashes for deduplication; `domain` (a record's) overrides the folder's."""
    global _hasher
    if _hasher is None:
        _hasher = WordHasher()
    problem = partial(_problem, rec)
    if not raw.strip():
        return problem("empty", f"{sf.rel}: empty" if not raw else f"{sf.rel}: only whitespace")
    try:
        text, encoding = decode_bytes(raw)
    except DecodeProblem as e:
        return problem(e.code, f"{sf.rel}: {e.message}")
    del raw

    rec["raw_words"] = len(text.split())
    cleaned = clean_text(text, curate=st.enabled)
    del text
    if encoding:
        cleaned.reasons.insert(0, "encoding_fixed")
        cleaned.notes["encoding_fixed"] = f"decoded as {encoding}"
    for code in cleaned.reasons:
        if code not in rec["reasons"]:
            rec["reasons"].append(code)
    rec["notes"].update(cleaned.notes)
    for key, value in (cleaned.header or {}).items():
        meta.setdefault(key, value)
    meta_title = _str_or_none(meta.get("title"))
    rec["title"] = meta_title or title_from_filename(sf.rel)
    rec["author"] = _str_or_none(meta.get("author"))
    rec["quality_score"] = _float_or_none(meta.get("quality_score"))
    if not sf.folder_domain:
        rec["domain"] = _str_or_none(meta.get("category")) or rec["domain"]
        rec["subdomain"] = _str_or_none(meta.get("subcategory")) or rec["subdomain"]
    elif not sf.subdomain:
        rec["subdomain"] = _str_or_none(meta.get("subcategory")) or ""
    if domain:  # --domain-field: the record names its domain
        rec["domain"] = domain

    body = cleaned.text
    rec["chars"] = len(body)
    rec["words"] = len(body.split())
    rec["clean_sha256"] = hashlib.sha256(body.encode("utf-8")).hexdigest()
    if not body:
        return problem("empty", f"{sf.rel}: no text left after removing the header and boilerplate")

    if st.enabled:
        stub = is_stub(body, rec["words"])
        if stub:
            return problem("stub", f"{sf.rel}: placeholder text ({stub!r})")
        if rec["words"] < st.min_words:
            return problem("too_short", f"{sf.rel}: {rec['words']} words (< {st.min_words})")
        tokens = DocTokens.of(body, _hasher)
        relax = float(st.domain_relax.get(rec["domain"], 0.0))
        values, failed = assess(body, tokens, st.window_words, _hasher, relax)
        grams = ngram_hashes(tokens.hashes, st.contamination_ngram)
        longest, share = repeated_passages(grams, st.contamination_ngram)
        values["repeated_passage_words"] = longest
        values["repeated_share"] = round(share, 4)
        rec["quality"] = values
        for rule in failed:
            problem(
                f"low_quality:{rule}",
                f"{rule} = {values[rule]} fails in {values.get(rule + '_failed_windows')} of {values['windows']} windows",
            )
        if longest >= st.repeated_passage_words:
            problem(
                "low_quality:repeated_passage",
                f"a passage of {longest} words occurs more than once ({share:.0%} of the text is repeated)",
            )
        blank = values["whitespace_share"] = round(whitespace_share(body), 4)
        if not passes(WHITESPACE, blank, relax):
            longest_run = max(map(len, _WHITESPACE_RUN.findall(body)))
            problem(
                f"low_quality:{WHITESPACE.name}",
                f"{blank:.0%} of its {rec['chars']:,} characters are whitespace "
                f"(at most {WHITESPACE.high:.0%}); the longest run is {longest_run:,} characters",
            )
        # a title guessed from the file name is no claim to check
        mismatch = check_label(meta_title, rec["author"], body, cleaned.named_titles) if meta_title else None
        if mismatch:
            problem("title_mismatch", mismatch)
        if st.perms is None:  # set by the worker's initializer; never missing in a worker
            raise RuntimeError("curation worker started without its MinHash permutations")
        rec["_signature"] = minhash_signature(ngram_hashes(tokens.hashes, st.shingle_words), st.perms)
        # on disk until the corpus-wide comparisons read them a hash range at a time
        rec["_grams"] = SpilledGrams.append(
            str(Path(st.spool) / f"grams.{os.getpid()}"), sample_grams(grams, CONTAMINATION_SAMPLE)
        )
    spooled = Path(st.spool) / f"{rec['_index']}.txt"
    spooled.write_text(body, encoding="utf-8")
    rec["_spool"] = str(spooled)
    return rec


def _read_raw(path: Path, rec: dict[str, Any], max_bytes: int) -> bytes:
    raw = read_regular_file(path, max_bytes)  # read-only, regular files only, bounded
    rec["bytes"] = len(raw)
    rec["sha256"] = hashlib.sha256(raw).hexdigest()
    return raw


def _str_or_none(v: Any) -> str | None:
    return str(v).strip() or None if v is not None else None


def _float_or_none(v: Any) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


# ----------------------------------------------------------------------------- the stage


VALIDATION_DIR_PREFIX = "validation_dir:"  # document ids of files from data.validation_dir


def curate(corpus: str | Path, data_dir: str | Path, cfg: Config, progress: bool = True) -> CurateResult:
    """Curate `corpus` into `data_dir` (see the module docstring); returns what it did.

    Raises `CorpusError` if the corpus is missing or holds no `.txt` file. Re-running with
    the same inputs and settings returns the previous result without redoing the work.
    """
    t0 = time.time()
    corpus, data_dir = Path(corpus), Path(data_dir)
    entries = discover_files(corpus)
    if cfg.data.validation_dir:  # a pre-split validation folder (the original --validation_dir)
        val_entries = discover_files(cfg.data.validation_dir)
        for sf in val_entries:  # ids distinct from the training corpus's, domain from its own folders
            sf.rel = VALIDATION_DIR_PREFIX + sf.rel
        entries += val_entries
    files = [sf for sf in entries if sf.kind != "ignored"]
    ignored = [sf.rel for sf in entries if sf.kind == "ignored"]
    data_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "manifest": data_dir / "manifest.jsonl",
        "documents": data_dir / "documents.jsonl",
        "report": data_dir / "report.html",
    }
    stamp_path = data_dir / "curate.stamp.json"
    fingerprint = _fingerprint(files, cfg)
    previous = read_json(stamp_path)
    if (
        previous
        and previous.get("fingerprint") == fingerprint
        and all(Path(p).is_file() for p in (paths["manifest"], paths["documents"], paths["report"]))
    ):
        try:
            result = CurateResult(**previous["result"])
            result.reused = True
            return result
        except TypeError:  # written by a different version: redo the work
            pass

    c = cfg.curate
    spool = data_dir / ".curate_spool"
    shutil.rmtree(spool, ignore_errors=True)
    spool.mkdir(parents=True)
    settings = _Settings(
        enabled=c.enabled,
        min_words=c.min_words,
        window_words=c.quality_window_words,
        shingle_words=c.shingle_words,
        contamination_ngram=c.contamination_ngram,
        repeated_passage_words=c.repeated_passage_words,
        domain_relax=dict(c.domain_relax),
        perms=minhash_permutations(c.minhash_perms) if c.enabled else None,
        spool=str(spool),
        max_file_bytes=c.max_file_bytes,
        max_file_seconds=c.max_file_seconds,
        text_field=cfg.data.text_field,
        domain_field=cfg.data.domain_field,
    )
    stamp_path.unlink(missing_ok=True)  # a run that dies half way must not look reusable
    timings: dict[str, float] = {}
    clock = [t0]

    def lap(name: str) -> None:
        now = time.time()
        timings[name] = round(now - clock[0], 2)
        clock[0] = now

    lap("scan")
    try:
        records = _run_workers(files, settings, c.workers, progress)
        _refuse_unknown_text_field(records, cfg.data.text_field, corpus)
        records.sort(key=lambda r: (r.get("file", r["path"]), r.get("record", 0)))  # a file's records in file order
        lap("clean_and_hash")
        clusters = (
            _deduplicate(records, c.near_dup_threshold, c.minhash_perms, c.containment_threshold) if c.enabled else []
        )
        for r in records:
            r["status"] = file_status(r["reasons"])
        lap("deduplicate")
        included = [r for r in records if r["status"] == "kept" or (r["status"] == "flagged" and not c.strict)]
        # flagged files train, but validate only when a domain has too few clean ones
        key = _split_keys(included)
        by_key = assign_splits(
            [(key[r["path"]], r["domain"]) for r in included],
            cfg.data.val_fraction,
            cfg.data.split_seed,
            cfg.data.min_val_docs_per_domain,
            avoid_val={key[r["path"]] for r in included if r["status"] == "flagged"},
        )
        splits = {path: by_key[k] for path, k in key.items()}
        if cfg.data.validation_dir:  # the user split it: their validation folder is validation, the rest trains
            splits = {r["path"]: "val" if r["path"].startswith(VALIDATION_DIR_PREFIX) else "train" for r in included}
        for r in records:
            r["split"] = splits.get(r["path"])
        contaminated = _contamination(included, c.contamination_threshold, c.decontaminate) if c.enabled else []
        for r in records:
            r["status"] = file_status(r["reasons"])
            if c.strict and r["status"] == "flagged":
                r["split"] = None
        slice_notes = _hold_out_slices(records, cfg, corpus)
        lap("split_and_contamination")
        result = _result(corpus, data_dir, paths, records, clusters, contaminated, cfg)
        result.warnings += slice_notes
        result.ignored = ignored
        _write_manifest(paths["manifest"], records)
        _write_documents(paths["documents"], records)
        lap("write")
        write_report(paths["report"], result, records)
        lap("report")
    finally:
        shutil.rmtree(spool, ignore_errors=True)
    result.timings = timings
    result.seconds = round(time.time() - t0, 2)
    atomic_write_json(stamp_path, {"fingerprint": fingerprint, "version": CURATE_VERSION, "result": result.to_dict()})
    return result


def _split_keys(included: list[dict[str, Any]]) -> dict[str, str]:
    """{path: what its split is decided by}: the path, or a record's own `id` field when that is
    a string no other document has, so a record file reordered or grown moves no record between
    splits, and a .txt corpus written as records with the paths as ids splits as before."""
    paths = {r["path"] for r in included}
    ids = Counter(r.get("_id") for r in included)
    unique = {i for i, n in ids.items() if i is not None and n == 1 and i not in paths}
    return {r["path"]: r["_id"] if r.get("_id") in unique else r["path"] for r in included}


def _refuse_unknown_text_field(records: list[dict[str, Any]], text_field: str, corpus: Path) -> None:
    """Records lacking the text field while none has it: a wrong --text-field, not bad data."""
    lacking = [r for r in records if r.get("record") and r["reasons"][:1] == ["no_text_field"]]
    has_it = (  # a record that got past the text field (a bad JSON line cannot tell)
        r["reasons"][:1] in (["text_not_string"], ["bad_domain"]) or not set(r["reasons"]) & RECORD_REASONS
        for r in records
        if r.get("record")
    )
    if lacking and not any(has_it):
        raise CorpusError(
            f"{corpus}: no record has the text field {text_field!r} (--text-field, data.text_field), "
            f"e.g. {lacking[0]['notes']['no_text_field']}"
        )


def _run_workers(files: list[SourceFile], st: _Settings, workers: int, progress: bool) -> list[dict[str, Any]]:
    jobs = [(i, sf, st) for i, sf in enumerate(files)]
    jobs.sort(key=lambda j: -j[1].size)  # biggest first: the pool ends together
    n = workers or os.cpu_count() or 1
    n = max(1, min(n, len(jobs)))
    bar = None
    if progress:
        bar = tqdm(
            total=sum(sf.size for sf in files), unit="B", unit_scale=True, desc="curate", file=sys.stderr, leave=False
        )
    records: list[dict[str, Any]] = []

    def take(sf: SourceFile, recs: list[dict[str, Any]]) -> None:
        records.extend(recs)
        if bar is not None:
            bar.update(sf.size)

    try:
        if n == 1:
            for job in jobs:
                take(job[1], _process_file(job))
        else:
            # fork on Linux (fast start, no re-import of __main__), spawn elsewhere
            ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
            pending = jobs
            while pending:
                unfinished = _pool_pass(pending, n, ctx, take)
                # a worker died (out of memory, killed): the files it had in hand are
                # suspects, each retried alone; the rest never started and go round again
                in_hand = [j for j in unfinished if _started_marker(st, j[0]).exists()] or unfinished
                suspects = {j[0] for j in in_hand}
                pending = [j for j in unfinished if j[0] not in suspects]
                for job in in_hand:
                    _started_marker(st, job[0]).unlink(missing_ok=True)
                    if _pool_pass([job], 1, ctx, take):
                        died = "the worker process reading it died (killed, e.g. out of memory); the rest was processed"
                        take(job[1], [_failed_record(job[0], job[1], "unreadable", f"{job[1].rel}: {died}")])
    finally:
        if bar is not None:
            bar.close()
    return records


def _pool_pass(jobs: list, n: int, ctx, take) -> list:
    """Run `jobs` in a fresh pool of `n` processes, passing each record to `take`;
    returns the jobs left without a record because a worker died."""
    futures: dict[Any, Any] = {}
    done: set[int] = set()  # job indices whose record was taken
    try:
        with ProcessPoolExecutor(max_workers=n, mp_context=ctx) as pool:
            for job in jobs:
                futures[pool.submit(_process_file, job)] = job
            for fut in as_completed(futures):
                take(futures[fut][1], fut.result())  # BrokenProcessPool when a worker died
                done.add(futures[fut][0])
    except BrokenProcessPool:
        pass
    for fut, job in futures.items():  # finished before the break, not yet collected
        if job[0] not in done and fut.done() and not fut.cancelled() and fut.exception() is None:
            take(job[1], fut.result())
            done.add(job[0])
    return [job for job in jobs if job[0] not in done]


def _rank(r: dict[str, Any]) -> tuple:
    """Which copy of a duplicate to keep: one whose label fits its text, then the higher
    quality score, then the longer, then the first path (so the choice is deterministic)."""
    return ("title_mismatch" in r["reasons"], -(r.get("quality_score") or 0.0), -r["words"], r["path"])


def _deduplicate(
    records: list[dict[str, Any]], threshold: float, num_perm: int, containment: float
) -> list[dict[str, Any]]:
    """Mark exact and near duplicates (quarantined, with `dup_of`); return the clusters.

    Near: MinHash Jaccard >= `threshold` over word 5-grams, or at least `containment` of
    a document's 13-grams inside a longer document.
    """
    live = [r for r in records if file_status(r["reasons"]) != "quarantined" and "_signature" in r]
    clusters: dict[str, list[tuple[str, str, float]]] = defaultdict(list)  # kept -> [(dup, kind, sim)]
    by_hash: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in live:
        by_hash[r["clean_sha256"]].append(r)
    survivors = []
    for group in by_hash.values():
        group.sort(key=_rank)
        survivors.append(group[0])
        for dup in group[1:]:
            dup["reasons"].append("exact_duplicate")
            dup["dup_of"] = group[0]["path"]
            dup["notes"]["exact_duplicate"] = f"same cleaned text as {group[0]['path']}"
            clusters[group[0]["path"]].append((dup["path"], "exact", 1.0))
    by_path = {r["path"]: r for r in survivors}
    cands = [DupCandidate(r["path"], r["_signature"], _rank(r)) for r in survivors]
    near_dropped = near_duplicates(cands, threshold, num_perm)
    for dropped, (kept, sim) in near_dropped.items():
        r = by_path[dropped]
        r["reasons"].append("near_duplicate")
        r["dup_of"] = kept
        r["notes"]["near_duplicate"] = f"~{sim:.0%} of word 5-grams shared with {kept}"
        clusters[kept].append((dropped, "near", round(sim, 3)))
    # a short work copied inside a longer one (an anthology, a collected edition)
    alive = [r for r in survivors if r["path"] not in near_dropped]
    pairs = contained_pairs([r["_grams"] for r in alive], containment)
    dropped_now: set[int] = set()
    for i, j, share in sorted(pairs, key=lambda p: (len(alive[p[0]]["_grams"]), alive[p[0]]["path"], -p[2])):
        small, big = alive[i], alive[j]
        if i in dropped_now or j in dropped_now or len(small["_grams"]) > len(big["_grams"]):
            continue
        if len(small["_grams"]) == len(big["_grams"]) and _rank(small) < _rank(big):
            continue  # the same text twice: the better-ranked copy stays
        small["reasons"].append("near_duplicate")
        small["dup_of"] = big["path"]
        small["notes"]["near_duplicate"] = f"{share:.0%} of its 13-grams occur inside {big['path']}"
        clusters[big["path"]].append((small["path"], "contained", round(share, 3)))
        dropped_now.add(i)
    return [
        {"kept": k, "copies": [{"path": p, "kind": kind, "similarity": s} for p, kind, s in sorted(v)]}
        for k, v in sorted(clusters.items())
    ]


def _contamination(included: list[dict[str, Any]], threshold: float, move: bool) -> list[dict[str, Any]]:
    """Validation documents sharing >= `threshold` of their (sampled) 13-grams with training."""
    train = [r["_grams"] for r in included if r["split"] == "train" and "_grams" in r]
    val = [r for r in included if r["split"] == "val" and len(r.get("_grams", ())) > 0]
    hits, n_train_grams = shared_with([r["_grams"] for r in val], train)
    if n_train_grams == 0:
        return []
    shares = [hit / len(r["_grams"]) for r, hit in zip(val, hits, strict=True)]
    flagged = [r for r, shared in zip(val, shares, strict=True) if shared >= threshold]
    sources = dict(zip(map(id, flagged), _largest_overlaps(flagged, included, move), strict=True))
    out = []
    for r, shared in zip(val, shares, strict=True):
        r["quality"]["train_13gram_overlap"] = round(shared, 4)
        if shared >= threshold:
            source, source_share = sources[id(r)]
            r["reasons"].append("contamination")
            note = f"{shared:.0%} of its 13-grams also occur in training documents ({source_share:.0%} in {source})"
            if move:
                r["split"] = "train"
                note += " (moved to train by --decontaminate)"
            r["notes"]["contamination"] = note
            out.append(
                {
                    "path": r["path"],
                    "domain": r["domain"],
                    "overlap": round(shared, 4),
                    "moved": move,
                    "source": source,
                    "source_overlap": round(source_share, 4),
                }
            )
    return out


def _largest_overlaps(
    flagged: list[dict[str, Any]], included: list[dict[str, Any]], move: bool
) -> list[tuple[str, float]]:
    """For each contaminated validation document, the training document sharing the most of its
    13-grams (the first such in `included`), and the share; ("", 0.0) when none shares any. With
    `move`, the contaminated documents before it count as training (--decontaminate moves them)."""
    at = {id(r): k for k, r in enumerate(flagged)}
    pool = [t for t in included if (t["split"] == "train" or (move and id(t) in at)) and len(t.get("_grams", ())) > 0]
    moved_at = np.array([at.get(id(t), -1) for t in pool], dtype=np.int64)  # -1: trains anyway
    best = []
    group = max(1, (1 << 22) // max(1, len(pool)))  # documents a counts matrix holds (<= 32 MB)
    for first in range(0, len(flagged), group):
        queries = flagged[first : first + group]
        counts = overlap_counts([r["_grams"] for r in queries], [t["_grams"] for t in pool])
        for k, (r, row) in enumerate(zip(queries, counts, strict=True)):
            share = np.where(moved_at < first + k, row / len(r["_grams"]), -1.0)
            j = int(np.argmax(share)) if len(pool) else 0
            best.append((pool[j]["path"], float(share[j])) if len(pool) and share[j] > 0 else ("", 0.0))
    return best


def _hold_out_slices(records: list[dict[str, Any]], cfg: Config, corpus: Path) -> list[str]:
    """Give each domain without a validation document a held-out slice: the tail of its
    longest document (a clean one before a flagged one), at least `data.min_val_words` words.

    Marks that record's split SLICED and sets `holdout`; returns warnings for domains that
    had documents to spare but lost them (--decontaminate). Raises `CorpusError` when no
    document of such a domain is long enough: training could never be evaluated.
    """
    by_domain: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        if r.get("split") in ("train", "val"):
            by_domain[r["domain"]].append(r)
    notes = []
    fraction, min_words = cfg.data.val_fraction, cfg.data.min_val_words
    for domain, docs in sorted(by_domain.items()):
        if any(r["split"] == "val" for r in docs):
            continue
        candidates = sorted(
            (r for r in docs if "_spool" in r), key=lambda r: (r["status"] != "kept", -r["words"], r["path"])
        )
        for r in candidates:
            text = Path(r["_spool"]).read_text(encoding="utf-8")
            cut = hold_out_slice(text, fraction, min_words)
            if cut is not None:
                r["split"] = SLICED
                r["holdout"] = {
                    "start_char": cut.start,
                    "end_char": len(text),
                    "words": cut.words,
                    "train_words": cut.train_words,
                }
                if len(docs) > 1:
                    why = " (--decontaminate moved them to training)" if cfg.curate.decontaminate else ""
                    notes.append(
                        f"domain {domain!r} has no validation documents{why}: "
                        f"validates on a held-out slice of {r['path']}"
                    )
                break
        else:
            need = min_words_to_hold_out(min_words)
            words = sum(r["words"] for r in docs)
            have = f"{words:,} words of text in domain {domain!r}"
            if len(docs) > 1:
                have += f" but no validation document, and its longest document has {max(r['words'] for r in docs):,}"
            raise CorpusError(
                f"{corpus}: corpus has {have}; need at least {need:,} to hold out validation "
                f"({min_words} words, data.min_val_words, to validate on and as many to train on): "
                f"add text or lower data.min_val_words"
            )
    return notes


def _result(
    corpus: Path,
    data_dir: Path,
    paths: dict[str, Path],
    records: list[dict[str, Any]],
    clusters,
    contaminated,
    cfg: Config,
) -> CurateResult:
    res = CurateResult(
        corpus=str(corpus),
        data_dir=str(data_dir),
        manifest=str(paths["manifest"]),
        documents=str(paths["documents"]),
        report=str(paths["report"]),
        files=len(records),
        enabled=cfg.curate.enabled,
        strict=cfg.curate.strict,
    )
    res.bytes_in = sum(r["bytes"] or 0 for r in records)
    res.words_in = sum(r.get("raw_words", r["words"]) for r in records)  # as read, before cleaning
    res.status_counts = dict(Counter(r["status"] for r in records))
    for s in ("kept", "flagged", "quarantined"):
        res.status_counts.setdefault(s, 0)
    res.reason_counts = dict(sorted(Counter(code for r in records for code in r["reasons"]).items()))
    domains: dict[str, dict[str, dict[str, int]]] = {}
    subs: dict[str, dict[str, dict[str, int]]] = {}
    for r in records:
        if r.get("_not_a_document"):
            continue
        for table, key in (
            (domains, r["domain"]),
            (subs, f"{r['domain']}/{r['subdomain']}" if r["subdomain"] else r["domain"]),
        ):
            entry = table.setdefault(
                key,
                {
                    "train": {"docs": 0, "words": 0},
                    "val": {"docs": 0, "words": 0, "slices": 0},
                    "dropped": {"docs": 0, "words": 0},
                },
            )
            if r["split"] == SLICED:
                held = r["holdout"]["words"]
                entry["train"]["docs"] += 1
                entry["train"]["words"] += r["words"] - held
                entry["val"]["slices"] += 1
                entry["val"]["words"] += held
                continue
            slot = r["split"] or "dropped"
            entry[slot]["docs"] += 1
            entry[slot]["words"] += r["words"]
    res.domains = dict(sorted(domains.items()))
    res.subdomains = dict(sorted(subs.items()))
    res.documents_train = sum(d["train"]["docs"] for d in domains.values())
    res.documents_val = sum(d["val"]["docs"] for d in domains.values())
    res.words_train = sum(d["train"]["words"] for d in domains.values())
    res.words_val = sum(d["val"]["words"] for d in domains.values())
    res.val_slices = sum(d["val"]["slices"] for d in domains.values())
    res.duplicate_clusters = clusters
    res.contaminated = contaminated
    return res


_MANIFEST_KEYS = (
    "path",
    "domain",
    "subdomain",
    "status",
    "reasons",
    "sha256",
    "bytes",
    "chars",
    "words",
    "dup_of",
    "title",
    "author",
    "quality_score",
    "quality",
    "split",
    "holdout",
    "notes",
)


def manifest_line(r: dict[str, Any]) -> dict[str, Any]:
    line = {k: r.get(k) for k in _MANIFEST_KEYS}
    if "record" in r:  # a record of a record file: which file, which record
        return {"path": r["path"], "file": r["file"], "record": r["record"]} | line
    return line


def _write_manifest(path: Path, records: list[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(manifest_line(r), ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _write_documents(path: Path, records: list[dict[str, Any]]) -> None:
    """Stream the spooled cleaned texts of the included documents into documents.jsonl;
    a document with a held-out slice becomes its `#train` part and its `#val` part."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            if r.get("split") is None or "_spool" not in r:
                continue
            text = Path(r["_spool"]).read_text(encoding="utf-8")
            line = {
                "id": r["path"],
                "path": r["path"],
                "domain": r["domain"],
                "subdomain": r["subdomain"],
                "title": r["title"],
                "author": r["author"],
                "split": r["split"],
                "status": r["status"],
                "quality_score": r.get("quality_score"),
                "text": text,
            }
            if r["split"] != SLICED:
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
                continue
            cut = r["holdout"]["start_char"]
            for split, (a, b) in (("train", (0, cut)), ("val", (cut, len(text)))):
                part = line | {"id": f"{r['path']}#{split}", "split": split, "slice": [a, b], "text": text[a:b]}
                f.write(json.dumps(part, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _fingerprint(files: list[SourceFile], cfg: Config) -> str:
    inputs = [
        (sf.rel, sf.kind, sf.reason, sf.sidecar_problem, sf.size, sf.mtime_ns, _stat_key(sf.sidecar)) for sf in files
    ]
    settings = {  # the number of workers changes nothing in the output
        "curate": {k: v for k, v in dataclasses.asdict(cfg.curate).items() if k != "workers"},
        "data": {k: v for k, v in dataclasses.asdict(cfg.data).items() if k != "data_dir"},
    }
    blob = json.dumps([CURATE_VERSION, _code_digest(), inputs, settings], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _code_digest() -> str:
    """Hash of the curation code itself: a changed rule must not reuse an old result."""
    here = Path(__file__).parent
    h = hashlib.sha256()
    for name in ("corpus", "records", "clean", "dedup", "quality", "labels", "split", "status", "curate", "report"):
        with suppress(OSError):
            h.update((here / f"{name}.py").read_bytes())
    return h.hexdigest()


def _stat_key(path: Path | None) -> tuple[int, int] | None:
    if path is None:
        return None
    try:
        st = os.stat(path)
        return (st.st_size, st.st_mtime_ns)
    except OSError:
        return None


# ----------------------------------------------------------------------------- terminal


def summary(result: CurateResult) -> Group:
    """What curation did, for the end of the stage: the counts, a rich table by domain, the
    warnings and where the manifest and report are (rendered by the caller's console).

    Every name from the corpus (domains, file names, paths) is escaped: a file called
    `notes[/].md` is Rich markup, and would otherwise crash the summary on every rerun."""
    head = "reused previous curation" if result.reused else f"curated in {result.seconds:.1f}s"
    sc = result.status_counts
    parts: list = [
        f"[bold]curate[/bold]: {result.files} files, {result.bytes_in / 1e6:.1f} MB, {result.words_in:,} words — "
        f"[green]{sc.get('kept', 0)} kept[/green], [yellow]{sc.get('flagged', 0)} flagged[/yellow], "
        f"[red]{sc.get('quarantined', 0)} quarantined[/red] ({head})"
    ]
    table = Table(
        title="documents and words by domain (words after cleaning; dropped = files left out; "
        "val slices = held-out tails of training documents)"
    )
    for col in ("domain", "train", "train words", "val", "val slices", "val words", "dropped"):
        table.add_column(col, justify="left" if col == "domain" else "right", no_wrap=True)
    for domain, d in result.domains.items():
        table.add_row(
            escape(domain),
            str(d["train"]["docs"]),
            f"{d['train']['words']:,}",
            str(d["val"]["docs"]),
            str(d["val"].get("slices", 0)),
            f"{d['val']['words']:,}",
            str(d["dropped"]["docs"]),
        )
    table.add_row(
        "[bold]total",
        str(result.documents_train),
        f"{result.words_train:,}",
        str(result.documents_val),
        str(result.val_slices),
        f"{result.words_val:,}",
        "",
    )
    parts.append(table)
    parts += [f"[yellow]warning[/yellow]: {escape(warning)}" for warning in result.warnings]
    if result.ignored:
        parts.append(
            f"not inputs (ignored): {escape(', '.join(result.ignored[:5]))}{' …' if len(result.ignored) > 5 else ''}"
        )
    if result.reason_counts:
        parts.append("reasons: " + escape(", ".join(f"{k} {v}" for k, v in result.reason_counts.items())))
    parts.append(f"manifest: {escape(result.manifest)}\nreport:   {escape(result.report)}")
    return Group(*parts)


def print_summary(result: CurateResult, console: Console) -> None:
    """The `summary` on `console` (the caller's: scripts and tests)."""
    console.print(summary(result))
