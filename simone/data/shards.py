"""Token shards: `documents.jsonl` -> `train.bin`, `val.bin` (flat token streams) + `index.json`.

Each split is one flat array of token ids on disk (uint16 when the vocabulary fits, else
uint32), every document followed by the end-of-document token. Documents are grouped by
domain (domains in sorted order, documents in file order inside a domain), so each domain
is ONE contiguous range of its split — per-domain evaluation is a slice. `index.json`:

    {"schema": 1, "dtype", "vocab_size", "eod_id", "tokenizer_sha256", "documents_sha256",
     "splits": {"train"|"val": {"file", "n_tokens", "n_bytes", "n_docs",
        "docs": [[doc_id, domain, start, end, n_bytes], ...],   # tokens[start:end] is the
                                                               # document; tokens[end] = eod
        "domains": {DOMAIN: {"start", "end", "n_tokens", "n_bytes", "n_docs", "n_slices",
                             "ranges": [[start, end]]}},       # one range, eods included
        "slices": [doc_id, ...]}}}

`n_bytes` counts UTF-8 bytes of the document texts (for bits-per-byte). `slices` (and each
domain's `n_slices`) are the split's parts of a document cut in two by curation (a
documents.jsonl line with `slice`): in "val", the held-out tails that a domain with a single
document validates on.

Control tokens (governance). With `control_token_prob` p > 0, a training document whose
hash of (control_seed, id) falls below p is preceded by its domain's control token
`<|domain:NAME|>`: it sits at `tokens[start - 1]`, inside the domain's range, and the
split's `control_docs` lists those documents. Validation documents never get one, so the
validation stream (and bits-per-byte) does not depend on the setting. The index records
`control_token_prob` and `control_seed`; a different setting rebuilds the shards.

Loss mask. Shards written from conversations (simone/data/chat_data.py) also name a
`mask_file` per split: one uint8 per token, 1 where the token is a target the loss counts
(`TokenShard.mask`; the loader sets the others to -1), and `n_loss_tokens`, which bits per
byte then divides by.

Building streams:
documents.jsonl is cut into slices of about CHUNK_BYTES at line ends, and `tokenize_chunk`
turns each slice into one temporary token file per (split, domain), in `workers` processes;
the parts are then concatenated domain by domain, slices in file order. A worker holds about
BATCH_CHARS of text, so memory grows with the workers, not the corpus; the output is
byte-identical for identical inputs whatever the number of workers; and the build is skipped
when the index already records the same documents.jsonl and tokenizer. `tokenize_chunk` reads
only its slice and the tokenizer file: it is the task a distributed engine would hand out.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import sys
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from simone.data.tokenizer import Tokenizer, load_tokenizer, split_for_encoding
from simone.rundir import atomic_write_json, read_json, sha256_file

SCHEMA = 1
SPLITS = ("train", "val")
INDEX_FILE = "index.json"
BATCH_CHARS = 2 << 20  # characters of text per encode_batch call (a worker's memory: ~200 MB)
CHUNK_BYTES = 8 << 20  # bytes of documents.jsonl per task of a worker (small: the workers end together)
_PARALLELISM = "TOKENIZERS_PARALLELISM"  # "false": the Rust encoder stays on the calling thread
_DocRow = tuple[str, str, str, int, int, bool]  # (split, domain, doc_id, n_bytes, n_pieces, is_slice)


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65535), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


@dataclass(frozen=True)
class DocumentsSlice:
    """Lines of a documents.jsonl: bytes [start, end), both at line starts; the first is line `first_line`."""

    path: Path
    start: int
    end: int
    first_line: int


@dataclass
class ShardPart:
    """Tokens of one (split, domain) of one slice: a temp file plus its documents."""

    path: Path
    n_tokens: int = 0
    n_bytes: int = 0
    docs: list[list] = field(default_factory=list)  # [doc_id, start, end, n_bytes], local
    control_docs: list[str] = field(default_factory=list)  # ids preceded by a control token
    slices: list[str] = field(default_factory=list)  # ids of parts of a document cut in two


def takes_control_token(doc_id: str, prob: float, seed: int) -> bool:
    """Whether training document `doc_id` starts with its domain control token: a hash of
    (seed, id) mapped to [0, 1) is below `prob` (the same answer on every machine)."""
    if prob <= 0:
        return False
    digest = hashlib.blake2b(f"control:{seed}:{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < prob


def _is_current(
    index: dict | None, data_dir: Path, documents_sha: str, tokenizer: Tokenizer, control: tuple[float, int] = (0.0, 0)
) -> bool:
    if not index or index.get("schema") != SCHEMA:
        return False
    if (index.get("control_token_prob", 0.0), index.get("control_seed", 0)) != control:
        return False
    if index.get("documents_sha256") != documents_sha or index.get("tokenizer_sha256") != tokenizer.sha256:
        return False
    itemsize = np.dtype(index["dtype"]).itemsize
    for split in SPLITS:
        info = index["splits"].get(split)
        if info is None:
            return False
        f = data_dir / info["file"]
        if not f.is_file() or f.stat().st_size != info["n_tokens"] * itemsize:
            return False
    return True


def build_shards(
    documents_jsonl: Path,
    tokenizer: Tokenizer,
    data_dir: Path,
    control_token_prob: float = 0.0,
    control_seed: int = 0,
    workers: int = 0,
    chunk_bytes: int = CHUNK_BYTES,
) -> dict:
    """Tokenize `documents_jsonl` into `data_dir/{train,val}.bin` and `data_dir/index.json`
    with `workers` processes (0: one per core), `chunk_bytes` of documents.jsonl a task.

    Returns the index (see the module docstring). Skips the work and returns the existing
    index when it was built from the same documents.jsonl, tokenizer and control-token
    setting (`control_token_prob`, `control_seed`: see "Control tokens" above).
    """
    documents_jsonl, data_dir = Path(documents_jsonl), Path(data_dir)
    if not documents_jsonl.is_file():
        raise FileNotFoundError(f"{documents_jsonl}: documents file not found (run curation first)")
    if not 0.0 <= control_token_prob <= 1.0:
        raise ValueError(f"data.control_token_prob={control_token_prob}: must be in [0, 1]")
    control = (float(control_token_prob), int(control_seed))
    documents_sha = sha256_file(documents_jsonl)
    existing = read_json(data_dir / INDEX_FILE)
    if _is_current(existing, data_dir, documents_sha, tokenizer, control):
        return existing

    tmp_dir = data_dir / ".shards-tmp"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    try:
        slices = documents_slices(documents_jsonl, chunk_bytes)
        n = max(1, min(workers or os.cpu_count() or 1, len(slices)))
        tasks = [(s, tmp_dir / f"{k}", control) for k, s in enumerate(slices)]
        if n == 1:  # in this process; the Rust encoder spreads each batch over the cores
            chunk_parts = [tokenize_chunk(documents, tokenizer, prefix, ctl) for documents, prefix, ctl in tasks]
        else:
            path = tokenizer.path or tokenizer.save(tmp_dir / "tokenizer.json")
            run = functools.partial(_tokenize_task, tokenizer_path=str(path), eod_token=tokenizer.eod_token)
            # fork on Linux (fast start, no re-import of __main__), spawn elsewhere
            ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
            _release_free_heap()  # a forked worker's RSS counts every page this process holds
            with _one_thread_encoders(), ProcessPoolExecutor(n, mp_context=ctx) as pool:
                chunk_parts = list(pool.map(run, tasks))
        splits = {split: _concatenate_split(split, chunk_parts, data_dir) for split in SPLITS}
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return write_index(
        data_dir,
        tokenizer,
        documents_sha256=documents_sha,
        control_token_prob=control[0],
        control_seed=control[1],
        splits=splits,
    )


def write_index(data_dir: Path, tokenizer: Tokenizer, **fields: object) -> dict:
    """Write and return `data_dir/index.json` (token and chat shards): the token format, the tokenizer, then
    `fields`. Written last: a present, matching index means complete .bin files."""
    index = {
        "schema": SCHEMA,
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "vocab_size": tokenizer.vocab_size,
        "eod_id": tokenizer.eod_id,
        "tokenizer_sha256": tokenizer.sha256,
        **fields,
    }
    atomic_write_json(data_dir / INDEX_FILE, index)
    return index


def documents_slices(documents_jsonl: Path, chunk_bytes: int = CHUNK_BYTES) -> list[DocumentsSlice]:
    """`documents_jsonl` cut at line ends into slices of about `chunk_bytes` (one read through it)."""
    slices: list[DocumentsSlice] = []
    size, start, line = documents_jsonl.stat().st_size, 0, 1
    with open(documents_jsonl, "rb") as f:
        while start < size:
            f.seek(start + max(1, chunk_bytes) - 1)
            f.readline()  # to the end of the line holding the slice's last byte
            end = min(f.tell(), size)
            slices.append(DocumentsSlice(documents_jsonl, start, end, line))
            f.seek(start)
            line += sum(f.read(min(1 << 24, end - at)).count(b"\n") for at in range(start, end, 1 << 24))
            start = end
    return slices


@contextmanager
def _one_thread_encoders() -> Iterator[None]:
    """Workers started inside encode on one core each (the parallelism is the workers, not a
    Rust thread pool in each; a forked child must not use the parent's pool anyway)."""
    before = os.environ.get(_PARALLELISM)
    os.environ[_PARALLELISM] = "false"
    try:
        yield
    finally:
        if before is None:
            del os.environ[_PARALLELISM]
        else:
            os.environ[_PARALLELISM] = before


def _release_free_heap() -> None:
    """Hand the memory this process has freed back to the system (glibc keeps it otherwise, e.g.
    what tokenizer training used); a no-op where there is no glibc."""
    with suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@functools.lru_cache(maxsize=2)
def _worker_tokenizer(path: str, eod_token: str) -> Tokenizer:
    return load_tokenizer(Path(path), eod_token)


def _tokenize_task(task: tuple, tokenizer_path: str, eod_token: str) -> dict[tuple[str, str], ShardPart]:
    documents, out_prefix, control = task
    return tokenize_chunk(documents, _worker_tokenizer(tokenizer_path, eod_token), out_prefix, control)


def tokenize_chunk(
    documents: DocumentsSlice, tokenizer: Tokenizer | Path, out_prefix: Path, control: tuple[float, int] = (0.0, 0)
) -> dict[tuple[str, str], ShardPart]:
    """Tokenize one slice of documents.jsonl into `OUT_PREFIX.SPLIT.N.bin`, one file per
    (split, domain): each document's tokens (after its control token, if it takes one: see
    `takes_control_token`), then the end-of-document token. Depends on nothing but its
    arguments, so a distributed engine can run it as it is, one slice a task."""
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    dtype = token_dtype(tok.vocab_size)
    eod = np.array([tok.eod_id], dtype=dtype).tobytes()
    parts: dict[tuple[str, str], ShardPart] = {}
    with ExitStack() as files:
        out = {}
        for batch, pieces in _document_batches(documents):
            encoded = tok.encode_batch(pieces)
            at = 0
            for split, domain, doc_id, n_bytes, n_pieces, is_slice in batch:
                ids = np.concatenate([np.array(e, dtype=dtype) for e in encoded[at : at + n_pieces]])
                at += n_pieces
                part = parts.get((split, domain))
                if part is None:
                    part = parts[(split, domain)] = ShardPart(Path(f"{out_prefix}.{split}.{len(parts)}.bin"))
                    out[(split, domain)] = files.enter_context(open(part.path, "wb"))
                control_id = split == "train" and takes_control_token(doc_id, *control) and domain in tok.domains
                if control_id:
                    out[(split, domain)].write(np.array([tok.domain_token_id(domain)], dtype=dtype).tobytes())
                    part.control_docs.append(doc_id)
                out[(split, domain)].write(ids.tobytes() + eod)
                start = part.n_tokens + int(control_id)
                part.docs.append([doc_id, start, start + len(ids), n_bytes])
                if is_slice:
                    part.slices.append(doc_id)
                part.n_tokens = start + len(ids) + 1
                part.n_bytes += n_bytes
    return parts


def _document_batches(documents: DocumentsSlice) -> Iterator[tuple[list[_DocRow], list[str]]]:
    """Read a slice line by line into batches of about BATCH_CHARS characters:
    ([(split, domain, doc_id, n_bytes, n_pieces, is_slice), ...], [piece, ...]) per batch."""
    batch: list[_DocRow] = []
    pieces: list[str] = []
    batch_chars = 0
    with open(documents.path, "rb") as f:
        f.seek(documents.start)
        at, lineno = documents.start, documents.first_line - 1
        while at < documents.end:
            line = f.readline()
            at, lineno = at + len(line), lineno + 1
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{documents.path}:{lineno}: not valid JSON ({e})") from e
            split = doc.get("split")
            if split not in SPLITS:
                raise ValueError(f"{documents.path}:{lineno}: split must be 'train' or 'val', got {split!r}")
            text = doc.get("text") or ""
            if not text:
                continue
            doc_pieces = split_for_encoding(text)
            domain = str(doc.get("domain") or "unknown")
            doc_id = str(doc.get("id") or f"line{lineno}")
            batch.append((split, domain, doc_id, len(text.encode("utf-8")), len(doc_pieces), "slice" in doc))
            pieces.extend(doc_pieces)
            batch_chars += len(text)
            if batch_chars >= BATCH_CHARS:
                yield batch, pieces
                batch, pieces, batch_chars = [], [], 0
    if batch:
        yield batch, pieces


def _concatenate_split(split: str, chunk_parts: list[dict[tuple[str, str], ShardPart]], data_dir: Path) -> dict:
    """Join one split's temp files into `data_dir/SPLIT.bin`: domains in sorted order, each
    domain's slices in file order (so a domain is one range, its documents in file order)."""
    file_name = f"{split}.bin"
    out_tmp = data_dir / f".{file_name}.tmp"
    docs: list[list] = []
    control_docs: list[str] = []
    slices: list[str] = []
    domains: dict[str, dict] = {}
    offset = n_bytes = 0
    names = sorted({domain for parts in chunk_parts for s, domain in parts if s == split})
    with open(out_tmp, "wb") as out:
        for domain in names:
            start, domain_bytes, docs_before, slices_before = offset, 0, len(docs), len(slices)
            for part in (parts[(split, domain)] for parts in chunk_parts if (split, domain) in parts):
                with open(part.path, "rb") as src:
                    shutil.copyfileobj(src, out, 1 << 22)
                for doc_id, a, b, doc_bytes in part.docs:
                    docs.append([doc_id, domain, offset + a, offset + b, doc_bytes])
                control_docs.extend(part.control_docs)
                slices.extend(part.slices)
                offset += part.n_tokens
                domain_bytes += part.n_bytes
            domains[domain] = {
                "start": start,
                "end": offset,
                "n_tokens": offset - start,
                "n_bytes": domain_bytes,
                "n_docs": len(docs) - docs_before,
                "n_slices": len(slices) - slices_before,
                "ranges": [[start, offset]],
            }
            n_bytes += domain_bytes
        out.flush()
    out_tmp.replace(data_dir / file_name)
    return {
        "file": file_name,
        "n_tokens": offset,
        "n_bytes": n_bytes,
        "n_docs": len(docs),
        "docs": docs,
        "domains": domains,
        "control_docs": control_docs,
        "slices": slices,
    }


class TokenShard:
    """One split's tokens as a read-only memmap, with its index entry.

    `tokens[i]` is a token id; `domain_range(d)` is the (start, end) slice of domain `d`.
    """

    def __init__(self, data_dir: Path, split: str):
        data_dir = Path(data_dir)
        index_path = data_dir / INDEX_FILE
        index = read_json(index_path)
        if index is None:
            raise FileNotFoundError(f"{index_path}: no token index (run the shard stage first)")
        if index.get("schema") != SCHEMA:
            raise ValueError(f"{index_path}: schema {index.get('schema')!r}, expected {SCHEMA}")
        if split not in index["splits"]:
            raise KeyError(f"{index_path}: no split {split!r}; has {', '.join(index['splits'])}")
        self.data_dir = data_dir
        self.split = split
        self.index = index
        self.info: dict = index["splits"][split]
        self.dtype = np.dtype(index["dtype"])
        self.eod_id: int = index["eod_id"]
        self.vocab_size: int = index["vocab_size"]
        self.path = data_dir / self.info["file"]
        expected = self.info["n_tokens"] * self.dtype.itemsize
        actual = self.path.stat().st_size if self.path.is_file() else -1
        if actual != expected:
            raise ValueError(f"{self.path}: {actual} bytes, index says {expected}; rebuild the shards")
        if self.info["n_tokens"] == 0:
            self.tokens = np.zeros(0, dtype=self.dtype)
        else:
            self.tokens = np.memmap(self.path, dtype=self.dtype, mode="r")
        # chat data (simone/data/chat_data.py): a uint8 per token, 1 where the token is a target
        # the loss counts; None: every token is
        mask_file = self.info.get("mask_file")
        self.mask = np.memmap(data_dir / mask_file, dtype=np.uint8, mode="r") if mask_file else None
        if self.mask is not None and len(self.mask) != self.n_tokens:
            raise ValueError(f"{data_dir / mask_file}: {len(self.mask)} mask bytes for {self.n_tokens} tokens")

    @property
    def n_tokens(self) -> int:
        return int(self.info["n_tokens"])

    @property
    def n_bytes(self) -> int:
        return int(self.info["n_bytes"])

    @property
    def domains(self) -> list[str]:
        return list(self.info["domains"])

    @property
    def docs(self) -> list[list]:
        """[doc_id, domain, start, end, n_bytes] per document, in file order."""
        return self.info["docs"]

    def domain_range(self, domain: str) -> tuple[int, int]:
        """(start, end) token positions of `domain` in this split (eod tokens included)."""
        try:
            d = self.info["domains"][domain]
        except KeyError:
            raise KeyError(f"{self.path}: no domain {domain!r}; has {', '.join(self.domains)}") from None
        return int(d["start"]), int(d["end"])

    def bytes_per_token(self, domain: str | None = None) -> float:
        """UTF-8 bytes of text per token (whole split, or one domain); for bits-per-byte. With a
        mask, per token the loss counts (`n_loss_tokens`)."""
        d = self.info if domain is None else self.info["domains"][domain]
        n = d.get("n_loss_tokens", d["n_tokens"])
        return d["n_bytes"] / n if n else 0.0

    def __len__(self) -> int:
        return self.n_tokens

    def __repr__(self) -> str:
        return f"TokenShard({self.path}, n_tokens={self.n_tokens}, domains={self.domains})"
