"""Corpus ingestion: find every input file and read its metadata.

A corpus is one of
  - a tree `DOMAIN/SUBDOMAIN/*.txt`, each text optionally with a `NAME.json` sidecar;
  - a flat folder of `*.txt` (+ sidecars): the domain comes from the sidecar's `category`;
  - a single `.txt` file;
and record files (`.jsonl`, `.jsonl.gz`, `.jsonl.zst`, `.parquet`: many documents each, see
`records.py`) may stand wherever a `.txt` may, the domain coming from their folder likewise.

Nothing here reads the texts themselves (the curate workers do); this module only walks
the tree, pairs texts with sidecars, and says which files cannot or must not be read
(links leading outside the corpus, FIFOs and devices, dot-files, symlinked folders).
`read_regular_file` is the one way a corpus file is opened: regular files only, never
blocking, never more than a size limit. The corpus is read-only to us: nothing here
opens a file for writing.
"""

from __future__ import annotations

import errno
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
RECORD_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")  # record files (records.py)
DEFAULT_DOMAIN = "default"
SIDECAR_MAX_BYTES = 1 << 20  # metadata, not text: a bigger sidecar is a bad one

_HEADER_LINE = re.compile(r"^([A-Za-z][A-Za-z _-]{0,40}):\s*(.*)$")
_HEADER_RULE = re.compile(r"^={10,}\s*$")


class CorpusError(SimoneError):
    """The corpus path is missing, unreadable or holds no text files."""


