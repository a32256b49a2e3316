"""Reading and writing `documents.jsonl`, the cleaned corpus curation hands to the tokenizer,
the shards and the steering judge: one JSON object a line with `text`, `split` ("train" or
"val"), `domain`, `id`, `path` and, for a held-out tail, `slice`."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from simone.rundir import atomic_write_text


def numbered_documents(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, document) for each non-blank line, read one at a time (the corpus is
    never held in memory as a whole). A line that is not JSON raises ValueError naming the
    file and the line."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from e


def read_documents(path: Path, split: str | None = None) -> Iterator[dict]:
    """The documents of `path` in file order; only those of `split` when given."""
    for _, doc in numbered_documents(path):
        if split is None or doc.get("split") == split:
            yield doc


def write_documents(path: Path, documents: Iterable[dict]) -> None:
    """Write `documents` to `path` atomically, one JSON object a line (UTF-8 kept as is)."""
    atomic_write_text(path, "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in documents))
