"""Steering accuracy: does `generate --domain X` write text that reads like domain X?

The judge is independent of the model: a scikit-learn logistic regression (fitted by SGD) over TF-IDF word
(1-2 grams) and character (2-5 grams, inside word boundaries) features, fitted on the training
split's documents cut into snippets of sample length, so it learns to judge text as short as
the samples it will read (classes balanced: every domain contributes as many snippets as it
can, up to a cap, and the loss weights the classes equally). A sample generated with
`--domain X` counts as steered when the judge assigns it to X. `snippet_accuracy` measures the
judge itself on validation snippets of the same length: the ceiling the model's steering
accuracy should be read against.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from simone.data.documents import read_documents
from simone.inference.generate import prompt_ids
from simone.inference.streaming import guided_sample_batch

WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?")
# A sample of N tokens holds about 3/4 N words with our BPE tokenizers on English prose.
WORDS_PER_TOKEN = 0.75


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def snippet_words_for(sample_tokens: int) -> int:
    """How many words a snippet has to match a generated sample of `sample_tokens` tokens."""
    return max(8, round(sample_tokens * WORDS_PER_TOKEN))


def snippets(text: str, n_words: int, n: int | None = None) -> list[str]:
    """Windows of `n_words` whitespace-separated words of `text`: every consecutive one
    (n=None), or `n` spread evenly over the text (fewer when it is short). A text shorter
    than one window is one snippet."""
    ws = text.split()
    if not ws:
        return []
    available = max(1, len(ws) // n_words)
    starts = range(available) if n is None else sorted({(k * available) // n for k in range(min(n, available))})
    return [" ".join(ws[s * n_words : (s + 1) * n_words]) for s in starts]


class SteeringJudge:
    """Which domain does a piece of text read like? TF-IDF words + characters, logistic regression."""

    def __init__(self, alpha: float = 1e-5, epochs: int = 30, max_features: int = 200_000):
        self.alpha = alpha  # L2 penalty
        self.epochs = epochs
        self.max_features = max_features
        self.classes: list[str] = []
        self.pipeline: Any = None  # set by fit: an sklearn Pipeline (sklearn has no type information)
        self.training_books_accuracy = float("nan")  # set by fit_on_documents

    def fit(self, texts: list[str], labels: list[str]) -> SteeringJudge:
        # deferred: scikit-learn is slow to import and only the ablation's judge needs it
        from sklearn.feature_extraction.text import TfidfVectorizer  # noqa: PLC0415
        from sklearn.linear_model import SGDClassifier  # noqa: PLC0415
        from sklearn.pipeline import FeatureUnion, make_pipeline  # noqa: PLC0415

        classes = sorted(set(labels))
        if len(classes) < 2:
            raise ValueError(f"the steering judge needs at least two domains, got {classes}")
        tfidf = {"sublinear_tf": True, "max_features": self.max_features}
        features = FeatureUnion(
            [
                ("words", TfidfVectorizer(token_pattern=WORD.pattern, ngram_range=(1, 2), **tfidf)),
                ("chars", TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), **tfidf)),
            ]
        )
        # logistic regression fitted by SGD: a fixed number of seeded epochs, seconds where
        # lbfgs took minutes on 15k snippets x 400k features (same accuracy)
        classifier = SGDClassifier(
            loss="log_loss", alpha=self.alpha, max_iter=self.epochs, tol=None, class_weight="balanced", random_state=0
        )
        self.pipeline = make_pipeline(features, classifier).fit(texts, labels)
        self.classes = [str(c) for c in self.pipeline.classes_]
        return self

    def predict_many(self, texts: list[str]) -> list[str]:
        if not texts:
            return []
        return [str(c) for c in self.pipeline.predict(texts)]

    def predict(self, text: str) -> str:
        return self.predict_many([text])[0]

    def accuracy(self, texts: list[str], labels: list[str]) -> float:
        if not texts:
            return float("nan")
        return sum(p == y for p, y in zip(self.predict_many(texts), labels)) / len(texts)


def _documents(documents_jsonl: Path, split: str) -> Iterable[dict]:
    return (doc for doc in read_documents(documents_jsonl, split) if doc.get("text"))


def _domain(doc: dict) -> str:
    return str(doc.get("domain") or "unknown")


def fit_on_documents(
    documents_jsonl: Path,
    split: str = "train",
    snippet_words: int = 96,
    max_snippets_per_domain: int = 3000,
    seed: int = 0,
    check_share: float = 0.1,
) -> SteeringJudge:
    """Fit a judge on the `split` documents of a documents.jsonl, cut into snippets of
    `snippet_words` words; a domain with more snippets than `max_snippets_per_domain` gives a
    seeded random choice of them (so one big domain does not drown the others, and fitting on
    a large corpus takes seconds, not hours).

    `check_share` of each domain's chosen snippets is kept back: `judge.training_books_accuracy`
    is the judge's accuracy on them, other passages of the books it learned from (what a model
    imitating its training data writes), beside `snippet_accuracy` on books it never saw."""
    per_domain: dict[str, list[str]] = {}
    for doc in _documents(Path(documents_jsonl), split):
        per_domain.setdefault(_domain(doc), []).extend(snippets(doc["text"], snippet_words))
    # bandit B311: a seeded generator makes the judge reproducible; nothing here is secret
    rng = random.Random(seed)  # nosec B311
    texts, labels, check_texts, check_labels = [], [], [], []
    for domain in sorted(per_domain):
        chosen = per_domain[domain]
        chosen = rng.sample(chosen, min(len(chosen), max_snippets_per_domain))
        n_check = int(len(chosen) * check_share) if len(chosen) >= 10 else 0
        check_texts += chosen[:n_check]
        check_labels += [domain] * n_check
        texts += chosen[n_check:]
        labels += [domain] * (len(chosen) - n_check)
    judge = SteeringJudge().fit(texts, labels)
    judge.training_books_accuracy = judge.accuracy(check_texts, check_labels)
    return judge


def snippet_confusion(
    judge: SteeringJudge, documents_jsonl: Path, split: str = "val", snippet_words: int = 96, per_doc: int = 10
) -> dict[str, dict[str, int]]:
    """{true domain: {judged domain: snippets}} over up to `per_doc` snippets of `snippet_words`
    words per document of `split`, spread evenly over it: where the judge's errors go."""
    texts, labels = [], []
    for doc in _documents(Path(documents_jsonl), split):
        cut = snippets(doc["text"], snippet_words, n=per_doc)
        texts += cut
        labels += [_domain(doc)] * len(cut)
    confusion: dict[str, dict[str, int]] = {}
    for label, predicted in zip(labels, judge.predict_many(texts)):
        row = confusion.setdefault(label, {})
        row[predicted] = row.get(predicted, 0) + 1
    return confusion


