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

Building streams:
documents are read line by line, encoded in batches on all cores, and appended to one
temporary file per (split, domain), which are then concatenated; memory stays small. The
output is byte-identical for identical inputs, and the build is skipped when the index
already records the same documents.jsonl and tokenizer.
"""

from __future__ import annotations

import hashlib
import queue
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np

from simone.data.documents import numbered_documents
from simone.data.tokenizer import Tokenizer, split_for_encoding
from simone.rundir import atomic_write_json, read_json, sha256_file

SCHEMA = 1
SPLITS = ("train", "val")
INDEX_FILE = "index.json"
BATCH_CHARS = 8 << 20  # characters of text per encode_batch call (bounds memory)
T = TypeVar("T")
_DocRow = tuple[str, str, str, int, int, bool]  # (split, domain, doc_id, n_bytes, n_pieces, is_slice)


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65535), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


@dataclass
class _DomainPart:
    """Tokens of one (split, domain) while building: a temp file plus its documents."""

    path: Path
    n_tokens: int = 0
    n_bytes: int = 0
    docs: list[list] = field(default_factory=list)  # [doc_id, start, end, n_bytes], local
    control_docs: list[str] = field(default_factory=list)  # ids preceded by a control token
    slices: list[str] = field(default_factory=list)  # ids of parts of a document cut in two


def _control_prefix(
    tokenizer: Tokenizer, split: str, domain: str, doc_id: str, control: tuple[float, int], dtype: np.dtype
) -> np.ndarray:
    """[control token id] for a training document chosen by `takes_control_token`, else []."""
    if split != "train" or not takes_control_token(doc_id, *control) or domain not in tokenizer.domains:
        return np.zeros(0, dtype=dtype)
    return np.array([tokenizer.domain_token_id(domain)], dtype=dtype)


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
    documents_jsonl: Path, tokenizer: Tokenizer, data_dir: Path, control_token_prob: float = 0.0, control_seed: int = 0
) -> dict:
    """Tokenize `documents_jsonl` into `data_dir/{train,val}.bin` and `data_dir/index.json`.

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

    dtype = token_dtype(tokenizer.vocab_size)
    tmp_dir = data_dir / ".shards-tmp"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    parts: dict[tuple[str, str], _DomainPart] = {}
    eod = np.array([tokenizer.eod_id], dtype=dtype)

    def flush(batch: list[_DocRow], pieces: list[str]) -> None:
        """Encode the pending documents' pieces in one parallel call and append each
        document (its pieces concatenated, then eod) to its (split, domain) temp file."""
        encoded = tokenizer.encode_batch(pieces)
        at = 0
        for split, domain, doc_id, n_bytes, n_pieces, is_slice in batch:
            ids = np.concatenate([np.array(e, dtype=dtype) for e in encoded[at : at + n_pieces]])
            at += n_pieces
            part = parts.get((split, domain))
            if part is None:
                part = parts[(split, domain)] = _DomainPart(tmp_dir / f"{split}.{len(parts)}.bin")
            prefix = _control_prefix(tokenizer, split, domain, doc_id, control, dtype)
            with open(part.path, "ab") as f:
                f.write(prefix.tobytes())
                f.write(ids.tobytes())
                f.write(eod.tobytes())
            start = part.n_tokens + len(prefix)
            part.docs.append([doc_id, start, start + len(ids), n_bytes])
            if len(prefix):
                part.control_docs.append(doc_id)
            if is_slice:
                part.slices.append(doc_id)
            part.n_tokens = start + len(ids) + 1
            part.n_bytes += n_bytes

    try:
        for batch, pieces in _in_background(_document_batches(documents_jsonl)):
            flush(batch, pieces)

        index = {
            "schema": SCHEMA,
            "dtype": dtype.name,
            "vocab_size": tokenizer.vocab_size,
            "eod_id": tokenizer.eod_id,
            "tokenizer_sha256": tokenizer.sha256,
            "documents_sha256": documents_sha,
            "control_token_prob": control[0],
            "control_seed": control[1],
            "splits": {split: _concatenate_split(split, parts, data_dir, dtype) for split in SPLITS},
        }
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    # The index is written last: a present, matching index means complete .bin files.
    atomic_write_json(data_dir / INDEX_FILE, index)
    return index


def _document_batches(documents_jsonl: Path) -> Iterator[tuple[list[_DocRow], list[str]]]:
    """Read documents.jsonl line by line into batches of about BATCH_CHARS characters:
    ([(split, domain, doc_id, n_bytes, n_pieces, is_slice), ...], [piece, ...]) per batch."""
    batch: list[_DocRow] = []
    pieces: list[str] = []
    batch_chars = 0
    for lineno, doc in numbered_documents(documents_jsonl):
        split = doc.get("split")
        if split not in SPLITS:
            raise ValueError(f"{documents_jsonl}:{lineno}: split must be 'train' or 'val', got {split!r}")
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


def _in_background(items: Iterator[T], depth: int = 2) -> Iterator[T]:
    """Run the generator `items` in a thread, `depth` items ahead, so reading and parsing
    overlap with encoding (the Rust encoder releases the GIL). Re-raises its errors."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                q.put(item)
            q.put(done)
        except BaseException as e:  # handed to the consumer, raised there
            q.put(e)

    worker = threading.Thread(target=produce, daemon=True)
    worker.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while worker.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                worker.join(0.01)


def _concatenate_split(split: str, parts: dict[tuple[str, str], _DomainPart], data_dir: Path, dtype: np.dtype) -> dict:
    """Join one split's domain temp files in sorted domain order into `data_dir/SPLIT.bin`."""
    file_name = f"{split}.bin"
    out_tmp = data_dir / f".{file_name}.tmp"
    docs: list[list] = []
    control_docs: list[str] = []
    slices: list[str] = []
    domains: dict[str, dict] = {}
    offset = n_bytes = 0
    with open(out_tmp, "wb") as out:
        for (part_split, domain), part in sorted(parts.items()):
            if part_split != split:
                continue
            with open(part.path, "rb") as src:
                shutil.copyfileobj(src, out, 1 << 22)
            for doc_id, start, end, doc_bytes in part.docs:
                docs.append([doc_id, domain, offset + start, offset + end, doc_bytes])
            control_docs.extend(part.control_docs)
            slices.extend(part.slices)
            domains[domain] = {
                "start": offset,
                "end": offset + part.n_tokens,
                "n_tokens": part.n_tokens,
                "n_bytes": part.n_bytes,
                "n_docs": len(part.docs),
                "n_slices": len(part.slices),
                "ranges": [[offset, offset + part.n_tokens]],
            }
            offset += part.n_tokens
            n_bytes += part.n_bytes
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
        """UTF-8 bytes of text per token (whole split, or one domain); for bits-per-byte."""
        d = self.info if domain is None else self.info["domains"][domain]
        return d["n_bytes"] / d["n_tokens"] if d["n_tokens"] else 0.0

    def __len__(self) -> int:
        return self.n_tokens

    def __repr__(self) -> str:
        return f"TokenShard({self.path}, n_tokens={self.n_tokens}, domains={self.domains})"
