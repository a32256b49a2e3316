"""The default fine-tuning set: questions about the embedded corpus, built the same on every machine.

`simone finetune` without `--data` trains on this, so chat fine-tuning works offline on a fresh
machine with the package `make run` wrote. Four kinds of single-turn conversation, drawn with a
fixed seed from the default corpus (simone/data/default_corpus.py) a model pretrained on it has
read:

    quote     "Quote John 3:16."                                   → the verse
    book      'Which book of the Bible says: "Jesus wept."'        → "John"
    play      'Which play has the line "Get thee to a nunnery"?'   → "Hamlet"
    speaker   'Who says "..." in Hamlet?'                          → "Ophelia"

Each line of the output is `{"messages": [user, assistant], "task": KIND}`; no verse or line
is asked about twice. The held-out split is chat_data.py's (a hash of each conversation).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from simone.data.default_corpus import default_corpus_dir
from simone.rundir import atomic_write_text

DEMO_SEED = "simone-chat-demo-1"  # change it (and the counts) to change the set
DEMO_COUNTS = {"quote": 1000, "book": 700, "play": 800, "speaker": 500}
MAX_ANSWER_CHARS = 160  # verses and lines short enough for the cpu preset's 128-token context
_VERSE = re.compile(r"^(\d+) (.+)$")
_SMALL_WORDS = {"of", "the", "and"}


def book_name(stem: str) -> str:
    """A book's short name from its corpus file name: `1_john` → "1 John", `song_of_solomon` →
    "Song of Solomon"."""
    words = stem.split("_")
    return " ".join(w if i and w in _SMALL_WORDS else w.capitalize() for i, w in enumerate(words))


def scripture_verses(corpus: Path) -> list[tuple[str, str]]:
    """(reference, verse text) for every verse of the corpus's scripture, in file order."""
    verses = []
    for path in sorted((corpus / "scripture").glob("*/*.txt")):
        book = book_name(path.stem)
        chapter = ""
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.startswith(("Chapter ", "Psalm ")):
                chapter = line.split()[-1]
            elif chapter and (m := _VERSE.match(line)):
                verses.append((f"{book} {chapter}:{m.group(1)}", m.group(2)))
    return verses


def play_lines(corpus: Path) -> list[tuple[str, str, str]]:
    """(play title, speaker, line) for each line of verse or prose spoken in the corpus's plays."""
    lines = []
    for path in sorted((corpus / "shakespeare").glob("*/*.txt")):
        title = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))["title"]
        for block in path.read_text(encoding="utf-8").split("\n\n"):
            speaker, *speech = block.split("\n")
            if speech and speaker.endswith(".") and speaker.isupper():
                name = speaker[:-1].title()
                lines += [(title, name, text) for text in speech if not text.startswith("[")]
    return lines


def demo_conversations(corpus: Path | None = None) -> list[dict]:
    """The demo set's conversations (see the module docstring), in a fixed order."""
    corpus = corpus or default_corpus_dir()
    # bandit B311: a seeded generator makes the set the same everywhere; nothing here is secret
    rng = random.Random(DEMO_SEED)  # nosec B311
    verses = [v for v in scripture_verses(corpus) if len(v[1]) <= MAX_ANSWER_CHARS]
    lines = [x for x in play_lines(corpus) if 30 <= len(x[2]) <= MAX_ANSWER_CHARS]
    verse_picks = rng.sample(verses, DEMO_COUNTS["quote"] + DEMO_COUNTS["book"])
    line_picks = rng.sample(lines, DEMO_COUNTS["play"] + DEMO_COUNTS["speaker"])
    pairs = [("quote", f"Quote {ref}.", text) for ref, text in verse_picks[: DEMO_COUNTS["quote"]]]
    pairs += [
        ("book", f'Which book of the Bible says: "{text}"', ref.rsplit(" ", 1)[0])
        for ref, text in verse_picks[DEMO_COUNTS["quote"] :]
    ]
    pairs += [
        ("play", f'Which play has the line "{text}"?', title) for title, _, text in line_picks[: DEMO_COUNTS["play"]]
    ]
    pairs += [
        ("speaker", f'Who says "{text}" in {title}?', name) for title, name, text in line_picks[DEMO_COUNTS["play"] :]
    ]
    rng.shuffle(pairs)
    return [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], "task": task}
        for task, q, a in pairs
    ]


def write_demo_chats(path: Path, corpus: Path | None = None) -> Path:
    """Write the demo set to `path` (JSONL) and return it."""
    conversations = demo_conversations(corpus)
    atomic_write_text(Path(path), "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in conversations))
    return Path(path)
