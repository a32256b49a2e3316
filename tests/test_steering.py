"""The steering judge: an independent naive Bayes classifier fitted on the training split."""

from __future__ import annotations

import json
import math

import pytest

from simone.inference.steering import NaiveBayesClassifier, fit_on_documents, snippet_accuracy, words

TEXTS = {
    "sky": ["the sun and the moon and a star in the sky", "bright star light over the moon"],
    "law": ["the court and the judge and the law of the state", "a vote of the state court"],
}


def test_words_are_lowercased_letters_only():
    assert words("The Sun's light, 1611 — Σοφία!") == ["the", "sun's", "light", "σοφία"]


def test_classifier_assigns_text_to_the_class_of_its_words():
    texts = [t for ts in TEXTS.values() for t in ts]
    labels = [c for c, ts in TEXTS.items() for _ in ts]
    nb = NaiveBayesClassifier().fit(texts, labels)
    assert nb.classes == ["law", "sky"]
    assert nb.predict("the moon and a star") == "sky"
    assert nb.predict("the judge of the court") == "law"
    assert nb.accuracy(["moon star", "judge vote"], ["sky", "law"]) == 1.0
    # words seen in neither class leave the (uniform) prior: a tie, scores equal
    scores = nb.log_posteriors("zebra")
    assert math.isclose(scores["law"] - scores["sky"], nb.log_unseen["law"] - nb.log_unseen["sky"])


def test_uniform_prior_ignores_class_sizes():
    texts = ["alpha beta"] * 9 + ["gamma delta"]
    labels = ["a"] * 9 + ["b"]
    uniform = NaiveBayesClassifier(uniform_prior=True).fit(texts, labels)
    sized = NaiveBayesClassifier(uniform_prior=False).fit(texts, labels)
    assert uniform.log_prior["a"] == uniform.log_prior["b"]
    assert sized.log_prior["a"] > sized.log_prior["b"]


def test_one_class_is_refused():
    with pytest.raises(ValueError, match="two classes"):
        NaiveBayesClassifier().fit(["a b"], ["x"])


def test_fit_on_documents_uses_only_the_training_split(tmp_path):
    path = tmp_path / "documents.jsonl"
    rows = [{"id": "1", "domain": "sky", "split": "train", "text": "sun moon star " * 20},
            {"id": "2", "domain": "law", "split": "train", "text": "court judge vote " * 20},
            {"id": "3", "domain": "law", "split": "val", "text": "sun moon star " * 20}]  # mislabelled val
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    nb = fit_on_documents(path)
    assert nb.predict("moon") == "sky"  # the val document did not teach "moon" = law
    assert snippet_accuracy(nb, path, split="val", snippet_words=5) == 0.0
    assert snippet_accuracy(nb, path, split="train", snippet_words=5) == 1.0
