"""The steering judge: an independent scikit-learn classifier fitted on the training split."""

from __future__ import annotations

import json

import pytest

from conftest import make_corpus
from simone.inference.steering_judge import (SteeringJudge, fit_on_documents, snippet_accuracy, snippet_confusion, snippets,
                                       words)


def test_words_are_lowercased_letters_only():
    assert words("The Sun's light, 1611 — Σοφία!") == ["the", "sun's", "light", "σοφία"]


def test_snippets_cut_whole_windows_or_spread_a_few():
    text = " ".join(f"w{i}" for i in range(10))
    assert snippets(text, 3) == ["w0 w1 w2", "w3 w4 w5", "w6 w7 w8"]
    assert snippets(text, 3, n=2) == ["w0 w1 w2", "w3 w4 w5"]
    assert snippets("a b", 5) == ["a b"] and snippets("", 5) == []


def test_one_domain_is_refused():
    with pytest.raises(ValueError, match="two domains"):
        SteeringJudge().fit(["a b", "c d"], ["x", "x"])


def _documents_jsonl(corpus, path):
    """A documents.jsonl from make_corpus's tree: the first document of each subdomain validates."""
    rows = []
    for txt in sorted(corpus.rglob("*.txt")):
        domain = txt.parent.parent.name
        rows.append({"id": txt.stem, "domain": domain, "split": "val" if txt.stem.endswith("-0") else "train",
                     "text": txt.read_text(encoding="utf-8")})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_judge_separates_distinct_domains_at_sample_length(tmp_path):
    # make_corpus's three domains draw their words from distinct vocabularies
    docs = _documents_jsonl(make_corpus(tmp_path / "corpus"), tmp_path / "documents.jsonl")
    judge = fit_on_documents(docs, snippet_words=12)
    assert judge.classes == ["history", "poetry", "scripture"]
    assert snippet_accuracy(judge, docs, split="val", snippet_words=12) >= 0.95
    assert judge.training_books_accuracy >= 0.95  # held-back passages of the training documents
    assert judge.predict("the lord god made heaven and earth, light and darkness") == "scripture"
    assert judge.predict("my love, sweet rose of summer, a song of sorrow") == "poetry"
    # text that shares a domain's characters but no whole word still lands there (char n-grams)
    assert judge.predict("congressional treaties") == "history"


def test_fit_on_documents_uses_only_the_training_split(tmp_path):
    path = tmp_path / "documents.jsonl"
    rows = [{"id": "1", "domain": "sky", "split": "train", "text": "sun moon star " * 20},
            {"id": "2", "domain": "law", "split": "train", "text": "court judge vote " * 20},
            {"id": "3", "domain": "law", "split": "val", "text": "sun moon star " * 20}]  # mislabelled val
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    judge = fit_on_documents(path, snippet_words=5)
    assert judge.predict("moon") == "sky"  # the val document did not teach "moon" = law
    assert snippet_accuracy(judge, path, split="val", snippet_words=5) == 0.0
    assert snippet_accuracy(judge, path, split="train", snippet_words=5) == 1.0
    # where the errors go: the mislabelled val document's snippets are all judged "sky"
    assert snippet_confusion(judge, path, split="val", snippet_words=5) == {"law": {"sky": 10}}
    assert snippet_confusion(judge, path, split="train", snippet_words=5) == {"sky": {"sky": 10}, "law": {"law": 10}}


