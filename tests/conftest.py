"""Shared fixtures: tiny corpora built inside the tests (never copied from ../shared/corpus)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

# One thread: on 2 shared cores, tiny models run faster single-threaded and tests stay stable.
torch.set_num_threads(1)

_WORDS = {
    "scripture": "lord god heaven earth light darkness waters spirit day night land seed fruit tree".split(),
    "poetry": "love heart rose summer winter moon star sweet fair sorrow dream night song bird".split(),
    "history": "congress people state law liberty union war treaty nation president rights army".split(),
}


def make_corpus(root: Path, docs_per_subdomain: int = 3, words_per_doc: int = 400, seed: int = 0) -> Path:
    """A small DOMAIN/SUBDOMAIN/*.txt tree with sidecars; each domain has its own vocabulary."""
    rng = random.Random(seed)
    for domain, words in _WORDS.items():
        for sub in ("a", "b"):
            d = root / domain / f"{domain}_{sub}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(docs_per_subdomain):
                title = f"The Book of {domain.title()} {sub.upper()}{i}"
                sentences = []
                for _ in range(words_per_doc // 8):
                    s = " ".join(rng.choice(words) for _ in range(8))
                    sentences.append(s.capitalize() + ".")
                body = f"{title}\n\nby Author {i}\n\n" + "\n".join(
                    " ".join(sentences[j:j + 5]) for j in range(0, len(sentences), 5))
                stem = f"{domain}-{sub}-{i}"
                (d / f"{stem}.txt").write_text(body + "\n", encoding="utf-8")
                (d / f"{stem}.json").write_text(json.dumps({
                    "title": title, "author": f"Author {i}", "source": "test",
                    "category": domain, "subcategory": f"{domain}_{sub}", "quality_score": 8.0}))
    return root


@pytest.fixture(autouse=True)
def one_thread():
    """Pin each test to one thread again (a test may change it) and restore afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def template(tmp_path_factory) -> Path:
    """A prepared tiny run directory (tokenizer + shards); tests copy it with `new_run`."""
    from train_support import prepared_template

    return prepared_template(tmp_path_factory.mktemp("train_template"))


@pytest.fixture
def tiny_corpus(tmp_path) -> Path:
    return make_corpus(tmp_path / "corpus")
