"""The offline consistency suite (`simone eval --suite`): tasks built once from held-out
documents, written as JSONL so that every model sees the same items, and scored on any model
that `simone eval` reads (a run, a package, `hf:DIR`, a GGUF file: a `text_bpb.Scorer`).

Tasks (the `task` field of an item; every item also has `schema`, `id`, `domain`, `doc`):

    bpb    held-out text, scored as `simone eval` scores a file: bits per byte per domain
    pair   a minimal pair: a held-out sentence (`good`) and its twin with one contradiction
           injected (`bad`, by `simone.data.contradict`, the transforms of the contradicted data
           variants). Right when the model gives `good` fewer bits (a higher log-probability)
           read as a document on its own (after the document-start token); a tie counts one
           half, so a model that cannot tell the two apart scores 0.5. Reported per `kind`
           (negation, antonym, entity), so that an effect on the kind a variant injected can be
           told from an effect on the kinds it did not. User pairs (`read_user_pairs`, BLiMP's
           convention) are scored the same way and reported apart.
    cloze  LAMBADA-style: a passage of whole sentences whose last word the model must produce.
           The model continues `context` greedily; its first word (split at whitespace and
           dashes, punctuation stripped from both ends) must equal `target` exactly, case
           included. Targets are content words of 3+ letters (not in capitals: "YORK." is a
           speaker) that the passage has named before, so that the word can be recovered from
           the passage, as LAMBADA's are chosen. A passage is the whole sentences before the
           target's, 25 to 120 words in all.
    gen    generation health: a held-out prompt continued greedily for `max_tokens` tokens;
           distinct-2 (distinct word bigrams / bigrams) and the share of word 4-grams that
           repeat an earlier 4-gram of the same continuation (greedy decoding of a small model
           that loops shows here first).

Building is deterministic given the documents and the seed (every choice is a hash of the seed
and the text's place, as `simone.data.split` chooses). Held-out documents only: a run's
validation split (whole documents and held-out tails), which no model of the run trained on.
Cloze and gen need greedy decoding (`greedy` and `decoder` on the scorer, see text_bpb); a
scorer without them gets those tasks reported as "not scored: <reason>".
"""

from __future__ import annotations

import json
import random
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

from simone.data.contradict import KINDS, apply_sites, find_sites, name_map_for, name_pool, sentence_spans
from simone.data.documents import numbered_documents, read_documents
from simone.data.split import split_key
from simone.errors import SimoneError
from simone.inference.text_bpb import load_scorer, read_text_folder
from simone.rundir import RunDir, atomic_write_text

SUITE_SCHEMA = 1
TASKS = ("bpb", "pair", "cloze", "gen")
CLOZE_TOKENS = 12  # greedy tokens for a cloze answer: enough for a long word and what follows it
# words a cloze target may not be: the last word of a sentence should be one a reader infers
FUNCTION_WORDS = frozenset(
    """
    the and that with for not but his her him them they you your yours thee thou thy thine
    was were are is be been being have has had will shall would should could might must may
    this these those there then than from into unto upon which who whom whose what when where
    all any one some our ours its it their theirs she he we me my mine also out off over too
    very much more most such only own same other so yet nor now here how why did does done
""".split()
)
_SENTENCE_ENDS = re.compile(r"[.!?][\"'”’)\]]*$")
_LAST_WORD = re.compile(r"(?<= )([A-Za-z][a-z]{2,})[.!?]+[\"'”’)\]]*$")  # not "YORK." (a speaker)
_WORDS = re.compile(r"[\w'’]+")
_FIRST_WORD = re.compile(r"[^\s—–]+")  # a word ends at whitespace or a dash


class SuiteError(SimoneError, ValueError):
    """A suite or pairs file that cannot be read (the message names the file, line and problem)."""


