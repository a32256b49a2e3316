"""Does a text hold the work its metadata names? (the `title_mismatch` check)

A text is flagged when neither its title nor its author's name is anywhere near the start
of the cleaned text, or when a Project Gutenberg line inside it names a different title.
Matching is by words, ignoring case, punctuation, apostrophes and small words, so
"Uncle Toms Cabin" matches "Uncle Tom’s Cabin" and "Julius Caesar" matches
"The Tragedie of Julius Caesar".
"""

from __future__ import annotations

import re
import unicodedata

HEAD_WORDS = 600  # "near the start": the first this many words of the cleaned text
_SMALL = frozenset(
    "the a an of and or in on to for by with at from vol volume part book collected works "
    "complete edition being its his her their our".split()
)


def _words(s: str) -> list[str]:
    s = re.sub(r"\([^)]*\)|\[[^\]]*\]", " ", s)  # "(King James Version)", "[1867 Edition]"
    s = unicodedata.normalize("NFKD", s.lower())
    s = "".join(ch for ch in s if not unicodedata.combining(ch))
    s = re.sub(r"['’`]", "", s)
    return re.findall(r"[a-z0-9]+", s)


# titles made of these words (plus the author's name) name a collection, not one work
_GENERIC = frozenset(
    "tales stories essays poems poetry writings works selected collected complete letters sermons".split()
)


def _stem(w: str) -> str:
    return w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w


def content_words(s: str) -> set[str]:
    return {_stem(w) for w in _words(s) if w not in _SMALL and len(w) > 1}


def is_generic(title: str, author: str | None = None) -> bool:
    """ "Washington Irving Tales", "Essays": a collection; any work inside it may be named."""
    words = content_words(title) - content_words(author or "")
    return all(w in _GENERIC or w + "s" in _GENERIC for w in words)


def titles_agree(a: str, b: str) -> bool:
    """Two titles name the same work: most content words of the shorter are in the longer."""
    wa, wb = content_words(a), content_words(b)
    if not wa or not wb:
        return True  # nothing to compare
    small, big = (wa, wb) if len(wa) <= len(wb) else (wb, wa)
    return len(small & big) / len(small) >= 0.5


def title_found(title: str, head: set[str]) -> bool:
    words = content_words(title)
    if not words:
        return True
    need = len(words) if len(words) <= 2 else max(2, int(0.6 * len(words) + 0.5))
    return len(words & head) >= need


def author_found(author: str, head: set[str]) -> bool:
    """The author's surname (the last real word of the name) is among the head words.

    Surnames only: "Charles Stanley" must not match a text by Charles Dickens.
    """
    words = [w for w in _words(author) if len(w) > 2 and w not in _NOT_SURNAME]
    if not words:
        return True  # "Various", initials only: nothing to check
    return _stem(words[-1]) in head


_NOT_SURNAME = frozenset("various anonymous unknown and the jr sr iii pere fils translators translator editor".split())


def check_label(title: str | None, author: str | None, text: str, named_titles: list[str]) -> str | None:
    """None when the text fits its metadata, else a short explanation of the mismatch."""
    if not title:
        return None
    for named in named_titles:
        if is_generic(title, author) or is_generic(named):
            continue
        if not titles_agree(named, title):
            return f"text names a different title: {named!r} (metadata: {title!r})"
    head = {_stem(w) for w in _words(" ".join(text[:20000].split()[:HEAD_WORDS]))}
    if title_found(title, head) or (author and author_found(author, head)):
        return None
    first_line = next((ln.strip() for ln in text.split("\n") if ln.strip()), "")[:80]
    who = f" nor author {author!r}" if author else ""
    return f"neither title {title!r}{who} near the start (it begins {first_line!r})"
