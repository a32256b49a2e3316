"""The run directory: the one interface between stages, trainer, validator and monitor.

Layout (schema 1; see docs/ARCHITECTURE.md):

    RUN/config.json  status.json  metrics.jsonl  samples.jsonl  train.log
    RUN/data/        manifest.jsonl report.html documents.jsonl index.json train.bin val.bin
    RUN/tokenizer/   tokenizer.json chat_template.jinja (a tokenizer with chat tokens) stamp.json
    RUN/checkpoints/ step_000500/{model.safetensors,state.pt,MANIFEST.json}, latest, best
    RUN/validation/  report.json report.md

Every JSON file is written atomically (temp file, fsync, rename) so a reader never sees a
half-written file; JSON-lines files are appended one whole line per write.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = 1


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (manifests, and the inputs stages reuse by)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _new_file_beside(path: Path) -> Path:
    """Create a new, empty, uniquely named file in `path`'s folder and return its path.

    Created with mode 0666 for the kernel to mask with the umask (and a folder's default
    ACL), as `open()` would, not 0600 as `tempfile.mkstemp` does: the files written here (a
    GGUF file, a report, a --json) are read by other accounts, such as the one running
    llama.cpp or a web server. O_EXCL: never an existing file, nor through a link."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            os.close(os.open(tmp, flags, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"{path.parent}: cannot create a temporary file (100 names taken)")


@contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Write `path` whole or not at all: yields a new empty file beside it for the caller to
    write (by name: some writers, like GGUFWriter, open the file themselves); on success it
    is flushed to disk and renamed over `path`, on an exception it is removed.

    The one way this package writes a file atomically (`atomic_write_bytes` and the GGUF
    export go through it), so every such file gets the umask's mode. The rename replaces
    whatever `path` is, a symlink included (the link, not its target): commands that write
    a file the user named refuse a symlink there first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_file_beside(path)
    try:
        yield tmp
        with open(tmp, "rb") as f:  # fsync through a read-only descriptor: the data is the file's
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):  # gone already, or not ours to remove: the first error is the one to see
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def append_jsonl(path: Path, obj: dict[str, Any]) -> None:
    """Append one JSON object as one line, in a single write (readers may tail the file)."""
    line = json.dumps(obj, default=_json_default, allow_nan=True) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def read_json(path: Path, default: Any = None) -> Any:
    """A JSON file's content, or `default` when it is missing, unreadable or mid-write.

    Parsing a hostile file can raise ValueError (bad JSON or UTF-8, an integer over Python's
    int-string limit) or RecursionError (deep nesting): both read as `default` too."""
    try:
        return json.loads(Path(path).read_bytes())
    except (OSError, ValueError, RecursionError):
        return default


# ----------------------------------------------------------------------------- checkpoints

_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_step(path: Path) -> int | None:
    """N of a `step_N` checkpoint directory, None for any other name."""
    m = _STEP_DIR.match(Path(path).name)
    return int(m.group(1)) if m else None


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """The `step_N` directories under `ckpt_root`, oldest first ([] when there is none)."""
    try:
        found = [(checkpoint_step(p), p) for p in Path(ckpt_root).iterdir() if p.is_dir()]
    except OSError:
        return []
    return [p for s, p in sorted((s, p) for s, p in found if s is not None)]


def read_pointer(ckpt_root: Path, which: str) -> str | None:
    """The step directory a `latest`/`best` pointer file names, None when absent or malformed."""
    try:
        name = (Path(ckpt_root) / which).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return name if _STEP_DIR.match(name) else None


@dataclass(frozen=True)
class RunDir:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # paths of the contract
    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def status(self) -> Path:
        return self.root / "status.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def samples(self) -> Path:
        return self.root / "samples.jsonl"

    @property
    def log(self) -> Path:
        return self.root / "train.log"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def manifest(self) -> Path:
        return self.data / "manifest.jsonl"

    @property
    def documents(self) -> Path:
        return self.data / "documents.jsonl"

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / "tokenizer"

    @property
    def tokenizer(self) -> Path:
        return self.tokenizer_dir / "tokenizer.json"

    @property
    def chat_template(self) -> Path:
        return self.tokenizer_dir / "chat_template.jinja"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def validation(self) -> Path:
        return self.root / "validation"

    def make(self) -> RunDir:
        for d in (self.root, self.data, self.tokenizer_dir, self.checkpoints, self.validation):
            d.mkdir(parents=True, exist_ok=True)
        return self

    # status.json: the run's state for humans, the monitor and the lock
    def read_status(self) -> dict[str, Any]:
        return read_json(self.status, default={}) or {}

    def write_status(self, **fields: Any) -> dict[str, Any]:
        """Merge `fields` into status.json (atomically) and stamp pid, host and heartbeat."""
        st = self.read_status()
        st.update(fields)
        st["schema"] = SCHEMA
        st["pid"] = os.getpid()
        st["host"] = socket.gethostname()
        st["heartbeat"] = time.time()
        atomic_write_json(self.status, st)
        return st

    def log_line(self, message: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with open(self.log, "a", encoding="utf-8") as f:
            f.write(f"{stamp} {message}\n")