@dataclass
class SuiteSettings:
    """How many items of each task to build, and how long they are."""

    seed: int = 0
    pairs_per_kind: int = 100  # per domain and kind
    cloze_per_domain: int = 100
    prompts_per_domain: int = 20
    bpb_chars_per_domain: int = 200_000  # held-out text per domain for bits per byte
    sentence_words: tuple[int, int] = (6, 40)  # a minimal pair's sentence, in words
    cloze_words: tuple[int, int] = (25, 120)  # a cloze passage, in words
    prompt_words: int = 24
    gen_tokens: int = 64  # tokens of each continuation for generation health

    @classmethod
    def sized(cls, items: int, seed: int = 0) -> SuiteSettings:
        """`items` per domain and task (minimal pairs: per kind too; prompts: a fifth), the
        one knob `--suite-items` turns."""
        return cls(seed=seed, pairs_per_kind=items, cloze_per_domain=items, prompts_per_domain=max(1, items // 5))


# ----------------------------------------------------------------------------- held-out documents


def heldout_documents(source: Path) -> list[dict]:
    """The held-out documents under `source`, as {id, domain, text}: a run directory or a
    `documents.jsonl` (its validation split: whole documents and held-out tails, which the run
    never trained on), or a folder of `.txt` files (every file, its domain the first folder)."""

    source = Path(source)
    documents = source if source.is_file() else RunDir(source).documents
    if documents.is_file():
        try:
            docs = [
                {"id": str(d.get("id") or d.get("path")), "domain": str(d.get("domain")), "text": d.get("text") or ""}
                for d in read_documents(documents, "val")
            ]
        except ValueError as e:
            raise SuiteError(str(e)) from None
        if not docs:
            raise SuiteError(f"{documents}: no validation documents to build the suite from")
        return docs
    return [
        {"id": str(f.path.relative_to(source)), "domain": f.domain, "text": f.text} for f in read_text_folder(source)
    ]


# ----------------------------------------------------------------------------- building


def _ranked(keys: Iterable[Any], salt: str, seed: int) -> list[Any]:
    """`keys` in a seeded order that depends only on each key (so adding text moves nothing else)."""
    return sorted(keys, key=lambda k: (split_key(f"{salt}:{k}", seed), str(k)))


def _sentences(text: str) -> list[str]:
    """The sentences of `text` with their whitespace made single spaces."""
    return [" ".join(text[a:b].split()) for a, b in sentence_spans(text)]


def _is_sentence(s: str, words: tuple[int, int]) -> bool:
    """A whole sentence of bounded length: a capital (or an opening quote) first, . ! or ? last."""
    n = len(s.split())
    return words[0] <= n <= words[1] and (s[:1].isupper() or s[:1] in "\"'“‘(") and bool(_SENTENCE_ENDS.search(s))


def build_pairs(by_domain: dict[str, list[dict]], settings: SuiteSettings) -> list[dict]:
    """Per domain and kind, up to `pairs_per_kind` held-out sentences with a site of that kind,
    each with its twin: the same sentence with one site flipped. A sentence may serve several
    kinds (one pair each); the same sentence twice in a domain serves once.

    Balanced for length: as many twins longer than their sentence as shorter (in characters;
    the same length counts for neither). A model's log-probability falls with every token, so
    without this a model that knows nothing but length wins most negation pairs (inserting
    "not" is far more common than removing it): ~70% for a barely trained one."""
    items = []
    for domain, docs in sorted(by_domain.items()):
        pool = name_pool((d["text"] for d in docs), min_docs=min(2, len(docs)))
        sentences: dict[str, str] = {}  # sentence -> the first document that has it
        for d in docs:
            for s in _sentences(d["text"]):
                if _is_sentence(s, settings.sentence_words):
                    sentences.setdefault(s, d["id"])
        for kind in KINDS:
            chosen: list[dict] = []
            quota = {-1: settings.pairs_per_kind // 2, 1: settings.pairs_per_kind // 2}  # shorter / longer twins
            for s in _ranked(sentences, f"pair:{domain}:{kind}", settings.seed):
                if len(chosen) >= settings.pairs_per_kind:
                    break
                # bandit B311: a seeded generator makes the suite reproducible; nothing here is secret
                rng = random.Random(split_key(f"pair-site:{kind}:{s}", settings.seed))  # nosec B311
                name_map = name_map_for(s, pool, rng) if kind == "entity" else None
                sites = [site for site in find_sites(s, (kind,), name_map) if quota.get(_length_sign(site), 1) > 0]
                if not sites:
                    continue
                site = rng.choice(sites)
                if _length_sign(site):
                    quota[_length_sign(site)] -= 1
                chosen.append(
                    {
                        "task": "pair",
                        "domain": domain,
                        "kind": kind,
                        "doc": sentences[s],
                        "good": s,
                        "bad": apply_sites(s, [site]),
                        "change": site.change(),
                        "_sign": _length_sign(site),
                    }
                )
            # where one side ran short, drop the other side's last ones: the two stay equal
            surplus = {sign: quota[-sign] - quota[sign] for sign in (-1, 1)}
            for item in reversed(list(chosen)):
                if surplus.get(item["_sign"], 0) > 0:
                    chosen.remove(item)
                    surplus[item["_sign"]] -= 1
            for n, item in enumerate(chosen):
                del item["_sign"]
                items.append({**item, "id": f"pair/{domain}/{kind}/{n}"})
    return items


def _length_sign(site: Any) -> int:
    """-1, 0 or 1: the twin is shorter, as long, or longer than the sentence (in characters)."""
    change = site.change()
    return (len(change["after"]) > len(change["before"])) - (len(change["after"]) < len(change["before"]))


def cloze_item(sentences: list[str], i: int, words: tuple[int, int]) -> dict | None:
    """{context, target} for a passage ending with sentence `i`, or None when that sentence
    does not end in a content word of 3+ letters that the passage names before, or when the
    passage (as many whole sentences before it as fit in `words[1]` words) is under `words[0]`."""
    m = _LAST_WORD.search(sentences[i])
    if m is None or m.group(1).lower() in FUNCTION_WORDS:
        return None
    first, n = i, len(sentences[i].split())
    while first > 0 and n + len(sentences[first - 1].split()) <= words[1]:
        first -= 1
        n += len(sentences[first].split())
    if not words[0] <= n <= words[1]:
        return None
    passage = " ".join(sentences[first : i + 1])
    target = m.group(1)
    context = passage[: len(passage) - len(sentences[i]) + m.start(1)].rstrip()
    if target.lower() not in {w.lower() for w in _WORDS.findall(context)}:
        return None
    return {"context": context, "target": target}


def _items_at_sentences(
    by_domain: dict[str, list[dict]],
    task: str,
    per_domain: int,
    seed: int,
    make: Callable[[list[str], int], dict | None],
) -> list[dict]:
    """Per domain, up to `per_domain` items of `task`: `make(sentences, i)` (None: no item there)
    at each sentence of each document, the sentences taken in a seeded order."""
    items = []
    for domain, docs in sorted(by_domain.items()):
        split = {d["id"]: _sentences(d["text"]) for d in docs}
        places = [(doc_id, i) for doc_id, sents in split.items() for i in range(len(sents))]
        n = 0
        for doc_id, i in _ranked(places, f"{task}:{domain}", seed):
            if n >= per_domain:
                break
            found = make(split[doc_id], i)
            if found is not None:
                items.append({"task": task, "id": f"{task}/{domain}/{n}", "domain": domain, "doc": doc_id, **found})
                n += 1
    return items


def build_cloze(by_domain: dict[str, list[dict]], settings: SuiteSettings) -> list[dict]:
    def make(sentences: list[str], i: int) -> dict | None:
        return cloze_item(sentences, i, settings.cloze_words)

    return _items_at_sentences(by_domain, "cloze", settings.cloze_per_domain, settings.seed, make)


def build_prompts(by_domain: dict[str, list[dict]], settings: SuiteSettings) -> list[dict]:
    """Per domain, `prompts_per_domain` prompts: the first `prompt_words` words from the start
    of a held-out sentence (one that starts with a capital)."""
    n = settings.prompt_words

    def make(sentences: list[str], i: int) -> dict | None:
        words = " ".join(sentences[i : i + n]).split()[:n]
        if not sentences[i][:1].isupper() or len(words) < n:
            return None
        return {"prompt": " ".join(words), "max_tokens": settings.gen_tokens}

    return _items_at_sentences(by_domain, "gen", settings.prompts_per_domain, settings.seed, make)


def build_bpb(by_domain: dict[str, list[dict]], settings: SuiteSettings) -> list[dict]:
    """Per domain, held-out documents in id order up to `bpb_chars_per_domain` characters (the
    last one cut at a line break, else at a space)."""
    items = []
    for domain, docs in sorted(by_domain.items()):
        left, n = settings.bpb_chars_per_domain, 0
        for d in docs:
            text = d["text"]
            if left <= 0:
                break
            if len(text) > left:
                cut = text.rfind("\n", 0, left)
                cut = cut if cut > 0 else text.rfind(" ", 0, left)
                text = text[: cut if cut > 0 else left]
            if text.strip():
                items.append({"task": "bpb", "id": f"bpb/{domain}/{n}", "domain": domain, "doc": d["id"], "text": text})
                n += 1
                left -= len(text)
    return items


def build_suite(documents: Iterable[dict], settings: SuiteSettings | None = None) -> list[dict]:
    """The suite's items from held-out `documents` ({id, domain, text}): bpb, pair, cloze and gen
    items, each with its `schema` (every line of the file is an item, so a file can be filtered
    or joined line by line). The same documents, in any order, and settings give the same items."""
    settings = settings or SuiteSettings()
    by_domain: dict[str, list[dict]] = defaultdict(list)
    for d in documents:
        by_domain[str(d["domain"])].append(d)
    for docs in by_domain.values():
        docs.sort(key=lambda d: d["id"])
    items = (
        build_bpb(by_domain, settings)
        + build_pairs(by_domain, settings)
        + build_cloze(by_domain, settings)
        + build_prompts(by_domain, settings)
    )
    return [{"schema": SUITE_SCHEMA, **item} for item in items]


# ----------------------------------------------------------------------------- files


def write_suite(path: Path, items: list[dict]) -> None:
    """The items, one JSON object a line (written atomically)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(path), "".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items))


_REQUIRED = {"bpb": ("text",), "pair": ("good", "bad"), "cloze": ("context", "target"), "gen": ("prompt", "max_tokens")}


def _json_lines(path: Path, what: str) -> list[tuple[int, Any]]:
    """(line number, value) of each non-blank line of a JSONL file, read by the project's one
    JSONL reader; a file that cannot be read, or a line that is not JSON, raises SuiteError
    naming the file (and the line)."""
    try:
        return list(numbered_documents(Path(path)))
    except (OSError, UnicodeDecodeError) as e:
        raise SuiteError(f"{path}: cannot read {what} ({e})") from None
    except ValueError as e:  # numbered_documents: "PATH:LINE: not valid JSON (...)"
        raise SuiteError(str(e)) from None


def read_suite(path: Path) -> list[dict]:
    """The items of a suite file; a line that is not a suite item of this schema raises SuiteError
    naming the file and line."""
    items = []
    for lineno, item in _json_lines(path, "the suite"):
        if not isinstance(item, dict) or item.get("schema") != SUITE_SCHEMA:
            raise SuiteError(
                f"{path}:{lineno}: not a suite item of schema {SUITE_SCHEMA} (rebuild the suite with this version)"
            )
        # str(): a task that is not a string (a list, say) is refused below, not a TypeError here
        missing = [f for f in (*_REQUIRED.get(str(item.get("task")), ("task",)), "domain") if f not in item]
        if item.get("task") not in TASKS or missing:
            raise SuiteError(
                f"{path}:{lineno}: task {item.get('task')!r} "
                + (f"lacks {', '.join(missing)}" if item.get("task") in TASKS else f"is not one of {', '.join(TASKS)}")
            )
        items.append(item)
    if not items:
        raise SuiteError(f"{path}: no items")
    return items


def load_or_build_suite(
    path: Path, documents: Callable[[], Iterable[dict]], settings: SuiteSettings | None = None
) -> list[dict]:
    """The suite in `path`, built from `documents()` and written there first if it is not there
    yet: written once, so that every model, now and later, sees the same items."""
    if not Path(path).exists():
        write_suite(path, build_suite(documents(), settings))
    return read_suite(path)


def read_user_pairs(path: Path) -> list[dict]:
    """Pairs a user brings (`--pairs FILE.jsonl`), BLiMP's convention: each line an object with
    `good` and `bad` (or `sentence_good` and `sentence_bad`), and optionally `domain` and `kind`.
    A line that is not such an object raises SuiteError naming the file and line."""
    items: list[dict] = []
    for lineno, obj in _json_lines(path, "the pairs"):
        if not isinstance(obj, dict):
            raise SuiteError(f'{path}:{lineno}: expected an object with "good" and "bad"')
        good, bad = obj.get("good", obj.get("sentence_good")), obj.get("bad", obj.get("sentence_bad"))
        for name, value in (("good", good), ("bad", bad)):
            if not isinstance(value, str) or not value.strip():
                raise SuiteError(f'{path}:{lineno}: "{name}" must be a non-empty string')
        if good == bad:
            raise SuiteError(f'{path}:{lineno}: "good" and "bad" are the same sentence')
        for name in ("domain", "kind"):
            if obj.get(name) is not None and not isinstance(obj[name], str):
                raise SuiteError(f'{path}:{lineno}: "{name}" must be a string')
        items.append(
            {
                "schema": SUITE_SCHEMA,
                "task": "pair",
                "source": "user",
                "id": f"user/{len(items)}",
                "domain": obj.get("domain") or "-",
                "kind": obj.get("kind") or "-",
                "good": good,
                "bad": bad,
            }
        )
    if not items:
        raise SuiteError(f"{path}: no pairs")
    return items


# ----------------------------------------------------------------------------- scoring


def generation_unavailable(scorer: Any) -> str | None:
    """Why `scorer` cannot continue text greedily, or None when it can."""
    if not callable(getattr(scorer, "greedy", None)):
        return f"{getattr(scorer, 'kind', 'this')} models have no greedy decoding here"
    if getattr(scorer, "decoder", None) is None:
        return "the scorer has no decoder (ids to text) to read its continuations"
    return None


def many_nll_bits(scorer: Any, sequences: list[list[int]]) -> list[float]:
    """`scorer.nll_bits` of each sequence, in batches where the scorer can (`nll_bits_many`)."""
    if callable(getattr(scorer, "nll_bits_many", None)):
        return scorer.nll_bits_many(sequences)
    return [scorer.nll_bits(ids) for ids in sequences]


def continuations(scorer: Any, texts: list[str], n_tokens: int) -> list[str]:
    """The text `scorer` appends to each of `texts` by greedy decoding (up to `n_tokens` tokens,
    cut where it starts a new document), in batches where the scorer can (`greedy_many`). The
    whole is decoded and the prompt's text taken off, so that a tokenizer whose pieces decode
    differently alone (SentencePiece's leading spaces) reads right."""
    prompts = [scorer.document_ids(text) for text in texts]
    if callable(getattr(scorer, "greedy_many", None)):
        news = scorer.greedy_many(prompts, n_tokens)
    else:
        news = [scorer.greedy(ids, n_tokens) for ids in prompts]
    start_id = getattr(scorer, "start_id", None)
    out = []
    for ids, new in zip(prompts, news):
        if start_id is not None and start_id in new:
            new = new[: new.index(start_id)]
        prompt, full = scorer.decoder(ids), scorer.decoder(ids + new)
        out.append(full[len(prompt) :] if full.startswith(prompt) else scorer.decoder(new))
    return out


def first_word(text: str) -> str:
    """The first word of `text` (split at whitespace and dashes), punctuation stripped from both ends."""
    m = _FIRST_WORD.search(text)
    word = m.group(0) if m else ""
    is_punct = lambda c: unicodedata.category(c).startswith("P")  # noqa: E731
    start, end = 0, len(word)
    while start < end and is_punct(word[start]):
        start += 1
    while end > start and is_punct(word[end - 1]):
        end -= 1
    return word[start:end]


def generation_health(texts: list[str]) -> dict:
    """distinct-2 and repeated 4-gram share over the words (lowercased) of `texts`, each pooled
    over continuations: distinct bigrams of a continuation summed over all, over all bigrams;
    4-grams that repeat an earlier 4-gram of the same continuation, over all 4-grams."""
    distinct = bigrams = repeated = fourgrams = words = 0
    for text in texts:
        w = [x.lower() for x in _WORDS.findall(text)]
        words += len(w)
        pairs = list(pairwise(w))
        distinct += len(set(pairs))
        bigrams += len(pairs)
        seen: set[tuple[str, ...]] = set()
        for i in range(len(w) - 3):
            gram = tuple(w[i : i + 4])
            repeated += gram in seen
            seen.add(gram)
            fourgrams += 1
    return {
        "distinct_2": _figure(distinct / bigrams if bigrams else None, len(texts)),
        "repeated_4gram_share": _figure(repeated / fourgrams if fourgrams else None, len(texts)),
        "words": words,
    }


def _figure(value: float | None, items: int, **extra: Any) -> dict:
    return {"value": value, "items": items, **extra}


def _accuracy(scores: list[float]) -> dict:
    return _figure(sum(scores) / len(scores) if scores else None, len(scores))


def _wins(good: float, bad: float) -> float:
    """1 when the original costs less than its twin (bits, or tokens), 0.5 on a tie, else 0."""
    return 1.0 if good < bad else 0.5 if good == bad else 0.0


def _pair_figures(results: list[tuple[dict, float]]) -> dict:
    """Accuracy overall, per kind and per domain, each with its item count, and the ties."""
    per_kind: dict[str, list[float]] = defaultdict(list)
    per_domain: dict[str, list[float]] = defaultdict(list)
    for item, score in results:
        per_kind[item.get("kind") or "-"].append(score)
        per_domain[item.get("domain") or "-"].append(score)
    return {
        **_accuracy([s for _, s in results]),
        "ties": sum(s == 0.5 for _, s in results),
        "per_kind": {k: _accuracy(v) for k, v in sorted(per_kind.items())},
        "per_domain": {d: _accuracy(v) for d, v in sorted(per_domain.items())},
    }


def score_suite(scorer: Any, items: list[dict], say: Callable[[str], None] | None = None) -> dict:
    """Every figure of the suite for one model, each with its item count:
    {model, kind, bpb: {value, items, bytes, per_domain}, pairs: {value, items, ties, per_kind,
    per_domain}, user_pairs (with user pairs), cloze: {value, items, per_domain}, generation:
    {distinct_2, repeated_4gram_share, words, items}}; a task the scorer cannot do is
    {not_scored: reason, items}. `say` hears one line per task."""
    say = say or (lambda _msg: None)
    by_task: dict[str, list[dict]] = defaultdict(list)
    for item in items:
        by_task["user_pair" if item.get("source") == "user" else item["task"]].append(item)
    out: dict[str, Any] = {"model": scorer.label, "kind": scorer.kind}

    bits: dict[str, float] = defaultdict(float)
    n_bytes: dict[str, int] = defaultdict(int)
    n_items: Counter[str] = Counter()
    for item in by_task["bpb"]:
        bits[item["domain"]] += scorer.nll_bits(scorer.document_ids(item["text"]))
        n_bytes[item["domain"]] += len(item["text"].encode("utf-8"))
        n_items[item["domain"]] += 1
    total_bytes = sum(n_bytes.values())
    out["bpb"] = _figure(
        sum(bits.values()) / total_bytes if total_bytes else None,
        sum(n_items.values()),
        bytes=total_bytes,
        per_domain={
            d: _figure(bits[d] / n_bytes[d] if n_bytes[d] else None, n_items[d], bytes=n_bytes[d])
            for d in sorted(n_items)
        },
    )
    say(f"{scorer.label}: bpb on {total_bytes:,} held-out bytes")

    for task, key in (("pair", "pairs"), ("user_pair", "user_pairs")):
        if task == "user_pair" and not by_task[task]:
            continue
        ids = [scorer.document_ids(t) for item in by_task[task] for t in (item["good"], item["bad"])]
        pair_bits = many_nll_bits(scorer, ids)
        results = [(item, _wins(g, b)) for item, g, b in zip(by_task[task], pair_bits[0::2], pair_bits[1::2])]
        # what a model that knew only length would score here: the fewer tokens, the likelier
        by_length = [(item, _wins(len(good), len(bad))) for item, good, bad in zip(by_task[task], ids[0::2], ids[1::2])]
        out[key] = {**_pair_figures(results), "length_only": _pair_figures(by_length)}
        say(f"{scorer.label}: {len(results)} {key.replace('_', ' ')}")

    reason = generation_unavailable(scorer)
    if reason is not None:
        out["cloze"] = {"not_scored": reason, "items": len(by_task["cloze"])}
        out["generation"] = {"not_scored": reason, "items": len(by_task["gen"])}
        say(f"{scorer.label}: cloze and generation not scored: {reason}")
        return out
    per_domain: dict[str, list[float]] = defaultdict(list)
    answers = continuations(scorer, [item["context"] for item in by_task["cloze"]], CLOZE_TOKENS)
    for item, answer in zip(by_task["cloze"], answers):
        per_domain[item["domain"]].append(float(first_word(answer) == item["target"]))
    out["cloze"] = {
        **_accuracy([s for v in per_domain.values() for s in v]),
        "per_domain": {d: _accuracy(v) for d, v in sorted(per_domain.items())},
    }
    gen = by_task["gen"]
    texts = [""] * len(gen)
    for n_tokens in sorted({int(item["max_tokens"]) for item in gen}):  # one batch per length asked
        same = [k for k, item in enumerate(gen) if int(item["max_tokens"]) == n_tokens]
        for k, text in zip(same, continuations(scorer, [gen[k]["prompt"] for k in same], n_tokens)):
            texts[k] = text
    out["generation"] = {
        **generation_health(texts),
        "items": len(texts),
        "samples": [{"prompt": i["prompt"], "continuation": t} for i, t in zip(by_task["gen"][:3], texts)],
    }
    say(f"{scorer.label}: {len(by_task['cloze'])} cloze passages, {len(texts)} continuations")
    return out


def suite_counts(items: list[dict]) -> dict:
    """Items per task, and per task and domain (and kind, for pairs)."""
    counts: dict[str, Any] = {}
    for item in items:
        task = "user_pair" if item.get("source") == "user" else item["task"]
        c = counts.setdefault(task, {"items": 0, "per_domain": Counter()})
        c["items"] += 1
        c["per_domain"][item["domain"]] += 1
        if task == "pair":
            c.setdefault("per_kind", Counter())[item["kind"]] += 1
    return json.loads(json.dumps(counts))


def evaluate_suite(
    model_specs: list[str],
    items: list[dict],
    device: str = "auto",
    load: Callable[[str, str], Any] | None = None,
    say: Callable[[str], None] | None = None,
) -> dict:
    """Score each model on the suite's `items`: {schema, counts, models: [score_suite's dict, or
    {model, error} for a model that cannot be loaded or scored: one line, never a traceback]}.
    Every model is loaded before any is scored, so a bad path shows at once."""
    load = load or load_scorer
    scorers: list[tuple[str, Any]] = []
    for spec in model_specs:
        try:
            scorers.append((spec, load(spec, device)))
        except SimoneError as e:
            scorers.append((spec, e))
    models = []
    for spec, scorer in scorers:
        if isinstance(scorer, SimoneError):
            models.append({"model": spec, "error": str(scorer)})
            continue
        try:
            models.append(score_suite(scorer, items, say))
        except SimoneError as e:
            models.append({"model": spec, "error": str(e)})
    return {"schema": SUITE_SCHEMA, "counts": suite_counts(items), "models": models}


def suite_items(
    suite: Path | None, source: Path | None = None, pairs: Path | None = None, settings: SuiteSettings | None = None
) -> tuple[list[dict], str]:
    """The items `simone eval --suite/--pairs` scores, and a line saying where they came from:
    the suite file `suite` (built first from `source`'s held-out documents when it does not
    exist yet), plus the user's `pairs`. SuiteError (one line) when there is nothing to score."""
    items: list[dict] = []
    said = []
    if suite is not None:
        suite = Path(suite)
        if suite.exists():
            items = read_suite(suite)
            said.append(f"suite {suite} ({len(items)} items)")
        elif source is None:
            raise SuiteError(
                f"{suite}: no such suite file; give --data RUN_DIR|documents.jsonl|DIR to build it "
                f"from held-out documents"
            )
        else:
            items = load_or_build_suite(suite, lambda: heldout_documents(source), settings)
            said.append(f"suite {suite} built from the held-out documents of {source} ({len(items)} items)")
    if pairs is not None:
        user = read_user_pairs(Path(pairs))
        items += user
        said.append(f"{len(user)} pairs from {pairs}")
    if not items:
        raise SuiteError("nothing to score: give --suite FILE and/or --pairs FILE")
    return items, "; ".join(said)


# ----------------------------------------------------------------------------- report


def _cell(fig: dict | None, percent: bool) -> str:
    if not fig or "not_scored" in fig:
        return "not scored"
    if fig.get("value") is None:
        return f"– ({fig.get('items', 0)})"
    return (f"{fig['value']:.1%}" if percent else f"{fig['value']:.4f}") + f" ({fig['items']})"


def suite_rows(model: dict) -> list[tuple[str, dict | None, bool]]:
    """(label, figure, shown as a percentage) for each line of the table, in order; a task with
    no items (a suite of user pairs alone) has no lines."""
    rows: list[tuple[str, dict | None, bool]] = []
    bpb = model.get("bpb") or {}
    if bpb.get("items"):
        rows.append(("bpb, all domains (lower is better)", bpb, False))
        rows += [(f"bpb, {d}", f, False) for d, f in bpb.get("per_domain", {}).items()]
    for key, label in (("pairs", "minimal pairs"), ("user_pairs", "user pairs")):
        if not (model.get(key) or {}).get("items"):
            continue
        rows.append((f"{label}, all", model[key], True))
        if model[key].get("length_only"):  # the bar to clear: the share a length-only model wins
            rows.append((f"{label}, a model knowing only length", model[key]["length_only"], True))
        rows += [(f"{label}, kind {k}", f, True) for k, f in model[key]["per_kind"].items()]
        rows += [(f"{label}, domain {d}", f, True) for d, f in model[key]["per_domain"].items()]
    cloze = model.get("cloze") or {}
    if cloze.get("items"):
        rows.append(("cloze, all", cloze, True))
        rows += [(f"cloze, {d}", f, True) for d, f in cloze.get("per_domain", {}).items()]
    gen = model.get("generation") or {}
    if gen.get("items"):
        rows.append(("generation distinct-2 (higher: less repetitive)", gen.get("distinct_2", gen), False))
        rows.append(("generation repeated 4-grams (lower is better)", gen.get("repeated_4gram_share", gen), False))
    return rows


def format_suite_markdown(result: dict) -> str:
    """One markdown table, a row per figure and a column per model, each cell `value (items)`;
    then one line per model or task that was not scored."""
    scored = [m for m in result["models"] if "error" not in m]
    lines = [
        "# Consistency suite",
        "",
        "Each cell: value (items). Minimal pairs: share where the original sentence is more "
        "likely than its contradicted twin (ties count one half; chance 50%). Cloze: greedy "
        "first word equals the passage's last word.",
        "",
    ]
    if scored:
        labels: list[str] = []
        cells: dict[str, dict[str, str]] = defaultdict(dict)
        for m in scored:
            for label, fig, percent in suite_rows(m):
                if label not in labels:
                    labels.append(label)
                cells[label][m["model"]] = _cell(fig, percent)
        lines += ["| figure | " + " | ".join(f"`{m['model']}`" for m in scored) + " |", "|---|" + "---|" * len(scored)]
        lines += [
            f"| {label} | " + " | ".join(cells[label].get(m["model"], "–") for m in scored) + " |" for label in labels
        ]
    notes = [f"- `{m['model']}`: not scored: {m['error']}" for m in result["models"] if "error" in m]
    for m in scored:
        for task in ("cloze", "generation"):
            if "not_scored" in (m.get(task) or {}) and m[task]["items"]:
                notes.append(f"- `{m['model']}`: {task} not scored: {m[task]['not_scored']}")
    return "\n".join(lines + (["", *notes] if notes else [])) + "\n"


# ----------------------------------------------------------------------------- lm-evaluation-harness


def _task_yaml(name: str, data_file: Path, fields: dict[str, Any], metrics: list[str]) -> str:
    lines = [
        f"task: {name}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(str(data_file))}",  # JSON's quoted strings and numbers are YAML scalars too
        "test_split: test",
    ]
    lines += [f"{k}: {json.dumps(v)}" for k, v in {**fields, "num_fewshot": 0}.items()]
    lines += ["metric_list:"]
    for metric in metrics:  # acc is averaged over items; bits_per_byte keeps the harness's own (bits over bytes)
        lines += [f"  - metric: {metric}"] + (["    aggregation: mean"] if metric == "acc" else [])
        lines += [f"    higher_is_better: {'true' if metric == 'acc' else 'false'}"]
    lines += ["metadata:", "  version: 1.0"]
    return "\n".join(lines) + "\n"


def write_lm_eval_tasks(items: list[dict], folder: Path, prefix: str = "simone") -> list[str]:
    """The suite as an lm-evaluation-harness task folder over local files, so that

        lm_eval --model hf --model_args pretrained=EXPORTED --include_path FOLDER --tasks PREFIX_suite

    scores an exported model offline. Written: one JSONL data file and one YAML config per task,
    and a group `PREFIX_suite` over them. Returns the task names (the group last).

      PREFIX_pairs, PREFIX_pairs_KIND, PREFIX_user_pairs: multiple_choice, as BLiMP is set up in
          the harness: an empty context and the two sentences as choices, the good one the
          answer; `target_delimiter: ""`, so each sentence is scored exactly as written after
          the document-start token (as `score_suite` reads it). acc is the share right; the
          harness breaks a tie for the first choice, the suite counts it one half.
      PREFIX_cloze: loglikelihood of " TARGET" after the context; acc is whether the target's
          tokens are each the greedy choice (the suite also asks that the word ends there).
          The harness gives the context no document-start token; the suite does.
      PREFIX_bpb: loglikelihood_rolling of each held-out text, bits_per_byte (its windows
          differ from `simone eval`'s, so long texts score a little differently).
    Generation health has no harness task (it needs the suite's own measures).
    The data files are named by absolute path (the harness resolves them from the working
    directory, not from the YAML), so write the folder where it will be used.
    """
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    tasks: list[tuple[str, str, list[dict], dict[str, Any], list[str]]] = []
    pair_fields = {
        "output_type": "multiple_choice",
        "doc_to_text": "",
        "doc_to_target": 0,
        "doc_to_choice": "{{[good, bad]}}",
        "target_delimiter": "",
    }
    corpus_pairs = [i for i in items if i["task"] == "pair" and i.get("source") != "user"]
    user_pairs = [i for i in items if i["task"] == "pair" and i.get("source") == "user"]

    def pair_rows(rows: list[dict]) -> list[dict]:
        return [{"good": i["good"], "bad": i["bad"], "domain": i["domain"], "kind": i["kind"]} for i in rows]

    if corpus_pairs:
        tasks.append((f"{prefix}_pairs", "pairs", pair_rows(corpus_pairs), pair_fields, ["acc"]))
        for kind in sorted({i["kind"] for i in corpus_pairs}):
            rows = [i for i in corpus_pairs if i["kind"] == kind]
            tasks.append((f"{prefix}_pairs_{kind}", f"pairs_{kind}", pair_rows(rows), pair_fields, ["acc"]))
    if user_pairs:
        tasks.append((f"{prefix}_user_pairs", "user_pairs", pair_rows(user_pairs), pair_fields, ["acc"]))
    cloze = [
        {"context": i["context"], "target": i["target"], "domain": i["domain"]} for i in items if i["task"] == "cloze"
    ]
    if cloze:
        fields = {"output_type": "loglikelihood", "doc_to_text": "{{context}}", "doc_to_target": "{{target}}"}
        tasks.append((f"{prefix}_cloze", "cloze", cloze, {**fields, "target_delimiter": " "}, ["acc"]))
    bpb = [{"text": i["text"], "domain": i["domain"]} for i in items if i["task"] == "bpb"]
    if bpb:
        fields = {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}"}
        tasks.append((f"{prefix}_bpb", "bpb", bpb, fields, ["bits_per_byte"]))
    names = []
    for name, stem, rows, fields, metrics in tasks:
        data = folder / f"{stem}.jsonl"
        atomic_write_text(data, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        atomic_write_text(folder / f"{name}.yaml", _task_yaml(name, data, fields, metrics))
        names.append(name)
    group = f"{prefix}_suite"
    atomic_write_text(
        folder / f"{group}.yaml",
        f"group: {group}\ntask:\n" + "".join(f"  - {n}\n" for n in names) + "metadata:\n  version: 1.0\n",
    )
    return [*names, group]