def confusion_accuracy(confusion: dict[str, dict[str, int]]) -> float:
    """The share of snippets judged as their own domain (NaN without snippets)."""
    total = sum(sum(row.values()) for row in confusion.values())
    return sum(row.get(d, 0) for d, row in confusion.items()) / total if total else float("nan")


def snippet_accuracy(
    judge: SteeringJudge, documents_jsonl: Path, split: str = "val", snippet_words: int = 96, per_doc: int = 10
) -> float:
    """The judge's accuracy on up to `per_doc` snippets of `snippet_words` words per document,
    spread evenly over it."""
    return confusion_accuracy(snippet_confusion(judge, documents_jsonl, split, snippet_words, per_doc))


def sample_batch(
    loaded,
    domain: str,
    n: int,
    max_tokens: int,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float | None = 0.95,
    seed: int = 0,
) -> list[str]:
    """`n` continuations of `<|domain:NAME|>` at once: one batch through the model's cached
    `generate` (each row cut at its first end-of-document token)."""
    tok = loaded.tokenizer
    ids = prompt_ids(loaded, "", domain)
    idx = torch.tensor([ids] * n, dtype=torch.long, device=loaded.device)
    gen = torch.Generator(device=loaded.device).manual_seed(seed)
    max_new = min(max_tokens, loaded.config.model.max_seq_len - len(ids))
    steps = list(
        loaded.model.generate(
            idx, max_new, temperature=temperature, top_k=top_k, top_p=top_p, generator=gen, eos_id=tok.eod_id
        )
    )
    if not steps:
        return [""] * n
    return _texts_until_eod(tok, torch.cat(steps, dim=1).tolist())


