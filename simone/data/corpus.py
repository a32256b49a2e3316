"""Corpus ingestion: find every input file and read its metadata.

A corpus is one of
  - a tree `DOMAIN/SUBDOMAIN/*.txt`, each text optionally with a `NAME.json` sidecar;
  - a flat folder of `*.txt` (+ sidecars): the domain comes from the sidecar's `category`;
  - a single `.txt` file.

Nothing here reads the texts themselves (the curate workers do); this module only walks
the tree, pairs texts with sidecars, and says which files cannot be read at all. The
corpus is read-only to us: nothing here opens a file for writing.
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simone.errors import SimoneError

TEXT_SUFFIX = ".txt"
SIDECAR_SUFFIX = ".json"
DEFAULT_DOMAIN = "default"

# metadata keys we understand, from a sidecar or from a header block
_HEADER_KEYS = {
    "title": "title",
    "author": "author",
    "source": "source",
    "category": "category",
    "subcategory": "subcategory",
    "quality score": "quality_score",
    "quality_score": "quality_score",
    "word count": "word_count",
    "url": "url",
    "hash": "hash",
    "priority": "priority",
}
_HEADER_LINE = re.compile(r"^([A-Za-z][A-Za-z _-]{0,40}):\s*(.*)$")
_HEADER_RULE = re.compile(r"^={10,}\s*$")


class CorpusError(SimoneError):
    """The corpus path is missing, unreadable or holds no text files."""


@dataclass
class SourceFile:
    """One input file of the corpus, as found by `discover_files`.

    `kind` is "text" for a `.txt` to curate, "orphan_sidecar" for a `.json` with no text
    beside it, or "unreadable" for an entry we cannot open (`problem` says why).
    """

    path: Path  # absolute
    rel: str  # path relative to the corpus root (posix); the stable document id
    domain: str
    subdomain: str
    kind: str = "text"
    sidecar: Path | None = None
    problem: str | None = None
    folder_domain: bool = True  # False: domain to be taken from metadata (flat folder / single file)
    size: int = 0
    mtime_ns: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def discover_files(path: str | Path) -> list[SourceFile]:
    """Every `.txt` (and every orphan `.json` sidecar) under `path`, sorted by relative path.

    Raises `CorpusError` when `path` does not exist or holds no `.txt` file at all.
    Symlinks to files are followed; symlinked directories are not (so a symlink loop
    cannot make the walk endless); a `.txt` entry that cannot be opened as a regular file
    (a directory named `x.txt`, a FIFO, a broken or looping symlink) comes back with
    kind "unreadable".
    """
    root = Path(path)
    if not os.path.lexists(root):
        raise CorpusError(f"{root}: corpus not found")
    if root.is_file():
        if root.suffix.lower() != TEXT_SUFFIX:
            raise CorpusError(f"{root}: not a .txt file (a corpus is a folder of .txt files or one .txt)")
        sidecar = root.with_suffix(SIDECAR_SUFFIX)
        return [_source(root, root.name, DEFAULT_DOMAIN, "", sidecar if sidecar.is_file() else None, False)]
    if not root.is_dir():
        raise CorpusError(f"{root}: not a file or a folder")

    texts: dict[str, SourceFile] = {}
    sidecars: dict[str, Path] = {}  # rel path without suffix -> sidecar path
    try:
        walker = list(os.walk(root, followlinks=False, onerror=None))
    except OSError as e:  # pragma: no cover - os.walk swallows most errors itself
        raise CorpusError(f"{root}: cannot read the folder ({e})") from e
    for dirpath, dirnames, filenames in walker:
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        here = Path(dirpath)
        # a directory (or anything else) named *.txt appears in dirnames: not a text file
        entries = list(filenames) + [d for d in dirnames if d.lower().endswith(TEXT_SUFFIX)]
        # symlinked directories are listed in dirnames but never walked; note them if named .txt
        for name in sorted(entries):
            if name.startswith("."):
                continue
            full = here / name
            rel = _printable(full.relative_to(root).as_posix())
            suffix = Path(name).suffix.lower()
            if suffix == TEXT_SUFFIX:
                domain, subdomain, from_folder = _domain_of(rel)
                texts[rel] = _source(full, rel, domain, subdomain, None, from_folder)
            elif suffix == SIDECAR_SUFFIX:
                sidecars[rel[: -len(SIDECAR_SUFFIX)]] = full
    if not texts:
        raise CorpusError(f"{root}: no .txt files found (expected DOMAIN/SUBDOMAIN/*.txt, a flat folder of .txt, or one .txt file)")

    out = list(texts.values())
    for sf in out:
        sidecar = sidecars.pop(sf.rel[: -len(TEXT_SUFFIX)], None)
        sf.sidecar = sidecar
    for stem_rel, sidecar in sidecars.items():
        rel = _printable(sidecar.relative_to(root).as_posix())
        domain, subdomain, from_folder = _domain_of(rel)
        sf = _source(sidecar, rel, domain, subdomain, None, from_folder)
        sf.kind = "orphan_sidecar"
        sf.problem = f"{rel}: sidecar without its text ({stem_rel}{TEXT_SUFFIX} is missing)"
        out.append(sf)
    out.sort(key=lambda s: s.rel)
    return out


def _printable(rel: str) -> str:
    """A file name that is not valid UTF-8 (kept by Python as lone surrogates) shown with
    U+FFFD, so it can be written to JSON; the file is still opened by its real name."""
    try:
        rel.encode("utf-8")
        return rel
    except UnicodeEncodeError:
        return rel.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _domain_of(rel: str) -> tuple[str, str, bool]:
    parts = rel.split("/")
    if len(parts) >= 3:
        return parts[0], parts[1], True
    if len(parts) == 2:
        return parts[0], "", True
    return DEFAULT_DOMAIN, "", False


def _source(full: Path, rel: str, domain: str, subdomain: str, sidecar: Path | None, from_folder: bool) -> SourceFile:
    sf = SourceFile(path=full, rel=rel, domain=domain, subdomain=subdomain, sidecar=sidecar, folder_domain=from_folder)
    try:
        st = os.stat(full)  # follows symlinks: a loop or a dangling link raises here
    except OSError as e:
        sf.kind = "unreadable"
        reason = "symlink loop" if getattr(e, "errno", None) == 40 else e.strerror or str(e)
        if os.path.islink(full) and getattr(e, "errno", None) == 2:
            reason = "broken symlink"
        sf.problem = f"{rel}: cannot open ({reason})"
        return sf
    sf.size, sf.mtime_ns = st.st_size, st.st_mtime_ns
    if not stat.S_ISREG(st.st_mode):
        what = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        sf.kind = "unreadable"
        sf.problem = f"{rel}: cannot open ({what})"
    elif not os.access(full, os.R_OK):
        sf.kind = "unreadable"
        sf.problem = f"{rel}: cannot open (permission denied)"
    return sf


# ----------------------------------------------------------------------------- metadata


class SidecarError(ValueError):
    """A sidecar that is not a JSON object."""


def read_sidecar(path: Path) -> dict[str, Any]:
    """The sidecar's metadata as a dict; `SidecarError` (with the reason) if malformed."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise SidecarError(f"cannot read ({e.strerror or e})") from e
    try:
        obj = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise SidecarError(f"not UTF-8 at byte {e.start}") from e
    except json.JSONDecodeError as e:
        raise SidecarError(f"not valid JSON (line {e.lineno} column {e.colno}: {e.msg})") from e
    if not isinstance(obj, dict):
        raise SidecarError(f"a JSON {type(obj).__name__}, not an object")
    return obj


