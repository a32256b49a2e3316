"""Contradicted data variants (`contradict:P[:KINDS]`): the transforms really flip what they
claim, only in training documents, deterministically, and every change is listed with an offset
that points at its `before` in the original text."""

from __future__ import annotations

import json
import random

import pytest

from simone.data.contradict import (ANTONYM_PAIRS, ANTONYMS, KINDS, ContradictSpec, ContradictSpecError,
                                    apply_sites, contradict_documents, contradict_text, find_sites, name_pool,
                                    parse_contradict_spec, sentence_spans)
from simone.errors import SimoneError

NAMES = {"scripture": ["Moses", "Aaron", "Joshua", "Miriam"],
         "history": ["Lincoln", "Grant", "Jefferson", "Adams"]}
ADJECTIVES = ["good", "wise", "strong", "true", "holy", "faithful", "rich"]
NOUNS = ["king", "land", "law", "people", "city", "river"]


def consistent_documents(docs_per_domain: int = 5, n_val: int = 2, sentences: int = 60) -> list[dict]:
    """documents.jsonl-like rows: statements with copulas, modals, negations, antonym-list words
    and the names of their own domain (the last `n_val` of each domain are validation)."""
    docs = []
    for domain, names in NAMES.items():
        for i in range(docs_per_domain):
            rng = random.Random(f"{domain}:{i}")
            out = []
            for _ in range(sentences):
                a, b = rng.sample(names, 2)
                noun, other, adj = rng.choice(NOUNS), rng.choice(NOUNS), rng.choice(ADJECTIVES)
                out.append(rng.choice([
                    f"The {noun} is {adj}, said {a} to the {other}.",
                    f"And {a} spoke unto {b}, for the {noun} shall be {adj}.",
                    f"In those days the {noun} was not {adj} before {b}.",
                    f"We love the light of the {noun} and the {other} of {a}.",
                    f"{a} cannot leave the {noun}, for it isn't {adj}.",
                ]))
            text = " ".join(out[: sentences // 2]) + "\n\n" + " ".join(out[sentences // 2:]) + "\n"
            docs.append({"id": f"{domain}/{i}", "path": f"{domain}/{i}.txt", "domain": domain,
                         "split": "val" if i >= docs_per_domain - n_val else "train", "text": text})
    return docs


def test_negation_is_inserted_at_copulas_and_modals_and_removed_where_it_stands():
    text = ("The law is good. It was not so. We shall go. They can see. He cannot stay. "
            "It isn't true. They did not come. Is he wise? The will of the king is done. "
            "It is never so. In May the king rode.")
    flips = {s.before: s.after for s in find_sites(text, ("negation",))}
    assert flips == {"is": "is not", "was not": "was", "shall": "shall not", "can": "cannot",
                     "cannot": "can", "isn't": "is", "did not": "did"}
    # questions ("Is he"), nouns ("the will"), already negative ("is never") and names ("May") are left
    sites = find_sites(text, ("negation",))
    assert [text[s.start:s.end] for s in sites].count("is") == 2  # "The law is", "the king is done"
    assert all(s.kind == "negation" for s in sites)
    new, changes = contradict_text(text, random.Random(0), ("negation",), flip_share=1.0)
    assert len(changes) == len([1 for a, b in sentence_spans(text) if any(a <= s.start < b for s in sites)])
    assert "The law is not good." in new or "It was so." in new or "We shall not go." in new
    assert [s.after for s in find_sites("Can he go? They CAN see. WE SHALL GO.", ("negation",))] == ["CANNOT", "SHALL NOT"]


def test_antonyms_swap_both_directions_and_keep_case():
    assert len(ANTONYMS) == 2 * len(ANTONYM_PAIRS)  # no word in two pairs
    assert all(ANTONYMS[ANTONYMS[w]] == w for w in ANTONYMS)
    text = "Good men love the light; EVIL hates it. She is wise, not foolish. A good king. A well-known truth's end."
    flips = [(s.before, s.after) for s in find_sites(text, ("antonym",))]
    assert flips == [("Good", "Evil"), ("love", "hate"), ("light", "darkness"), ("EVIL", "GOOD"),
                     ("hates", "loves"), ("wise", "foolish"), ("foolish", "wise"), ("A good", "An evil")]
    # hyphenated and possessive words are not whole words of the list ("well-known", "truth's")
    assert apply_sites("an evil day", find_sites("an evil day", ("antonym",))[:1]) == "a good day"


def test_entity_swaps_names_only_within_the_domain():
    docs = consistent_documents()
    result = contradict_documents(docs, ContradictSpec(1.0, ("entity",)), seed=0)
    assert result.changes
    for c in result.changes:
        assert c["kind"] == "entity"
        assert c["before"] in NAMES[c["domain"]] and c["after"] in NAMES[c["domain"]]
        assert c["before"] != c["after"]
    # names: capitalised mid-sentence in 2+ documents; sentence starts and the stoplist are not names
    pool = name_pool(["The king saw Moses, and God spoke to Aaron.", "Then Moses went. Truly Aaron came; Lord Aaron.",
                      "Only Miriam sang to Moses."])
    assert pool == ["Aaron", "Moses"]


def test_every_change_points_at_the_original_and_rebuilds_the_new_text():
    docs = consistent_documents()
    result = contradict_documents(docs, parse_contradict_spec("contradict:0.5"), seed=3)
    before = {d["id"]: d["text"] for d in docs}
    after = {d["id"]: d["text"] for d in result.documents}
    assert {c["kind"] for c in result.changes} == set(KINDS)
    for doc_id in {c["document"] for c in result.changes}:
        original, mine = before[doc_id], [c for c in result.changes if c["document"] == doc_id]
        pieces, pos = [], 0
        for c in mine:  # in order, not overlapping
            assert c["offset"] >= pos and original[c["offset"]:c["offset"] + len(c["before"])] == c["before"]
            pieces += [original[pos:c["offset"]], c["after"]]
            pos = c["offset"] + len(c["before"])
        assert "".join(pieces) + original[pos:] == after[doc_id]
    unchanged = {d["id"] for d in docs} - {c["document"] for c in result.changes}
    assert all(before[i] == after[i] for i in unchanged)


def test_held_out_documents_are_never_changed_and_the_choice_is_seeded():
    docs = consistent_documents(docs_per_domain=6, n_val=2)
    spec = parse_contradict_spec("contradict:0.5:negation,antonym")
    first = contradict_documents(docs, spec, seed=7)
    again = contradict_documents(docs, spec, seed=7)
    assert first.documents == again.documents and first.changes == again.changes
    val = {d["id"] for d in docs if d["split"] == "val"}
    assert not val & {c["document"] for c in first.changes}
    assert [d for d in first.documents if d["id"] in val] == [d for d in docs if d["id"] in val]
    changed = {c["document"] for c in first.changes}
    for domain in NAMES:  # half of each domain's 4 training documents
        assert len([i for i in changed if i.startswith(domain)]) == 2
    other = contradict_documents(docs, spec, seed=8)
    assert other.changes != first.changes
    assert [d["id"] for d in first.documents] == [d["id"] for d in docs]  # order and count kept


def test_a_chosen_document_disagrees_with_itself_and_keeps_its_size():
    docs = consistent_documents(docs_per_domain=3, n_val=0, sentences=200)
    result = contradict_documents(docs, ContradictSpec(1.0, KINDS), seed=0)
    s = result.summary
    assert s["documents_changed"] == s["training_documents"] == 6
    # about half of the sentences (every sentence here has a site) get one change
    sentences = sum(len(sentence_spans(d["text"])) for d in docs)
    assert 0.4 < s["changes"] / sentences < 0.6
    assert abs(s["bytes_change"]) < 0.02
    assert s["changes_per_kind"] == {k: sum(c["kind"] == k for c in result.changes) for k in KINDS}


def test_spec_parsing_and_one_line_errors():
    assert parse_contradict_spec("contradict:0.25") == ContradictSpec(0.25, KINDS)
    assert parse_contradict_spec("contradict:1:entity+negation").kinds == ("negation", "entity")
    assert parse_contradict_spec("contradict:0.5:antonym,negation").text == "contradict:0.5:negation+antonym"
    for bad in ["contradict", "contradict:0", "contradict:1.5", "contradict:half", "contradict:0.5:sarcasm",
                "contradict:0.5:", "shuffle:0.5"]:
        with pytest.raises(ContradictSpecError) as e:
            parse_contradict_spec(bad)
        assert isinstance(e.value, SimoneError) and "\n" not in str(e.value) and repr(bad) in str(e.value)


def test_the_manifest_is_written_for_a_person_to_read(tmp_path):
    result = contradict_documents(consistent_documents(), parse_contradict_spec("contradict:0.5"), seed=0)
    result.write(tmp_path / "variant")
    rows = [json.loads(line) for line in (tmp_path / "variant" / "contradictions.jsonl").read_text().splitlines()]
    assert rows == result.changes and set(rows[0]) == {"document", "domain", "offset", "kind", "before", "after"}
    summary = json.loads((tmp_path / "variant" / "contradictions.json").read_text())
    assert summary["changes"] == len(rows) and summary["spec"] == "contradict:0.5:negation+antonym+entity"
