"""Steering accuracy: does `generate --domain X` write text that reads like domain X?

The judge is independent of the model: a multinomial naive Bayes classifier over lower-cased
words, fitted on the training split's documents (uniform class prior, Laplace smoothing). A
sample generated with `--domain X` counts as steered when the classifier assigns it to X.
`snippet_accuracy` measures the judge itself on validation text cut to sample length, the
ceiling the model's steering accuracy should be read against.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from simone.data.documents import read_documents

WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?")


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


class NaiveBayesClassifier:
    """Multinomial naive Bayes over word counts: argmax_c log P(c) + Σ_w n_w log P(w | c)."""

    def __init__(self, alpha: float = 1.0, uniform_prior: bool = True):
        self.alpha = alpha
        self.uniform_prior = uniform_prior
        self.classes: list[str] = []
        self.log_prior: dict[str, float] = {}
        self.log_prob: dict[str, dict[str, float]] = {}
        self.log_unseen: dict[str, float] = {}

    def fit(self, texts: Iterable[str], labels: Iterable[str]) -> NaiveBayesClassifier:
        counts: dict[str, Counter] = {}
        n_docs: Counter = Counter()
        for text, label in zip(texts, labels):
            counts.setdefault(label, Counter()).update(words(text))
            n_docs[label] += 1
        if len(counts) < 2:
            raise ValueError(f"naive Bayes needs at least two classes, got {sorted(counts)}")
        vocab = set().union(*counts.values())
        self.classes = sorted(counts)
        total_docs = sum(n_docs.values())
        for c in self.classes:
            total = sum(counts[c].values()) + self.alpha * (len(vocab) + 1)
            self.log_prob[c] = {w: math.log((n + self.alpha) / total) for w, n in counts[c].items()}
            self.log_unseen[c] = math.log(self.alpha / total)
            self.log_prior[c] = -math.log(len(self.classes)) if self.uniform_prior else math.log(n_docs[c] / total_docs)
        return self

    def log_posteriors(self, text: str) -> dict[str, float]:
        """Unnormalised log P(c | text) per class."""
        bag = Counter(words(text))
        return {c: self.log_prior[c] + sum(n * self.log_prob[c].get(w, self.log_unseen[c]) for w, n in bag.items())
                for c in self.classes}

    def predict(self, text: str) -> str:
        scores = self.log_posteriors(text)
        return max(self.classes, key=lambda c: scores[c])

    def accuracy(self, texts: list[str], labels: list[str]) -> float:
        if not texts:
            return float("nan")
        return sum(self.predict(t) == y for t, y in zip(texts, labels)) / len(texts)


def _documents(documents_jsonl: Path, split: str) -> Iterable[dict]:
    return (doc for doc in read_documents(documents_jsonl, split) if doc.get("text"))


def fit_on_documents(documents_jsonl: Path, split: str = "train", max_chars: int = 20_000,
                     alpha: float = 1.0) -> NaiveBayesClassifier:
    """Fit on the `split` documents of a documents.jsonl (each cut to `max_chars`, so one long
    book does not outweigh its domain)."""
    texts, labels = [], []
    for doc in _documents(Path(documents_jsonl), split):
        texts.append(doc["text"][:max_chars])
        labels.append(str(doc.get("domain") or "unknown"))
    return NaiveBayesClassifier(alpha=alpha).fit(texts, labels)


def snippet_accuracy(classifier: NaiveBayesClassifier, documents_jsonl: Path, split: str = "val",
                     snippet_words: int = 40, per_doc: int = 3) -> float:
    """The classifier's accuracy on `per_doc` snippets of `snippet_words` words per document."""
    texts, labels = [], []
    for doc in _documents(Path(documents_jsonl), split):
        ws = doc["text"].split()
        for k in range(per_doc):
            start = (len(ws) * k) // per_doc
            snippet = " ".join(ws[start : start + snippet_words])
            if snippet:
                texts.append(snippet)
                labels.append(str(doc.get("domain") or "unknown"))
    return classifier.accuracy(texts, labels)


def steering_accuracy(loaded, classifier: NaiveBayesClassifier, domains: list[str] | None = None,
                      samples_per_domain: int = 4, max_tokens: int = 48, temperature: float = 0.8,
                      top_k: int | None = 50, seed: int = 0, policy_guidance: float = 0.0) -> dict:
    """Generate `samples_per_domain` samples with `--domain X` for each domain X and return
    {"accuracy", "per_domain": {X: share}, "n", "samples": [{domain, predicted, text}]}.

    Domains default to those both the tokenizer (control tokens) and the classifier know.
    `policy_guidance` > 0 adds policy reranking (governance models with a policy head).
    """
    from simone.inference.generate import GovernanceOptions, sample_with_domain

    tok = loaded.tokenizer
    domains = domains or [d for d in tok.domains if d in classifier.classes]
    samples = []
    for d in domains:
        for i in range(samples_per_domain):
            options = GovernanceOptions(domain=d, policy_guidance=policy_guidance)
            text = sample_with_domain(loaded, options, max_tokens=max_tokens, temperature=temperature,
                                      top_k=top_k, seed=seed + i)
            samples.append({"domain": d, "predicted": classifier.predict(text), "text": text})
    per_domain = {d: sum(s["predicted"] == d for s in samples if s["domain"] == d) / samples_per_domain
                  for d in domains}
    n = len(samples)
    accuracy = sum(s["predicted"] == s["domain"] for s in samples) / n if n else float("nan")
    return {"accuracy": accuracy, "per_domain": per_domain, "n": n, "samples": samples}