def split_header(text: str, max_lines: int = 40) -> tuple[dict[str, Any] | None, str]:
    """Split a leading metadata block (`Key: value` lines closed by a line of `=`).

    Returns (metadata, rest of the text) or (None, text) when the text has no such block.
    """
    head = text[:8000].split("\n", max_lines + 1)[: max_lines + 1]
    meta: dict[str, Any] = {}
    offset = 0
    for i, line in enumerate(head):
        if _HEADER_RULE.match(line):
            if not meta or i == len(head) - 1 and len(head) > max_lines:
                return None, text
            return meta, text[offset + len(line) + 1 :]
        m = _HEADER_LINE.match(line)
        if m:
            key = _HEADER_KEYS.get(m.group(1).strip().lower(), m.group(1).strip().lower().replace(" ", "_"))
            meta[key] = _header_value(key, m.group(2).strip())
        elif line.strip():
            return None, text  # prose before any rule: not a header block
        offset += len(line) + 1
    return None, text


def _header_value(key: str, value: str) -> Any:
    if key in ("quality_score", "biblical_alignment"):
        try:
            return float(value)
        except ValueError:
            return value
    if key == "word_count":
        try:
            return int(value.replace(",", ""))
        except ValueError:
            return value
    return value


def title_from_filename(rel: str) -> str:
    """`Pride-and-Prejudice_1a2b3c4d.txt` -> `Pride and Prejudice` (a last resort title)."""
    stem = Path(rel).stem
    stem = re.sub(r"_[0-9a-f]{8,}$", "", stem)
    return re.sub(r"[-_]+", " ", stem).strip()