def test_big_domains_are_capped_to_the_same_number_of_snippets(tmp_path, monkeypatch):
    path = tmp_path / "documents.jsonl"
    rows = [{"id": "1", "domain": "big", "split": "train", "text": "alpha beta " * 500},
            {"id": "2", "domain": "small", "split": "train", "text": "gamma delta " * 10}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    seen = {}
    real_fit = SteeringJudge.fit

    def spy(self, texts, labels):
        seen.update({c: labels.count(c) for c in set(labels)})
        return real_fit(self, texts, labels)

    monkeypatch.setattr(SteeringJudge, "fit", spy)
    fit_on_documents(path, snippet_words=4, max_snippets_per_domain=7)
    assert seen == {"big": 7, "small": 5}


def test_unguided_samples_are_drawn_in_one_batch_and_cut_at_end_of_document():
    from types import SimpleNamespace

    import torch

    from simone.inference.steering_judge import sample_batch, steering_accuracy

    calls = []

    class Model:
        def generate(self, idx, max_new, **kw):
            calls.append((idx.tolist(), max_new))
            yield torch.tensor([[5], [0], [7]])  # row 1 ends its document at once
            yield torch.tensor([[6], [0], [8]])

    tok = SimpleNamespace(eod_id=0, domains=["sky", "law"], domain_token_id=lambda d: {"sky": 1, "law": 2}[d],
                          decode=lambda ids: " ".join(f"w{i}" for i in ids))
    loaded = SimpleNamespace(model=Model(), tokenizer=tok, device=torch.device("cpu"), files={},
                             config=SimpleNamespace(model=SimpleNamespace(max_seq_len=64)))
    assert sample_batch(loaded, "law", 3, max_tokens=100) == ["w5 w6", "", "w7 w8"]
    assert calls == [([[0, 2]] * 3, 62)]  # [eod, <|domain:law|>] three times; the context caps the length

    judge = SimpleNamespace(classes=["law", "sky"], predict_many=lambda texts: ["sky" if "w5" in t else "law" for t in texts])
    calls.clear()
    result = steering_accuracy(loaded, judge, samples_per_domain=3, max_tokens=2)
    assert len(calls) == 2 and result["n"] == 6  # one batch per domain
    assert result["per_domain"] == {"sky": 1 / 3, "law": 2 / 3} and result["accuracy"] == 0.5


def test_the_batched_guided_sampler_draws_what_the_one_sample_sampler_draws():
    """Greedy, every sample of the batch is the token-by-token guided generation of one sample
    (each row of a sample continues from its winner: keys, values and policy state)."""
    import torch

    from simone.config import ModelConfig
    from simone.inference.streaming import governed_generate, guided_sample_batch
    from simone.model import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(dim=32, n_layers=2, n_heads=2, max_seq_len=32, vocab_size=64,
                                    governance=True, n_domains=3)).eval()
    prompt = [0, 2]
    for weight in (0.0, 3.0):
        one = [s.token for s in governed_generate(model, prompt, 12, temperature=0.0, guidance_domain=1,
                                                  guidance_weight=weight or 1e-9, guidance_top_k=4)]
        batch = guided_sample_batch(model, prompt, 3, 12, guidance_domain=1, guidance_weight=weight,
                                    guidance_top_k=4, temperature=0.0)
        assert batch.shape == (3, 12) and all(row == one for row in batch.tolist()), weight
    # the policy moves the draw: a strong weight changes what greedy decoding writes
    plain = guided_sample_batch(model, prompt, 1, 12, 1, 0.0, 4, temperature=0.0)
    steered = guided_sample_batch(model, prompt, 1, 12, 1, 50.0, 4, temperature=0.0)
    assert not torch.equal(plain, steered)
    with pytest.raises(ValueError, match="exceed the context"):
        guided_sample_batch(model, prompt, 1, 31, 1, 1.0)


def test_a_tiny_temperature_picks_the_guided_best_instead_of_failing():
    import torch

    from simone.inference.decoding import _guided_pick

    cand_logp = torch.tensor([[-1.0, -0.5, -2.0]])
    domain_prob = torch.tensor([[0.1, 0.01, 0.9]])
    best = int((cand_logp + 2.0 * domain_prob.log()).argmax())
    for t in (0.0, 1e-300, float("nan")):  # 1e-300 divided the scores into inf: NaN probabilities
        assert int(_guided_pick(cand_logp, domain_prob, 2.0, t, None)[0]) == best
