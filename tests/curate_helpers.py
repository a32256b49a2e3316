"""Tiny synthetic books for the curation tests (never text from ../shared/corpus); no tests here."""

from __future__ import annotations

import json
import random
from pathlib import Path

_VOCAB = (
    "river mountain garden window letter morning evening winter summer harvest village city "
    "road bridge tower castle forest meadow candle lantern silver golden quiet gentle bright "
    "ancient young old brave weary hungry honest clever patient stranger merchant sailor "
    "farmer teacher soldier painter doctor widow child brother sister mother father friend "
    "walked spoke looked carried opened closed waited listened remembered answered wrote "
    "found lost built crossed followed watched believed wondered promised returned left "
    "house door table chair book paper bread water fire stone wind rain snow sun moon star "
    "ship horse dog bird tree flower field hill valley shore harbor market street church "
    "school kitchen garden story song voice face hand heart mind truth reason hope fear joy "
    "sorrow silence music picture question answer journey promise secret memory dream"
).split()
_GLUE = "the the the a of of and and to in with that was had his her their it as at on for by from".split()


def prose(seed: int, n_words: int) -> str:
    """Readable-looking English-like prose: sentences with punctuation, paragraphs, stop words."""
    rng = random.Random(seed)
    paras, words_done = [], 0
    while words_done < n_words:
        sentences = []
        for _ in range(rng.randint(3, 6)):
            k = rng.randint(8, 16)
            ws = [rng.choice(_GLUE) if rng.random() < 0.35 else rng.choice(_VOCAB) for _ in range(k)]
            sentences.append(" ".join(ws).capitalize() + rng.choice([".", ".", ".", "!", "?", ";"]))
            words_done += k
        text = " ".join(sentences)
        # hard-wrap at ~70 characters like a Gutenberg text
        lines, line = [], ""
        for w in text.split():
            if len(line) + len(w) + 1 > 70:
                lines.append(line)
                line = w
            else:
                line = f"{line} {w}".strip()
        lines.append(line)
        paras.append("\n".join(lines))
    return "\n\n".join(paras)


def book(title: str, author: str, seed: int, n_words: int = 1500) -> str:
    return f"{title.upper()}\n\nby {author}\n\n\n{prose(seed, n_words)}\n"


def write_doc(root: Path, rel: str, text: str | bytes, meta: dict | None = None, sidecar: str | None = None) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_bytes(text.encode("utf-8"))
    if meta is not None:
        path.with_suffix(".json").write_text(json.dumps(meta), encoding="utf-8")
    elif sidecar is not None:
        path.with_suffix(".json").write_text(sidecar, encoding="utf-8")
    return path


def meta(title: str, author: str, domain: str, sub: str, quality: float = 8.0) -> dict:
    return {"title": title, "author": author, "category": domain, "subcategory": sub, "quality_score": quality}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
