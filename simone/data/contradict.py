"""Contradictions injected into text: the `contradict:P[:KINDS]` data variant of `simone ablate`
and the contradicted twins of the consistency suite's minimal pairs.

The claim under test is that a corpus whose authors agree with one another trains a more
coherent small model. A contradicted variant keeps the corpus's size and style but makes it
stop agreeing with itself: in a seeded share P of the training documents, statements are
flipped by one of three kinds of edit (`KINDS`):

    negation  "is" -> "is not", "shall" -> "shall not", "can" -> "cannot" (inserted at copulas
              and modals), and back: "was not" -> "was", "cannot" -> "can", "isn't" -> "is",
              "did not" -> "did" (removed)
    antonym   a word swapped for its opposite from a small built-in list (`ANTONYM_PAIRS`, both
              directions, case kept; "a good" -> "an evil")
    entity    a name that recurs in the domain swapped for another name of the same domain
              (`name_pool`: capitalised words seen mid-sentence in at least two of its documents,
              and written in lowercase less often)

Density (`FLIP_SHARE`): in a chosen document, each sentence that holds a site is flipped with
probability one half, at one site. One half is the rate at which a document disagrees with
itself most: a statement and each of its restatements are as likely flipped as kept, so
neither reading wins. Flipping every site would give a consistent mirror image of the
document, and flipping a few would leave it mostly in agreement. One site per sentence keeps
each change to one statement and the text close to its size: " not" adds 4 bytes, a swapped
word or name a few, so a chosen document changes by well under 1% of its bytes (0.5% on the
default corpus; `summary["bytes_change"]` reports it). Questions are left alone: they state
nothing to flip.

Everything is decided by hashes of (seed, document id), never by Python's `hash()`, so the same
corpus and seed always give the same variant, and every change is listed (offset into the
original text, kind, before, after) so a person can read what was done.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from simone.data.split import split_key
from simone.errors import SimoneError
from simone.rundir import atomic_write_json, atomic_write_text

KINDS = ("negation", "antonym", "entity")
FLIP_SHARE = 0.5  # share of a chosen document's sentences with a site that get one change (see above)


class ContradictSpecError(SimoneError, ValueError):
    """A `contradict:P[:KINDS]` spec that cannot be read (the message says what is wrong)."""


# ----------------------------------------------------------------------------- word lists
#
# Our own short lists. They aim at edits that really contradict and read as the author's English:
# ambiguous words (right: "right hand"; end: "the end"; before: "before the Lord") are left out.

ANTONYM_PAIRS: tuple[tuple[str, str], ...] = (
    ("good", "evil"),
    ("better", "worse"),
    ("best", "worst"),
    ("light", "darkness"),
    ("love", "hate"),
    ("loves", "hates"),
    ("loved", "hated"),
    ("loving", "hating"),
    ("true", "false"),
    ("truth", "falsehood"),
    ("wise", "foolish"),
    ("wisdom", "folly"),
    ("always", "never"),
    ("life", "death"),
    ("alive", "dead"),
    ("strong", "weak"),
    ("strength", "weakness"),
    ("rich", "poor"),
    ("wealth", "poverty"),
    ("friend", "enemy"),
    ("friends", "enemies"),
    ("peace", "war"),
    ("joy", "sorrow"),
    ("happy", "miserable"),
    ("righteous", "wicked"),
    ("righteousness", "wickedness"),
    ("holy", "profane"),
    ("virtue", "vice"),
    ("honest", "deceitful"),
    ("beautiful", "ugly"),
    ("heaven", "hell"),
    ("blessed", "cursed"),
    ("bless", "curse"),
    ("obey", "disobey"),
    ("obeyed", "disobeyed"),
    ("faithful", "faithless"),
    ("honour", "dishonour"),
    ("honor", "dishonor"),
    ("merciful", "cruel"),
    ("mercy", "cruelty"),
    ("freedom", "slavery"),
    ("liberty", "tyranny"),
    ("victory", "defeat"),
    ("win", "lose"),
    ("won", "lost"),
    ("first", "last"),
    ("more", "less"),
    ("many", "few"),
    ("increase", "decrease"),
    ("accept", "reject"),
    ("accepted", "rejected"),
    ("praise", "blame"),
    ("praised", "blamed"),
    ("clean", "unclean"),
    ("pure", "impure"),
    ("known", "unknown"),
    ("possible", "impossible"),
    ("old", "young"),
    ("great", "small"),
    ("high", "low"),
    ("above", "below"),
    ("open", "shut"),
    ("hot", "cold"),
    ("early", "late"),
    ("sweet", "bitter"),
    ("everything", "nothing"),
    ("agree", "disagree"),
    ("remember", "forget"),
    ("rejoice", "mourn"),
    ("believe", "doubt"),
    ("guilty", "innocent"),
    ("brave", "cowardly"),
    ("courage", "cowardice"),
    ("justice", "injustice"),
    ("lawful", "unlawful"),
    ("worthy", "unworthy"),
    ("able", "unable"),
    ("visible", "invisible"),
    ("mortal", "immortal"),
    ("equal", "unequal"),
    ("day", "night"),
    ("together", "apart"),
)
ANTONYMS: dict[str, str] = dict(ANTONYM_PAIRS) | {b: a for a, b in ANTONYM_PAIRS}

COPULAS = ("is", "are", "was", "were", "am")
MODALS = ("shall", "will", "can", "may", "must", "should", "would", "could", "might")
# "did not" -> "did" reads well; "did" -> "did not" does not when "did" is the main verb
# ("he did it"), so do/does/did and have/has/had are only ever un-negated
UNNEGATE_ONLY = ("do", "does", "did", "has", "have", "had")
NEGATORS = ("not", "never", "no", "none", "nothing", "nor", "neither")  # already negative: leave it
# a copula or modal followed by a subject pronoun is a question ("is he", "shall I"): "is not he"
# is not a statement flipped, so such sites are skipped
SUBJECT_PRONOUNS = ("i", "he", "she", "it", "we", "they", "you", "thou", "ye", "there")
# a modal after a determiner is a noun ("the will of God", "with all his might", "a can")
DETERMINERS = (
    "the",
    "a",
    "an",
    "his",
    "her",
    "my",
    "thy",
    "thine",
    "our",
    "your",
    "their",
    "its",
    "free",
    "own",
    "good",
    "whose",
)
CONTRACTIONS = {
    "isn't": "is",
    "aren't": "are",
    "wasn't": "was",
    "weren't": "were",
    "don't": "do",
    "doesn't": "does",
    "didn't": "did",
    "hasn't": "has",
    "haven't": "have",
    "hadn't": "had",
    "won't": "will",
    "shan't": "shall",
    "can't": "can",
    "couldn't": "could",
    "shouldn't": "should",
    "wouldn't": "would",
    "mustn't": "must",
}
# capitalised mid-sentence but not the name of someone or somewhere in particular, or (God, Lord)
# so frequent in some domains that they would take most of the entity changes
NAME_STOPLIST = frozenset(
    """
    God Lord Sir Madam Mister Mrs Miss Lady King Queen Prince Princess Duke Saint Captain General
    President Chapter Book Section Article Part Volume Psalm Verse Note English Thou Thee Thy Thine
    Nay Yea Yes Amen Selah Ghost Spirit
    January February March April May June July August September October November December
    Monday Tuesday Wednesday Thursday Friday Saturday Sunday
