"""A corpus built to break curation: every hostile case we know of, in one small tree.

`build_hostile_corpus(base)` writes `base/corpus` (the corpus) and `base/outside` (files
that links inside the corpus point to, holding `SECRET`, which must never be read) and
returns what curation must report for each entry. Used by tests/test_curate_hostile.py;
no tests here. Sizes are small so the test stays fast: the "huge" file is sparse (it
costs no disk and no time to write), the run of spaces is a few MB.

Cases (the issue-13 item in brackets):
  links out of the corpus, absolute, relative, to /proc and to a FIFO; a sidecar and an
  orphan sidecar linking out [9]; FIFOs, a socket, a character device and `/dev/zero`
  links named `.txt` and `.json` [10]; a file over the size limit [11]; megabytes of
  spaces with no newline, thousands of end-marker-like lines [12]; dot-files and a
  dot-folder, symlinked folders (in and out), two names differing only in invalid bytes,
  a 1,000-deep tree, a folder we may not list (unless root) [13]; Rich markup in file
  and folder names [14]; and the classes handled before: empty, whitespace, binary, not
  UTF-8, exact duplicate, too short, orphan sidecar, bad/deeply nested/huge-number/oversized
  sidecar JSON, a folder named `.txt`, dangling and looping links, an in-corpus link.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tests.curate_helpers import book, meta, write_doc

SECRET = "hostile-corpus-secret-5b1e9d"  # in every file outside the corpus; must never be read
KEPT = "kept"  # expected "reason" for a file that must be kept with no problem


@dataclass
class HostileCorpus:
    root: Path  # the corpus
    outside: Path  # targets of links leading out of the corpus
    expected: dict[str, str]  # manifest path -> the reason code its line must carry (or KEPT)
    ignored: set[str]  # files that are not inputs: listed in `CurateResult.ignored`
    never_opened: list[Path] = field(default_factory=list)  # corpus entries nothing may open or list
    not_built: dict[str, str] = field(default_factory=dict)  # case -> why it could not be built here


def build_hostile_corpus(base: Path, spaces_bytes: int = 3_000_000, huge_bytes: int = 100 * 2**20,
                         depth: int = 1000) -> HostileCorpus:
    root, outside = base / "corpus", base / "outside"
    outside.mkdir(parents=True)
    (outside / "secret.txt").write_text(f"{SECRET} private key material\n" * 50)
    (outside / ".ssh").mkdir()
    (outside / ".ssh" / "id_rsa").write_text(f"-----BEGIN KEY-----\n{SECRET}\n" * 50)
    (outside / "meta.json").write_text(json.dumps({"title": SECRET, "author": SECRET, "category": SECRET}))
    (outside / "folder").mkdir()
    (outside / "folder" / "inside-outside.txt").write_text(book(SECRET, SECRET, 99))
    os.mkfifo(outside / "pipe")
    hc = HostileCorpus(root=root, outside=outside, expected={}, ignored=set())

    def add(rel: str, text: str | bytes, reason: str, m: dict | None = None, sidecar: str | None = None) -> None:
        write_doc(root, rel, text, m, sidecar)
        hc.expected[rel] = reason

    def link(rel: str, target: str | Path, reason: str, never_opened: bool = True) -> None:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, root / rel)
        hc.expected[rel] = reason
        if never_opened:
            hc.never_opened.append(root / rel)

    # good books so the stage has work to keep; some named like Rich markup [14] (a name
    # cannot hold "/", so "notes[/].txt" is the file "].txt" in a folder "notes[": the
    # crash needs "[/", which only a path joined from two names holds)
    for i, rel in enumerate(("good/a/one.txt", "good/a/two.txt", "good/b/three.txt", "good/b/four.txt",
                             "[bold]odd/[red]sub/tale.txt", "markup/x/notes[/].txt", "markup/x/[/red]tale.txt")):
        domain, sub = rel.split("/")[:2]
        add(rel, book(f"Tale Number {i}", "Ann Oak", 900 + i), KEPT, meta(f"Tale Number {i}", "Ann Oak", domain, sub))
    write_doc(root, "markup/x/notes[/].md", "# notes\n")  # [14] not inputs, but listed by name
    write_doc(root, "markup/x/[/]notes.md", "# notes\n")
    write_doc(root, "README.md", "about this corpus\n")
    hc.ignored |= {"markup/x/notes[/].md", "markup/x/[/]notes.md", "README.md"}

    # classes handled before
    d = "misc/x/"
    add(d + "empty.txt", b"", "empty")
    add(d + "blank.txt", " \n\t\n" * 100, "empty")
    rng = random.Random(0)
    add(d + "binary.txt", bytes(rng.randrange(256) for _ in range(5000)), "binary")
    add(d + "latin1.txt", book("Winter Letters", "Iris Penn", 20).encode()[:900] + b"caf\xe9 and more", "not_utf8")
    add(d + "short.txt", "A short note about the harbor.", "too_short")
    add(d + "copy.txt", book("Tale Number 0", "Ann Oak", 900), "exact_duplicate")
    (root / d / "orphan.json").write_text('{"title": "nothing"}')
    hc.expected[d + "orphan.json"] = "orphan_sidecar"
    add(d + "bad-json.txt", book("Paper Boats", "Pia Holt", 33), "bad_sidecar", sidecar="{ not json")
    add(d + "nested-json.txt", book("Deep Water", "Pia Holt", 34), "bad_sidecar", sidecar="[" * 200_000)
    add(d + "big-number.txt", book("Long Count", "Pia Holt", 35), "bad_sidecar", sidecar='{"title": ' + "9" * 5000 + "}")
    add(d + "fat-sidecar.txt", book("Heavy Notes", "Pia Holt", 36), "bad_sidecar",
        sidecar=json.dumps({"title": "x", "pad": "y" * 2_000_000}))
    (root / d / "folder.txt").mkdir()
    hc.expected[d + "folder.txt"] = "not_regular_file"
    link(d + "dangling.txt", root / d / "missing.txt", "unreadable")
    link(d + "loop-a.txt", root / d / "loop-b.txt", "unreadable")
    link(d + "loop-b.txt", root / d / "loop-a.txt", "unreadable")
    link(d + "inside-link.txt", "../../good/a/two.txt", "exact_duplicate", never_opened=False)  # inside: read
    (root / d / ".DS_Store").write_bytes(b"\x00\x01")
    hc.ignored.add(d + ".DS_Store")

    # [9] links leading out of the corpus: never opened, whatever they are named
    d = "leak/x/"
    link(d + "secret.txt", outside / "secret.txt", "outside_corpus")
    link(d + "relative.txt", os.path.relpath(outside / "secret.txt", root / d), "outside_corpus")
    link(d + "id_rsa.txt", outside / ".ssh" / "id_rsa", "outside_corpus")
    link(d + "environ.txt", "/proc/self/environ", "outside_corpus")
    link(d + "pipe-outside.txt", outside / "pipe", "outside_corpus")
    add(d + "with-leaky-sidecar.txt", book("Open Door", "Cal Reed", 40), "bad_sidecar")
    link(d + "with-leaky-sidecar.json", outside / "meta.json", "outside_corpus")
    link(d + "orphan-leak.json", outside / "meta.json", "outside_corpus")

    # [10] things that are not regular files, named like inputs (texts and sidecars)
    d = "special/x/"
    (root / d).mkdir(parents=True)
    os.mkfifo(root / d / "pipe.txt")
    hc.expected[d + "pipe.txt"] = "not_regular_file"
    add(d + "fifo-sidecar.txt", book("Still Pond", "Dee Fenn", 50), "bad_sidecar")
    os.mkfifo(root / d / "fifo-sidecar.json")
    hc.expected[d + "fifo-sidecar.json"] = "not_regular_file"
    os.mkfifo(root / d / "lonely.json")
    hc.expected[d + "lonely.json"] = "not_regular_file"
    hc.never_opened += [root / d / "pipe.txt", root / d / "fifo-sidecar.json", root / d / "lonely.json"]
    link(d + "zero.txt", "/dev/zero", "outside_corpus")
    add(d + "zero-sidecar.txt", book("Cold Spring", "Dee Fenn", 51), "bad_sidecar")
    link(d + "zero-sidecar.json", "/dev/zero", "outside_corpus")
    _make_socket(root / d / "socket.txt")
    hc.expected[d + "socket.txt"] = "not_regular_file"
    hc.never_opened.append(root / d / "socket.txt")
    try:
        os.mknod(root / d / "device.txt", stat.S_IFCHR | 0o600, os.makedev(1, 5))  # a /dev/zero device node
        hc.expected[d + "device.txt"] = "not_regular_file"
        hc.never_opened.append(root / d / "device.txt")
    except OSError as e:  # needs root (CAP_MKNOD)
        hc.not_built["device node"] = f"mknod: {e.strerror}"

    # [11] over the size limit: a sparse file, so writing it costs nothing
    (root / "huge/x").mkdir(parents=True)
    with open(root / "huge/x/huge.txt", "wb") as f:
        f.truncate(huge_bytes)
    hc.expected["huge/x/huge.txt"] = "too_large"
    hc.never_opened.append(root / "huge/x/huge.txt")

    # [12] texts that make regular expressions backtrack
    add("slow/x/spaces.txt", "word " + " " * spaces_bytes + "end", "too_short")
    add("slow/x/end-markers.txt", "End of the Project Gutenberg work\n" * (1_000_000 // 34), "boilerplate_stripped")

    # [13] entries that used to vanish without a manifest line
    d = "names/x/"
    add(d + ".hidden.txt", book("Hidden Tale", "Eve Moss", 60), "hidden")
    hc.never_opened.append(root / d / ".hidden.txt")
    write_doc(root, ".git/config.txt", f"{SECRET} in a dot-folder\n")
    hc.expected[".git"] = "hidden"
    hc.never_opened.append(root / ".git")
    link("linked/x/to-good", root / "good", "symlinked_dir")
    link("linked/x/to-outside", outside / "folder", "symlinked_dir")
    for byte, seed in ((b"\xe9", 61), (b"\xe8", 62)):  # two names that differ only in an invalid byte
        name = os.fsdecode(b"caf" + byte + b".txt")
        write_doc(root, d + name, book(f"Cafe Story {seed}", "Flo Dune", seed))
        hc.expected[d + "caf\\x" + byte.hex() + ".txt"] = KEPT
    deep = root / "deep"
    deep.mkdir()
    for _ in range(depth):  # level by level: Path.mkdir(parents=True) recurses once per level
        deep = deep / "d"
        deep.mkdir()
    (deep / "bottom.txt").write_text(book("Bottom of the Well", "Gus Lind", 63))
    hc.expected[(deep / "bottom.txt").relative_to(root).as_posix()] = KEPT
    if os.geteuid() != 0:
        locked = root / "denied" / "x" / "locked"
        write_doc(root, "denied/x/locked/inside.txt", book("Locked Room", "Hal Vest", 64))
        locked.chmod(0)
        hc.expected["denied/x/locked"] = "unreadable"
    else:  # root lists any folder: tests/test_curate_hostile.py simulates this case instead
        hc.not_built["permission-denied folder"] = "running as root, which may list any folder"
    return hc


def _make_socket(path: Path) -> None:
    """A Unix socket file at `path` (bound in a short temporary folder, then moved: socket
    paths are limited to ~108 bytes)."""
    short = Path(tempfile.mkdtemp(prefix="sock"))
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(str(short / "s"))
        os.rename(short / "s", path)
    finally:
        s.close()
        shutil.rmtree(short, ignore_errors=True)


def snapshot(root: Path) -> dict[str, tuple]:
    """Everything about the tree that curation must not change: bytes of regular files,
    link targets, modes and times. Never follows a link, never opens anything but regular
    files, keeps its own stack (the tree is 1,000 folders deep)."""
    out: dict[str, tuple] = {}
    stack = [root]
    while stack:
        here = stack.pop()
        try:
            names = sorted(os.listdir(here))
        except PermissionError:
            continue
        for name in names:
            p = here / name
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[str(p)] = ("link", os.readlink(p))
            elif stat.S_ISREG(st.st_mode):
                out[str(p)] = ("file", _sha256(p), st.st_mode, st.st_size, st.st_mtime_ns)
            else:
                out[str(p)] = ("other", st.st_mode, st.st_mtime_ns)
                if stat.S_ISDIR(st.st_mode):
                    stack.append(p)
    return out


def _sha256(p: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def remove_tree(path: Path) -> None:
    """`shutil.rmtree` without recursion (Python 3.11's recurses once per level) and with
    locked folders unlocked first."""
    stack, dirs = [Path(path)], []
    while stack:
        d = stack.pop()
        os.chmod(d, 0o700)
        dirs.append(d)
        for name in os.listdir(d):
            p = d / name
            if os.path.isdir(p) and not os.path.islink(p):
                stack.append(p)
            else:
                os.unlink(p)
    for d in reversed(dirs):
        os.rmdir(d)
