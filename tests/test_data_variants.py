"""`simone ablate --data-variant NAME=SPEC`: the same model, tokenizer and budget on other data,
each variant against `curated`, scored on the consistency suite built from held-out text."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from simone.cli import main
from simone.data.documents import read_documents
from simone.workflows.ablate import AblationSettings, check_variants
from simone.workflows.ablation_report import dose_response
from simone.workflows.data_variants import DataVariantError, mix_documents

NAMES = {"scripture": ["Moses", "Aaron", "Joshua", "Samuel"], "history": ["Lincoln", "Madison", "Hamilton", "Jefferson"],
         "poetry": ["Juliet", "Romeo", "Portia", "Viola"]}
_SYLLABLES = "ba ko ri tu me sa lo ni va de fu ra zo pi te".split()
# made-up words: enough of them that curation's repetition rules see prose, not a template
WORDS = sorted({a + b + c for a in _SYLLABLES for b in _SYLLABLES for c in ("n", "l", "r", "m")})
ADJECTIVES = "good wise true strong faithful kind just humble glad".split()  # words with antonyms


def make_sentence_corpus(root: Path, docs_per_domain: int = 5, sentences: int = 60, seed: int = 0) -> Path:
    """DOMAIN/SUB/*.txt books of plain sentences with copulas, modals, antonym-list words and
    names that recur across each domain's books: every kind of contradiction has sites."""
    rng = random.Random(seed)
    for domain, names in NAMES.items():
        folder = root / domain / f"{domain}_a"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(docs_per_domain):
            lines = []
            for _ in range(sentences):
                name, other = rng.sample(names, 2)
                NOUNS = rng.sample(WORDS, 3)
                form = rng.randrange(5)
                if form == 0:
                    s = f"The {rng.choice(NOUNS)} of {name} is {rng.choice(ADJECTIVES)} and {rng.choice(WORDS)}."
                elif form == 1:
                    s = f"Then {name} said that {rng.choice(WORDS)} {rng.choice(NOUNS)} was {rng.choice(ADJECTIVES)} to {other}."
                elif form == 2:
                    s = f"And {name} shall {rng.choice(WORDS)} the {rng.choice(NOUNS)} with {other} {rng.choice(WORDS)}."
                elif form == 3:  # a negation to take out, as others are put in
                    s = f"But {name} was not {rng.choice(ADJECTIVES)} with {other} in {rng.choice(WORDS)}."
                else:
                    s = f"So {rng.choice(WORDS)} {rng.choice(NOUNS)} can be {rng.choice(ADJECTIVES)} for {name} {rng.choice(WORDS)}."
                lines.append(s)
            body = "\n".join(" ".join(lines[j:j + 4]) for j in range(0, len(lines), 4))
            (folder / f"{domain}-{i}.txt").write_text(f"The Book of {domain.title()} {i}\n\n{body}\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
    root = tmp_path_factory.mktemp("data_ablation")
    corpus = make_sentence_corpus(root / "corpus")
    other = make_sentence_corpus(root / "other", docs_per_domain=3, seed=7)
    out = root / "out"
    rc = main(["ablate", "--data", str(corpus), "--preset", "tiny", "--out", str(out), "--max-steps", "2",
               "--seeds", "2", "--samples-per-domain", "0", "--heldout-batches", "1", "--suite-items", "5",
               "--set", "train.eval_batches=1", "--set", "data.val_fraction=0.4",
               "--data-variant", "c50=contradict:0.5", "--data-variant", "neg=contradict:1:negation",
               "--data-variant", "raw=raw", "--data-variant", "strict=strict",
               "--data-variant", f"mix=mix:{other}:0.3"])
    assert rc == 0
    return out, json.loads((out / "ablation.json").read_text())


def test_every_data_variant_trains_the_same_budget_and_is_compared_with_curated(ablation):
    out, result = ablation
    rows = {r["variant"]: r for r in result["variants"]}
    assert list(rows) == ["curated", "c50", "neg", "raw", "strict", "mix"]
    for name, r in rows.items():
        assert r["steps"] == 2 and r["tokens_seen"] == 2 * result["tokens_per_step"], name
        assert r["pair_accuracy"]["n"] == 2 and 0 <= r["pair_accuracy"]["mean"] <= 1, name
        assert r["steering_accuracy"]["n"] == 0  # --samples-per-domain 0: no steering, no judge
        # every variant links the one tokenizer trained on the base corpus
        assert (out / "runs" / name / "seed_0" / "tokenizer").resolve() == (out / "shared" / "tokenizer").resolve()
    assert result["steering_judge"] is None
    pairs = {(d["variant"], d["reference"]) for d in result["differences"]}
    assert pairs == {(n, "curated") for n in rows if n != "curated"} and result["suite"]["counts"]["pair"]["items"] > 0
    table = (out / "ablation.md").read_text()
    assert "minimal pairs" in table and "steering" not in table.split("## Differences")[0].split("\n| variant")[1]
    assert "| c50 | `contradict:0.5` |" in table


def test_held_out_text_is_the_same_for_every_variant_and_never_trains(ablation):
    out, _ = ablation
    base = list(read_documents(out / "shared" / "data" / "documents.jsonl"))
    held = [d for d in base if d["split"] == "val"]
    held_texts = {d["text"] for d in held}
    assert held
    for name in ("c50", "neg", "raw", "strict", "mix"):
        docs = list(read_documents(out / "data_variants" / name / "data" / "documents.jsonl"))
        assert [d for d in docs if d["split"] == "val"] == held, name  # unchanged, in order
        trained = [d for d in docs if d["split"] == "train"]
        assert trained and not any(d["text"] in held_texts for d in trained), name
    # the suite is built from held-out documents only: every pair's original is held-out text
    items = [json.loads(line) for line in (out / "shared" / "consistency_suite.jsonl").read_text().splitlines()]
    pairs = [i for i in items if i["task"] == "pair"]
    assert pairs and all(any(p["good"] in t for t in held_texts) for p in pairs)


def test_contradictions_are_listed_and_point_at_what_they_changed(ablation):
    out, result = ablation
    base = {d["id"]: d["text"] for d in read_documents(out / "shared" / "data" / "documents.jsonl")}
    changes = [json.loads(line) for line in (out / "data_variants" / "c50" / "contradictions.jsonl").read_text().splitlines()]
    assert {c["kind"] for c in changes} == {"negation", "antonym", "entity"}
    for c in changes:
        assert base[c["document"]][c["offset"]:c["offset"] + len(c["before"])] == c["before"]
        assert c["before"] != c["after"]
    only_negation = (out / "data_variants" / "neg" / "contradictions.jsonl").read_text().splitlines()
    assert only_negation and all(json.loads(line)["kind"] == "negation" for line in only_negation)
    summary = result["data_variants"]["c50"]["contradictions"]
    assert summary["changes"] == len(changes) and 0 < summary["documents_changed"] <= summary["training_documents"]
    # the dose-response chart: curated at P = 0, c50 at 0.5, neg (one kind) at 1
    points = {p["variant"]: (p["share"], p["kinds"]) for p in dose_response(result["variants"])}
    assert points == {"curated": (0.0, "all"), "c50": (0.5, "all"), "neg": (1.0, "negation")}
    assert "against P" in (out / "ablation.svg").read_text()


def test_mix_replaces_the_share_of_tokens_and_keeps_the_total(ablation):
    _, result = ablation
    mix = result["data_variants"]["mix"]
    assert mix["tokens_replaced"] == mix["tokens_added"]
    assert mix["tokens_replaced"] == pytest.approx(0.3 * mix["training_tokens"], rel=0.02)


def test_a_resumed_data_ablation_reuses_every_run(ablation, capsys):
    out, _ = ablation
    corpus = out.parent / "corpus"
    rc = main(["ablate", "--data", str(corpus), "--preset", "tiny", "--out", str(out), "--max-steps", "2",
               "--seeds", "2", "--samples-per-domain", "0", "--heldout-batches", "1", "--suite-items", "5",
               "--set", "train.eval_batches=1", "--set", "data.val_fraction=0.4",
               "--data-variant", "c50=contradict:0.5", "--resume"])
    assert rc == 0
    said = capsys.readouterr().out
    assert said.count("reusing the finished run") == 4 and "training 2 steps" not in said


class FakeTokenizer:
    def encode_batch(self, texts):
        return [t.split() for t in texts]


def test_mix_takes_whole_documents_in_a_seeded_order_and_labels_them_with_the_replaced_domain():
    train = [{"id": f"t{i}", "domain": "a" if i % 2 else "b", "text": "w " * 100, "split": "train"} for i in range(10)]
    other = [{"id": f"o{i}", "domain": "x", "text": "v " * 50, "split": "train"} for i in range(20)]
    mixed, info = mix_documents(list(train), other, 0.25, seed=3, tok=FakeTokenizer())
    assert info["tokens_replaced"] == info["tokens_added"] == 250
    assert sum(len(d["text"].split()) for d in mixed) == 1000  # the same total
    taken = [d for d in mixed if d["id"].startswith("mix:")]
    assert {d["domain"] for d in taken} <= {"a", "b"} and {d["source_domain"] for d in taken} == {"x"}
    again, _ = mix_documents(list(train), other, 0.25, seed=3, tok=FakeTokenizer())
    assert again == mixed
    with pytest.raises(DataVariantError, match="fewer than"):
        mix_documents(list(train), other[:2], 0.5, seed=3, tok=FakeTokenizer())


@pytest.mark.parametrize("item, message", [
    ("c50", "NAME=SPEC"), ("llama=raw", "already a variant"), ("curated=raw", "already a variant"),
    ("x=contradict:2", "P must be"), ("x=contradict:0.5:sarcasm", "unknown kind"),
    ("x=mix:/nowhere:0.5", "no such folder"), ("x=mix:.:1.5", "mix:DIR:P"), ("x=/no/such/corpus", "no such folder"),
])
def test_a_bad_data_variant_is_refused_in_one_line_before_any_work(item, message, tmp_path):
    with pytest.raises(DataVariantError, match=message):
        check_variants(AblationSettings(variants=[], data_variants=[item]))  # the model variants' names are taken
    if item == "x=contradict:2":  # through the command: exit 2 and one line, nothing written
        rc = main(["ablate", "--out", str(tmp_path / "a"), "--preset", "tiny", "--data-variant", item])
        assert rc == 2 and not (tmp_path / "a").exists()
