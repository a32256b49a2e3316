"""Write a large JSON Lines corpus from a folder of `.txt` books, for benchmarking `simone prepare`.

    python bench/make_jsonl_corpus.py                          # >= 1 GB into /tmp/simone-jsonl-corpus
    python bench/make_jsonl_corpus.py --gb 0.25 --out /tmp/c250

Copy k of every book becomes one record, its body lightly perturbed with a seed of its own:
one word in ten (`--substitute`) is replaced by another word of the same book. Two copies then
share about 0.81^5 = 35% of their word 5-grams and 0.81^13 = 6% of their 13-grams, under the
near-duplicate (80%), containment (80%) and contamination (10%) thresholds, so curation keeps
them as distinct documents while the words, their frequencies and the tokenizer's work stay
those of the real text. The header block (title, author, ...) stays as it is. Records go to
`OUT/DOMAIN/part-NNNN.jsonl` files of at most `--file-mb` MB (the domain from the book's
folder), so curation has many files to share among its workers. Never write into the repo.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
from collections import Counter, defaultdict
from pathlib import Path

_HEADER_END = re.compile(r"\n={20,}\n")
_WORD_OR_SPACE = re.compile(r"(\s+)")


def perturb(body: str, rng: random.Random, share: float) -> str:
    """`body` with `share` of its words replaced by words drawn from `body` itself (spacing kept)."""
    parts = _WORD_OR_SPACE.split(body)
    # the words are the even parts (an empty first or last one is none)
    words = range(2 if parts[0] == "" else 0, len(parts) - (parts[-1] == ""), 2)
    if len(words) < 2:
        return body
    for i in rng.sample(words, int(len(words) * share)):
        parts[i] = parts[rng.choice(words)]
    return "".join(parts)


def books(corpus: Path) -> list[tuple[str, str, str, str]]:
    """(id, domain, header, body) of every `.txt` under `corpus`, in path order."""
    out = []
    for path in sorted(corpus.rglob("*.txt")):
        text = path.read_text(encoding="utf-8", errors="replace")
        m = _HEADER_END.search(text[:10_000])
        header, body = (text[: m.end()], text[m.end() :]) if m else ("", text)
        rel = path.relative_to(corpus)
        out.append((rel.as_posix(), rel.parts[0] if len(rel.parts) > 1 else "default", header, body))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=Path("../shared/corpus"), help="a folder of .txt books")
    ap.add_argument("--out", type=Path, default=Path("/tmp/simone-jsonl-corpus"), help="replaced if it exists")
    ap.add_argument("--gb", type=float, default=1.05, help="stop once this many GB (1e9 bytes) are written")
    ap.add_argument("--substitute", type=float, default=0.1, help="share of each copy's words replaced")
    ap.add_argument("--file-mb", type=float, default=32, help="largest record file")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.out.resolve().is_relative_to(Path(__file__).resolve().parents[1]):
        ap.error(f"{args.out}: inside the repository; write the corpus elsewhere (default /tmp)")
    sources = books(args.corpus)
    if not sources:
        ap.error(f"{args.corpus}: no .txt files")
    shutil.rmtree(args.out, ignore_errors=True)
    target, limit = int(args.gb * 1e9), int(args.file_mb * 1e6)
    pending: dict[str, list[str]] = defaultdict(list)  # domain -> lines of its next file
    files = Counter()  # domain -> files written

    def write(domain: str) -> None:
        (args.out / domain).mkdir(parents=True, exist_ok=True)
        (args.out / domain / f"part-{files[domain]:04d}.jsonl").write_text("".join(pending.pop(domain)))
        files[domain] += 1

    written = copy = 0
    while written < target:
        copy += 1
        for rel, domain, header, body in sources:
            rng = random.Random(f"{args.seed}:{copy}:{rel}")
            line = json.dumps({"id": f"{rel}~{copy}", "text": header + perturb(body, rng, args.substitute)}) + "\n"
            if pending[domain] and sum(map(len, pending[domain])) + len(line) > limit:
                write(domain)
            pending[domain].append(line)  # ASCII (json.dumps escapes the rest): characters are bytes
            written += len(line)
            if written >= target:
                break
        print(f"copy {copy}: {written / 1e9:.2f} GB", flush=True)
    for domain in list(pending):
        write(domain)
    print(f"{args.out}: {written / 1e9:.2f} GB in {sum(files.values())} files, {copy} copies")


if __name__ == "__main__":
    main()