""".split()
)

_WORD_CHARS = r"[\w'’-]"  # a site is a whole word: not part of "well-known" or "truth's"
_ANTONYM_RE = re.compile(
    rf"(?<!{_WORD_CHARS})(" + "|".join(sorted(ANTONYMS, key=len, reverse=True)) + rf")(?!{_WORD_CHARS})", re.IGNORECASE
)
_NEGATE_RE = re.compile(
    rf"(?<!{_WORD_CHARS})(" + "|".join(COPULAS + MODALS) + rf")(?!{_WORD_CHARS})"
    r"(?=(\s+)([\w'’]+))",
    re.IGNORECASE,
)
_UNNEGATE_RE = re.compile(
    rf"(?<!{_WORD_CHARS})(" + "|".join(COPULAS + MODALS + UNNEGATE_ONLY) + r")(\s+not)"
    rf"(?!{_WORD_CHARS})(?!\s+only\b)",
    re.IGNORECASE,
)  # "not only .. but" is no negation
_CANNOT_RE = re.compile(rf"(?<!{_WORD_CHARS})(can)(not)(?!{_WORD_CHARS})", re.IGNORECASE)
_CONTRACTION_RE = re.compile(
    rf"(?<!{_WORD_CHARS})("
    + "|".join(re.escape(c).replace("'", "['’]") for c in CONTRACTIONS)
    + rf")(?!{_WORD_CHARS})",
    re.IGNORECASE,
)
_CAPITALISED = re.compile(rf"(?<!{_WORD_CHARS})[A-Z][a-z]{{2,}}(?!{_WORD_CHARS})")
_LOWERCASE_WORD = re.compile(rf"(?<!{_WORD_CHARS})[a-z]{{3,}}(?!{_WORD_CHARS})")
# a sentence ends at . ! or ? (closing quotes and brackets stay with it) before a space, or at a blank line
_SENTENCE_END = re.compile(r"[.!?]+[\"'”’)\]]*(?=\s|$)|\n[ \t]*\n")
_QUESTION_END = re.compile(r"\?[\"'”’)\]]*\s*$")


# ----------------------------------------------------------------------------- sites


@dataclass(frozen=True)
class Site:
    """One place where a statement can be flipped: `text[start:end]` (== before) -> after."""

    start: int
    end: int
    kind: str
    before: str
    after: str

    def change(self) -> dict:
        return {"offset": self.start, "kind": self.kind, "before": self.before, "after": self.after}


def same_case(word: str, like: str) -> str:
    """`word` in the case of `like`: lower, Capitalised or UPPER (UPPER only for two letters on)."""
    if like.isupper() and len(like) > 1:
        return word.upper()
    if like[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


def _article_for(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" or word.lower().startswith(("hon", "hour")) else "a"


def _previous_word(text: str, pos: int) -> tuple[int, str] | None:
    """(start, word) of the word just before `pos` with only whitespace between; None after
    punctuation or at the start. Walks back a few characters (a regex anchored at `pos` would
    scan the whole text before it, for each site)."""
    i = pos
    while i > 0 and text[i - 1].isspace():
        i -= 1
    j = i
    while j > 0 and (text[j - 1].isalnum() or text[j - 1] in "'’"):
        j -= 1
    return (j, text[j:i]) if j < i else None


def _mid_sentence(text: str, pos: int) -> bool:
    """Whether the character before `pos` on its line, spaces aside, is a lowercase letter, comma
    or semicolon (verse capitalises each line, so a line start is no more a name than a sentence start)."""
    before = text[max(0, pos - 40) : pos].rstrip(" \t")
    return bool(before) and (before[-1].islower() or before[-1] in ",;")


def _negation_sites(text: str) -> list[Site]:
    sites = []
    for m in _NEGATE_RE.finditer(text):
        word, next_word = m.group(1), m.group(3).lower()
        if next_word in NEGATORS or next_word in SUBJECT_PRONOUNS or next_word.endswith(("n't", "n’t")):
            continue
        if word[:1].isupper() and word[1:].islower() and _mid_sentence(text, m.start()):
            continue  # "in May", "Will Shakespeare": a name, not a verb
        previous = _previous_word(text, m.start())
        if word.lower() in MODALS and previous is not None and previous[1].lower() in DETERMINERS:
            continue
        after = word + same_case("not", word) if word.lower() == "can" else f"{word} {same_case('not', word)}"
        sites.append(Site(m.start(), m.end(), "negation", word, after))
    for pattern in (_UNNEGATE_RE, _CANNOT_RE):  # "was not" -> "was", "cannot" -> "can"
        sites += [Site(m.start(), m.end(), "negation", m.group(0), m.group(1)) for m in pattern.finditer(text)]
    for m in _CONTRACTION_RE.finditer(text):
        word = m.group(1)
        sites.append(
            Site(m.start(), m.end(), "negation", word, same_case(CONTRACTIONS[word.lower().replace("’", "'")], word))
        )
    return sites


def _antonym_sites(text: str) -> list[Site]:
    sites = []
    for m in _ANTONYM_RE.finditer(text):
        word = m.group(1)
        if not (word.islower() or word.isupper() or word[1:].islower()):
            continue  # mixed case ("eVil"): not prose
        start, after = m.start(), same_case(ANTONYMS[word.lower()], word)
        previous = _previous_word(text, start)
        if previous is not None and previous[1].lower() in ("a", "an") and previous[1].lower() != _article_for(after):
            # "a good man" -> "an evil man": the article comes with the word it agrees with
            start = previous[0]
            article = previous[1]
            after = same_case(_article_for(after), article) + text[start + len(article) : m.start()] + after
        sites.append(Site(start, m.end(), "antonym", text[start : m.end()], after))
    return sites


def _entity_sites(text: str, name_map: dict[str, str]) -> list[Site]:
    return [
        Site(m.start(), m.end(), "entity", m.group(0), name_map[m.group(0)])
        for m in _CAPITALISED.finditer(text)
        if m.group(0) in name_map
    ]


def find_sites(text: str, kinds: Iterable[str] = KINDS, name_map: dict[str, str] | None = None) -> list[Site]:
    """Every place in `text` where a statement of one of `kinds` can be flipped, sorted and not
    overlapping (the earlier kind in `KINDS` wins an overlap), none in a question. `name_map`
    (name -> another name of the same domain) gives the entity sites; without it there are none."""
    kinds = set(kinds)
    found: list[Site] = []
    if "negation" in kinds:
        found += _negation_sites(text)
    if "antonym" in kinds:
        found += _antonym_sites(text)
    if "entity" in kinds and name_map:
        found += _entity_sites(text, name_map)
    found.sort(key=lambda s: (s.start, KINDS.index(s.kind)))
    questions = [(a, b) for a, b in sentence_spans(text) if _QUESTION_END.search(text, a, b)]
    sites, end, q = [], -1, 0
    for s in found:
        while q < len(questions) and questions[q][1] <= s.start:
            q += 1
        if q < len(questions) and questions[q][0] <= s.start:
            continue  # a question states nothing to flip ("Who is this?" -> "Who is not this?")
        if s.start >= end:
            sites.append(s)
            end = s.end
    return sites


def apply_sites(text: str, sites: Iterable[Site]) -> str:
    """`text` with each (non-overlapping) site's `before` replaced by its `after`."""
    parts, pos = [], 0
    for s in sorted(sites, key=lambda s: s.start):
        parts += [text[pos : s.start], s.after]
        pos = s.end
    return "".join(parts) + text[pos:]


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of each sentence of `text`, its leading whitespace left out: a sentence ends
    at . ! or ? (with any closing quotes) before whitespace, or at a blank line."""
    spans: list[tuple[int, int]] = []
    start = 0
    for m in _SENTENCE_END.finditer(text):
        _add_span(text, start, m.end(), spans)
        start = m.end()
    _add_span(text, start, len(text), spans)
    return spans


def _add_span(text: str, start: int, end: int, spans: list[tuple[int, int]]) -> None:
    while start < end and text[start].isspace():
        start += 1
    if start < end:
        spans.append((start, end))


# ----------------------------------------------------------------------------- names


def name_candidates(text: str) -> Iterable[str]:
    """Capitalised words of 3+ letters that start neither a sentence nor a line (the previous
    character on the line, spaces aside, is a lowercase letter, comma or semicolon), less
    `NAME_STOPLIST`."""
    for m in _CAPITALISED.finditer(text):
        if m.group(0) not in NAME_STOPLIST and _mid_sentence(text, m.start()):
            yield m.group(0)


def name_pool(texts: Iterable[str], min_docs: int = 2, min_count: int = 2) -> list[str]:
    """The names of a domain, sorted: name candidates seen in at least `min_docs` of `texts`,
    at least `min_count` times in all, and more often than the same word in lowercase (a word
    the domain also writes in lowercase, "And" or "Father", is a common word that a title or an
    author's habit capitalised, not a name)."""
    docs_with: Counter[str] = Counter()
    seen: Counter[str] = Counter()
    lowercase: Counter[str] = Counter()
    for text in texts:
        names = Counter(name_candidates(text))
        seen.update(names)
        docs_with.update(names.keys())
        lowercase.update(_LOWERCASE_WORD.findall(text))
    return sorted(
        n for n, k in docs_with.items() if k >= min_docs and seen[n] >= min_count and lowercase[n.lower()] < seen[n]
    )


def name_map_for(text: str, pool: list[str], rng: random.Random) -> dict[str, str]:
    """For each pool name in `text`, another pool name to put in its place: one the text does not
    name, where the pool has one (a name from another document of the domain), else any other.
    One per name, so a document's flipped mentions of "Moses" all name the same other person."""
    present = {m.group(0) for m in _CAPITALISED.finditer(text)} & set(pool)
    absent = [n for n in pool if n not in present]
    return {name: rng.choice(absent or [n for n in pool if n != name]) for name in sorted(present) if len(pool) > 1}


# ----------------------------------------------------------------------------- one text


def choose_sites(text: str, sites: list[Site], rng: random.Random, flip_share: float = FLIP_SHARE) -> list[Site]:
    """The sites to flip: in each sentence that holds any, with probability `flip_share`, one
    of them (its kind drawn first, so a frequent kind does not crowd out the others)."""
    chosen = []
    by_sentence: dict[int, list[Site]] = defaultdict(list)
    spans = sentence_spans(text)
    k = 0
    for s in sites:
        while k + 1 < len(spans) and spans[k][1] <= s.start:
            k += 1
        by_sentence[k].append(s)
    for k in sorted(by_sentence):
        if rng.random() >= flip_share:
            continue
        candidates = by_sentence[k]
        kind = rng.choice(sorted({s.kind for s in candidates}, key=KINDS.index))
        chosen.append(rng.choice([s for s in candidates if s.kind == kind]))
    return chosen


def contradict_text(
    text: str,
    rng: random.Random,
    kinds: Iterable[str] = KINDS,
    pool: Sequence[str] = (),
    flip_share: float = FLIP_SHARE,
) -> tuple[str, list[dict]]:
    """`text` with contradictions of `kinds` injected (`choose_sites`), and the list of changes
    `{offset, kind, before, after}` (offsets into `text`, in order). `pool`: the names of the
    text's domain, for entity swaps. Pure: the same text, rng state, kinds and pool give the
    same result."""
    kinds = tuple(kinds)
    name_map = name_map_for(text, list(pool), rng) if "entity" in kinds else {}
    chosen = choose_sites(text, find_sites(text, kinds, name_map), rng, flip_share)
    return apply_sites(text, chosen), [s.change() for s in chosen]


# ----------------------------------------------------------------------------- the spec


@dataclass(frozen=True)
class ContradictSpec:
    share: float  # of the training documents, per domain
    kinds: tuple[str, ...]

    @property
    def text(self) -> str:
        return f"contradict:{self.share:g}:{'+'.join(self.kinds)}"


def parse_contradict_spec(spec: str) -> ContradictSpec:
    """`contradict:P[:KINDS]`: P in (0, 1], KINDS a `,` or `+` separated subset of negation,
    antonym, entity (all when left out). A spec that does not read raises ContradictSpecError
    with one line saying what is wrong."""
    head, _, rest = spec.partition(":")
    if head != "contradict" or not rest:
        raise ContradictSpecError(
            f"data variant {spec!r}: expected contradict:P[:KINDS], "
            f"e.g. contradict:0.5 or contradict:0.5:negation+antonym"
        )
    share_text, has_kinds, kinds_text = rest.partition(":")
    try:
        share = float(share_text)
    except ValueError:
        share = float("nan")
    if not 0 < share <= 1:  # also false for nan
        raise ContradictSpecError(
            f"data variant {spec!r}: P must be a number in (0, 1] (the share of "
            f"training documents to contradict), got {share_text!r}"
        )
    kinds = [k.strip() for k in re.split(r"[,+]", kinds_text)] if has_kinds else list(KINDS)
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ContradictSpecError(
            f"data variant {spec!r}: unknown kind(s) {', '.join(repr(k) for k in bad)}; "
            f"choose from {', '.join(KINDS)}, separated by , or +"
        )
    return ContradictSpec(share, tuple(k for k in KINDS if k in kinds))


# ----------------------------------------------------------------------------- a corpus


@dataclass
class ContradictedCorpus:
    documents: list[dict]  # every input document, in order; the chosen ones with new text
    changes: list[dict]  # {document, domain, offset, kind, before, after}, offsets into the original text
    summary: dict = field(default_factory=dict)

    def write(self, folder: Path) -> None:
        """`contradictions.jsonl` (one change a line, to read what was done) and
        `contradictions.json` (the summary) in `folder`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(
            folder / "contradictions.jsonl", "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in self.changes)
        )
        atomic_write_json(folder / "contradictions.json", self.summary)


def _doc_id(doc: dict) -> str:
    return str(doc.get("id") or doc.get("path") or "")


def chosen_documents(documents: list[dict], share: float, seed: int) -> set[str]:
    """Ids of the training documents to contradict: per domain, the round(share x n) (at least
    one) with the smallest hash of (seed, id), as split.py chooses validation documents; salted,
    so the choice does not follow the train/validation split's order. Never a document whose
    split is not "train"."""
    by_domain: dict[str, list[str]] = defaultdict(list)
    for doc in documents:
        if doc.get("split") == "train":
            by_domain[str(doc.get("domain"))].append(_doc_id(doc))
    chosen: set[str] = set()
    for ids in by_domain.values():
        ordered = sorted(ids, key=lambda i: (split_key(f"contradict:{i}", seed), i))
        chosen.update(ordered[: max(1, round(share * len(ordered)))])
    return chosen


def contradict_documents(
    documents: list[dict], spec: ContradictSpec, seed: int, flip_share: float = FLIP_SHARE
) -> ContradictedCorpus:
    """The documents of a `documents.jsonl` (every split) with contradictions injected into a
    seeded share `spec.share` of the training documents of each domain; validation and
    held-out documents (any split but "train") come back untouched. Entity swaps draw on the
    names of the document's own domain, found in its training documents only."""
    chosen = chosen_documents(documents, spec.share, seed)
    pools: dict[str, list[str]] = {}
    if "entity" in spec.kinds:
        texts: dict[str, list[str]] = defaultdict(list)
        for doc in documents:
            if doc.get("split") == "train":
                texts[str(doc.get("domain"))].append(doc.get("text") or "")
        pools = {domain: name_pool(t, min_docs=min(2, len(t))) for domain, t in texts.items()}
    out, changes = [], []
    per_kind = Counter(dict.fromkeys(spec.kinds, 0))
    bytes_before = bytes_after = n_changed = n_train = 0
    for doc in documents:
        text = doc.get("text") or ""
        if doc.get("split") == "train":
            n_train += 1
            bytes_before += len(text.encode("utf-8"))
            if _doc_id(doc) in chosen:
                # bandit B311: a seeded generator makes the corpus reproducible; nothing here is secret
                rng = random.Random(split_key(f"contradict-sites:{_doc_id(doc)}", seed))  # nosec B311
                domain = str(doc.get("domain"))
                text, doc_changes = contradict_text(text, rng, spec.kinds, pools.get(domain, []), flip_share)
                if doc_changes:
                    n_changed += 1
                    doc = doc | {"text": text}
                for c in doc_changes:
                    changes.append({"document": _doc_id(doc), "domain": domain, **c})
                    per_kind[c["kind"]] += 1
            bytes_after += len(text.encode("utf-8"))
        out.append(doc)
    summary = {
        "spec": spec.text,
        "share": spec.share,
        "kinds": list(spec.kinds),
        "seed": seed,
        "flip_share": flip_share,
        "training_documents": n_train,
        "documents_chosen": len(chosen),
        "documents_changed": n_changed,
        "changes": sum(per_kind.values()),
        "changes_per_kind": dict(per_kind),
        "names_per_domain": {d: len(p) for d, p in sorted(pools.items())},
        "training_bytes_before": bytes_before,
        "training_bytes_after": bytes_after,
        "bytes_change": (bytes_after - bytes_before) / bytes_before if bytes_before else 0.0,
    }
    return ContradictedCorpus(out, changes, summary)