def _texts_until_eod(tok, rows: list[list[int]]) -> list[str]:
    """Each row of generated ids decoded up to its first end-of-document token."""
    return [tok.decode(row[: row.index(tok.eod_id)] if tok.eod_id in row else row) for row in rows]


def guided_batch(
    loaded,
    domain: str,
    n: int,
    max_tokens: int,
    guidance_weight: float,
    guidance_top_k: int = 8,
    temperature: float = 0.8,
    seed: int = 0,
) -> list[str]:
    """`n` continuations of `<|domain:NAME|>` drawn at once by the policy-guided sampler
    (`streaming.guided_sample_batch`; weight 0: its top-K sampling without the policy), each
    cut at its first end-of-document token."""
    tok = loaded.tokenizer
    ids = prompt_ids(loaded, "", domain)
    gen = torch.Generator(device=loaded.device).manual_seed(seed)
    max_new = min(max_tokens, loaded.config.model.max_seq_len - len(ids))
    rows = guided_sample_batch(
        loaded.model,
        ids,
        n,
        max_new,
        guidance_domain=tok.domains.index(domain),
        guidance_weight=guidance_weight,
        guidance_top_k=guidance_top_k,
        temperature=temperature,
        generator=gen,
    )
    return _texts_until_eod(tok, rows.tolist())


def steering_accuracy(
    loaded,
    judge: SteeringJudge,
    domains: list[str] | None = None,
    samples_per_domain: int = 50,
    max_tokens: int = 128,
    temperature: float = 0.8,
    top_k: int | None = 50,
    seed: int = 0,
    policy_guidance: float | None = None,
    guidance_top_k: int = 8,
) -> dict:
    """Generate `samples_per_domain` samples with `--domain X` for each domain X and return
    {"accuracy", "per_domain": {X: share}, "n", "samples": [{domain, predicted, text}]}.

    Domains default to those both the tokenizer (control tokens) and the judge know. A domain's
    samples are drawn in one batch: without `policy_guidance` (None) by the model's sampler
    (`sample_batch`: temperature, top-k, top-p 0.95, the control token alone); with a weight
    W >= 0 by the policy-guided sampler over the `guidance_top_k` likeliest tokens
    (`guided_batch`; W = 0 is that sampler without the policy, which isolates the policy's part).
    """
    tok = loaded.tokenizer
    domains = domains or [d for d in tok.domains if d in judge.classes]
    samples = []
    for j, d in enumerate(domains):
        if policy_guidance is not None:
            texts = guided_batch(
                loaded, d, samples_per_domain, max_tokens, policy_guidance, guidance_top_k, temperature, seed=seed + j
            )
        else:
            texts = sample_batch(loaded, d, samples_per_domain, max_tokens, temperature, top_k, seed=seed + j)
        samples += [{"domain": d, "text": text} for text in texts]
    for s, predicted in zip(samples, judge.predict_many([s["text"] for s in samples])):
        s["predicted"] = predicted
    per_domain = {
        d: sum(s["predicted"] == d for s in samples if s["domain"] == d) / samples_per_domain for d in domains
    }
    n = len(samples)
    accuracy = sum(s["predicted"] == s["domain"] for s in samples) / n if n else float("nan")
    return {"accuracy": accuracy, "per_domain": per_domain, "n": n, "samples": samples}