@dataclass
class SourceFile:
    """One entry of the corpus, as found by `discover_files`.

    `kind` is
      "text"            a `.txt` to curate;
      "records"         a record file to curate, one document a record;
      "orphan_sidecar"  a `.json` with no text beside it;
      "unreadable"      an entry we cannot read (a broken link, a FIFO, a folder we may not list);
      "skipped"         an entry we will not read (a dot-file, a symlinked folder, a link
                        leading outside the corpus);
      "ignored"         a file that is not an input (not `.txt`/`.json`): listed, never read.
    For "unreadable" and "skipped", `reason` is the manifest reason code and `problem` says why.
    """

    path: Path  # absolute; for a link inside the corpus, its checked target: what is opened
    rel: str  # path relative to the corpus root (posix, printable); the stable document id
    domain: str
    subdomain: str
    kind: str = "text"
    sidecar: Path | None = None
    problem: str | None = None
    reason: str | None = None
    sidecar_problem: str | None = None  # why the sidecar beside this text was not read
    folder_domain: bool = True  # False: domain to be taken from metadata (flat folder / single file)
    size: int = 0
    mtime_ns: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class UnsafeFile(Exception):
    """A file we refuse to read: `code` is the manifest reason (`not_regular_file`,
    `too_large`, `unreadable`), `message` the detail."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def open_regular(path: str | Path) -> int:
    """A file descriptor of `path`, which must be a regular file: the one way a corpus file is opened.

    The checks hold for what is actually opened, not for a name checked earlier: the file is
    opened without following a final symlink (discovery already resolved and checked links) and
    without blocking (a FIFO swapped in cannot hang us), then `fstat` must say "regular file".
    Raises UnsafeFile ("unreadable" or "not_regular_file").
    """
    flags = (
        os.O_RDONLY
        | os.O_NONBLOCK
        | getattr(os, "O_NOFOLLOW", 0)
        | getattr(os, "O_NOCTTY", 0)
        | getattr(os, "O_CLOEXEC", 0)
    )
    try:
        fd = os.open(path, flags)
    except OSError as e:
        what = "a symlink appeared after the corpus was scanned" if e.errno == errno.ELOOP else e.strerror or str(e)
        raise UnsafeFile("unreadable", f"cannot open ({what})") from e
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise UnsafeFile("not_regular_file", f"not a regular file ({_file_type(mode)}); not read")
    return fd


def read_regular_file(path: str | Path, max_bytes: int) -> bytes:
    """The bytes of `path` (`open_regular`'s checks), a regular file of at most `max_bytes`:
    at most `max_bytes + 1` bytes are ever read."""
    fd = open_regular(path)
    try:
        st = os.fstat(fd)
        if st.st_size > max_bytes:
            raise UnsafeFile("too_large", too_large_note(st.st_size, max_bytes))
        chunks, total = [], 0
        while total <= max_bytes:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > max_bytes:  # it grew while we read
            raise UnsafeFile("too_large", too_large_note(total, max_bytes))
        return b"".join(chunks)
    except OSError as e:
        raise UnsafeFile("unreadable", f"cannot read ({e.strerror or e})") from e
    finally:
        os.close(fd)


def record_suffix(path: str | Path) -> str | None:
    """Which of `RECORD_SUFFIXES` the name of `path` ends with (any case), or None."""
    name = os.path.basename(path).lower()
    return next((s for s in RECORD_SUFFIXES if name.endswith(s)), None)


def is_record_file(path: str | Path) -> bool:
    return record_suffix(path) is not None


def too_large_note(size: int, max_bytes: int) -> str:
    return f"{size / 2**20:.1f} MiB, over the limit of {max_bytes / 2**20:.1f} MiB a file; not read"


def _file_type(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def discover_files(path: str | Path) -> list[SourceFile]:
    """Every entry under `path` that curation must account for, sorted by relative path.

    That is every `.txt`, record file and `.json` (sidecars are paired with their text and not listed
    on their own unless orphaned or unusable), every folder we could not or would not walk
    (a folder we may not list, a symlinked folder, a dot-folder), and every other file as
    kind "ignored". Nothing is opened here: entries are classified by `lstat`/`stat` only.

    Raises `CorpusError` when `path` does not exist or holds no `.txt` or record file at all.
    Symlinks to files inside the corpus are followed; a link resolving outside it is
    "skipped" (`outside_corpus`) and never read; symlinked folders are not walked (so a
    loop cannot make the walk endless, and nothing outside is reached through them).
    The walk keeps its own stack, so a tree thousands of folders deep is fine.
    """
    root = Path(path)
    if not os.path.lexists(root):
        raise CorpusError(f"{root}: corpus not found")
    if root.is_file():
        if is_record_file(root):
            return [_source(root, root.name, DEFAULT_DOMAIN, "", False)]
        if root.suffix.lower() != TEXT_SUFFIX:
            raise CorpusError(f"{root}: not a .txt file or a record file (a corpus is a folder of them or one of them)")
        # the file the user named is read even if it is a link; its sidecar must stay beside it
        text = _source(root, root.name, DEFAULT_DOMAIN, "", False)
        sidecar = root.with_suffix(SIDECAR_SUFFIX)
        out = [text]
        if os.path.lexists(sidecar):
            out += _pair(text, sidecar, sidecar.name, os.path.realpath(root.parent))
        return out
    if not root.is_dir():
        raise CorpusError(f"{root}: not a file or a folder")

    real_root = os.path.realpath(root)
    texts: dict[str, SourceFile] = {}  # keyed by the real relative name (may hold surrogates)
    records: list[SourceFile] = []
    sidecars: dict[str, tuple[str, Path]] = {}  # real rel without suffix -> (real rel, path)
    others: list[SourceFile] = []
    stack = [""]  # relative folders still to list; depth-first, in name order
    while stack:
        rel_dir = stack.pop()
        here = root / rel_dir if rel_dir else root
        try:
            with os.scandir(here) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            if not rel_dir:
                raise CorpusError(f"{root}: cannot read the folder ({e.strerror or e})") from e
            others.append(
                _skip(
                    here,
                    rel_dir,
                    "unreadable",
                    "unreadable",
                    f"folder cannot be listed ({e.strerror or e}); nothing inside it was read",
                )
            )
            continue
        subdirs = []
        for entry in entries:
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            full = here / entry.name
            suffix = os.path.splitext(entry.name)[1].lower()
            is_input = suffix in (TEXT_SUFFIX, SIDECAR_SUFFIX) or is_record_file(entry.name)
            try:
                real_dir = entry.is_dir(follow_symlinks=False)
                linked_dir = not real_dir and entry.is_symlink() and entry.is_dir()  # is_dir follows the link
            except OSError:
                real_dir = linked_dir = False
            if entry.name.startswith("."):
                if real_dir or linked_dir or is_input:
                    what = "dot-folder: nothing inside it was read" if real_dir or linked_dir else "dot-file: not read"
                    others.append(_skip(full, rel, "skipped", "hidden", f"hidden {what}"))
                else:
                    others.append(_skip(full, rel, "ignored", None, None))
                continue
            if linked_dir:
                others.append(
                    _skip(
                        full,
                        rel,
                        "skipped",
                        "symlinked_dir",
                        "symlinked folder: not followed (it could loop or lead outside the corpus); nothing inside it was read",
                    )
                )
                continue
            if real_dir:
                subdirs.append(rel)
            if suffix == TEXT_SUFFIX:  # a folder named x.txt too: walked, and reported as no text file
                texts[rel] = _source(full, rel, *_domain_of(_printable(rel)), real_root=real_root)
            elif real_dir:
                continue  # any other folder: walked (subdirs), not an entry of its own
            elif is_record_file(entry.name):
                records.append(_source(full, rel, *_domain_of(_printable(rel)), real_root=real_root))
            elif suffix == SIDECAR_SUFFIX:
                sidecars[rel[: -len(SIDECAR_SUFFIX)]] = (rel, full)
            else:
                others.append(_skip(full, rel, "ignored", None, None))
        stack.extend(reversed(subdirs))
    if not texts and not records:
        raise CorpusError(
            f"{root}: no .txt files found, nor record files ({', '.join(RECORD_SUFFIXES)}) "
            "(expected DOMAIN/SUBDOMAIN/*.txt, a flat folder of .txt, or one .txt file; record files likewise)"
        )

    out = list(texts.values()) + records
    for real_rel, sf in texts.items():
        found = sidecars.pop(real_rel[: -len(TEXT_SUFFIX)], None)
        if found is not None:
            out += _pair(sf, found[1], found[0], real_root)
    for stem_rel, (real_rel, sidecar) in sidecars.items():
        sf = _source(sidecar, real_rel, *_domain_of(_printable(real_rel)), real_root=real_root)
        if sf.kind == "text":  # a readable file: an orphan; an unsafe one keeps its own reason
            sf.kind = "orphan_sidecar"
            sf.problem = f"{sf.rel}: sidecar without its text ({_printable(stem_rel)}{TEXT_SUFFIX} is missing)"
        out.append(sf)
    out += others
    _unique_rels(out)
    out.sort(key=lambda s: s.rel)
    return out


def _pair(text: SourceFile, sidecar: Path, real_rel: str, real_root: str) -> list[SourceFile]:
    """Attach `sidecar` to `text`; a sidecar that is unsafe to read gets a line of its own
    instead (returned), and the text notes why its metadata was not used."""
    rel = _printable(real_rel)
    target, problem = _inspect(sidecar, rel, real_root)
    if problem is None:
        text.sidecar = target
        return []
    text.sidecar_problem = f"{rel}: not read ({problem[1]}; see its own manifest line)"
    return [_problem_entry(sidecar, rel, *problem)]


def _inside(path: str, real_root: str) -> bool:
    return path == real_root or path.startswith(real_root.rstrip(os.sep) + os.sep)


def _inspect(full: Path, rel: str, real_root: str | None) -> tuple[Path, tuple[str, str, str] | None]:
    """(path to open, None) for a readable regular file inside the corpus, else
    (full, (kind, reason code, detail)). Follows links only to look: nothing is opened."""
    try:
        st = os.stat(full)  # follows symlinks (metadata only): a loop or a dangling link raises here
    except OSError as e:
        reason = "symlink loop" if e.errno == errno.ELOOP else e.strerror or str(e)
        if os.path.islink(full) and e.errno == errno.ENOENT:
            reason = "broken symlink"
        return full, ("unreadable", "unreadable", f"cannot open ({reason})")
    target = full
    if os.path.islink(full):
        resolved = os.path.realpath(full)
        if real_root is not None and not _inside(resolved, real_root):
            return full, (
                "skipped",
                "outside_corpus",
                f"links outside the corpus (to {_printable(resolved)}); not read",
            )
        target = Path(resolved)
    if not stat.S_ISREG(st.st_mode):
        return full, ("unreadable", "not_regular_file", f"not a regular file ({_file_type(st.st_mode)}); not opened")
    if not os.access(full, os.R_OK):
        return full, ("unreadable", "unreadable", "cannot open (permission denied)")
    return target, None


def _source(
    full: Path, real_rel: str, domain: str, subdomain: str, from_folder: bool, real_root: str | None = None
) -> SourceFile:
    rel = _printable(real_rel)
    target, problem = _inspect(full, rel, real_root)
    if problem is not None:
        sf = _problem_entry(full, rel, *problem)
        sf.folder_domain = from_folder
        return sf
    st = os.stat(target)
    return SourceFile(
        path=target,
        rel=rel,
        domain=domain,
        subdomain=subdomain,
        kind="records" if is_record_file(rel) else "text",
        folder_domain=from_folder,
        size=st.st_size,
        mtime_ns=st.st_mtime_ns,
    )


def _problem_entry(full: Path, rel: str, kind: str, reason: str, detail: str) -> SourceFile:
    sf = _skip(full, rel, kind, reason, detail, printable=True)
    try:
        st = os.lstat(full)
        sf.size = st.st_size if stat.S_ISREG(st.st_mode) else 0
        sf.mtime_ns = st.st_mtime_ns
    except OSError:
        pass
    return sf


def _skip(
    full: Path, rel: str, kind: str, reason: str | None, detail: str | None, printable: bool = False
) -> SourceFile:
    rel = rel if printable else _printable(rel)
    domain, subdomain, from_folder = _domain_of(rel)
    return SourceFile(
        path=full,
        rel=rel,
        domain=domain,
        subdomain=subdomain,
        kind=kind,
        reason=reason,
        problem=f"{rel}: {detail}" if detail else None,
        folder_domain=from_folder,
    )


def _unique_rels(files: list[SourceFile]) -> None:
    """Two real names can print alike (`caf\\xe9` escaped vs a name spelled with a
    backslash): give the later one a `#2` suffix so no manifest line hides another.

    A record file's records are `REL#N` (`records.record_id`), so a record file is told
    apart with `~2` instead, and any other entry named like one of its records (a folder
    `a.jsonl#3`) gets a `#2` suffix of its own: every manifest line's id is one thing."""
    record_files: set[str] = set()
    seen: set[str] = set()
    for sf in sorted(files, key=lambda sf: not is_record_file(sf.rel)):  # record files first
        is_records = is_record_file(sf.rel)
        rel, n = sf.rel, 1
        while rel in seen or (rel.rpartition("#")[0] in record_files and rel.rpartition("#")[2].isdigit()):
            n += 1
            rel = f"{sf.rel}{'~' if is_records else '#'}{n}"
        seen.add(rel)
        if is_records:
            record_files.add(rel)
        sf.rel = rel


def _printable(rel: str) -> str:
    """A file name that is not valid UTF-8 (kept by Python as lone surrogates) with the
    bad bytes written as `\\xNN`, so it can go into JSON and two names that differ only
    in those bytes stay apart; the file is still opened by its real name."""
    try:
        rel.encode("utf-8")
        return rel
    except UnicodeEncodeError:
        return rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _domain_of(rel: str) -> tuple[str, str, bool]:
    parts = rel.split("/")
    if len(parts) >= 3:
        return parts[0], parts[1], True
    if len(parts) == 2:
        return parts[0], "", True
    return DEFAULT_DOMAIN, "", False


# ----------------------------------------------------------------------------- metadata


class SidecarError(ValueError):
    """A sidecar that is not a JSON object."""


def read_sidecar(path: Path, max_bytes: int = SIDECAR_MAX_BYTES) -> dict[str, Any]:
    """The sidecar's metadata as a dict; `SidecarError` (with the reason) if malformed."""
    try:
        raw = read_regular_file(path, max_bytes)
    except UnsafeFile as e:
        raise SidecarError(e.message) from e
    try:
        obj = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise SidecarError(f"not UTF-8 at byte {e.start}") from e
    except json.JSONDecodeError as e:
        raise SidecarError(f"not valid JSON (line {e.lineno} column {e.colno}: {e.msg})") from e
    except RecursionError as e:
        raise SidecarError("not usable JSON (nested too deeply)") from e
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise SidecarError(f"not usable JSON ({e})") from e
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
            if not meta or (i == len(head) - 1 and len(head) > max_lines):
                return None, text
            return meta, text[offset + len(line) + 1 :]
        m = _HEADER_LINE.match(line)
        if m:
            key = m.group(1).strip().lower().replace(" ", "_")  # "Quality Score" -> quality_score
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
