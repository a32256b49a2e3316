"""The offline consistency suite: items built deterministically from held-out documents only,
written once and read back, user pairs read with bad lines named, scored on any scorer (a fake
one whose answers are known, and a tiny simone model), and written as an lm-evaluation-harness
task folder."""

from __future__ import annotations

import ast
import json
import random

import pytest
import torch

from simone.data.documents import write_documents
from simone.inference.consistency import (SuiteError, SuiteSettings, build_suite, evaluate_suite, first_word,
                                          format_suite_markdown, generation_health, heldout_documents,
                                          load_or_build_suite, read_suite, read_user_pairs, score_suite,
                                          write_lm_eval_tasks, write_suite)
from simone.inference.text_bpb import EvalError
from test_contradict import NAMES, consistent_documents

SMALL = SuiteSettings(pairs_per_kind=8, cloze_per_domain=6, prompts_per_domain=3, bpb_chars_per_domain=3000,
                      gen_tokens=12)


@pytest.fixture(scope="module")
def documents_jsonl(tmp_path_factory):
    path = tmp_path_factory.mktemp("suite") / "documents.jsonl"
    write_documents(path, consistent_documents(docs_per_domain=5, n_val=2))
    return path


@pytest.fixture(scope="module")
def items(documents_jsonl):
    return build_suite(heldout_documents(documents_jsonl), SMALL)


def _squash(text: str) -> str:
    return " ".join(text.split())


def test_the_suite_is_built_only_from_held_out_documents_and_deterministically(documents_jsonl, items):
    held_out = heldout_documents(documents_jsonl)
    texts = {d["id"]: d["text"] for d in held_out}
    assert set(texts) == {"scripture/3", "scripture/4", "history/3", "history/4"}  # the validation split
    for item in items:
        assert item["schema"] == 1 and item["doc"] in texts
        source = texts[item["doc"]]
        if item["task"] == "bpb":
            assert source.startswith(item["text"])
        for field in ("good", "context", "prompt"):
            if field in item:
                assert item[field] in _squash(source)
    shuffled = held_out[::-1]
    random.Random(0).shuffle(shuffled)
    assert build_suite(shuffled, SMALL) == items
    assert build_suite(held_out, SuiteSettings(**{**SMALL.__dict__, "seed": 1})) != items


def test_pairs_are_one_contradiction_apart_and_balanced_over_domains_and_kinds(items):
    pairs = [i for i in items if i["task"] == "pair"]
    for domain in NAMES:
        for kind in ("negation", "antonym", "entity"):
            mine = [i for i in pairs if i["domain"] == domain and i["kind"] == kind]
            assert SMALL.pairs_per_kind // 2 <= len(mine) <= SMALL.pairs_per_kind
            # as many twins longer than their sentence as shorter: length alone wins half
            signs = [(len(i["bad"]) > len(i["good"])) - (len(i["bad"]) < len(i["good"])) for i in mine]
            assert signs.count(1) == signs.count(-1), (domain, kind)
            if kind == "negation":  # "not" put in and taken out: never the same length
                assert signs.count(1) > 0 and 0 not in signs
    for p in pairs:
        c = p["change"]
        assert p["good"][c["offset"]:c["offset"] + len(c["before"])] == c["before"]
        assert p["good"][:c["offset"]] + c["after"] + p["good"][c["offset"] + len(c["before"]):] == p["bad"]
        assert 6 <= len(p["good"].split()) <= 40 and p["good"] != p["bad"]
        if p["kind"] == "entity":
            assert c["after"] in NAMES[p["domain"]]
    cloze = [i for i in items if i["task"] == "cloze"]
    assert len(cloze) == 2 * SMALL.cloze_per_domain
    for c in cloze:  # a content word the passage named before, at a sentence end
        assert len(c["target"]) >= 3 and c["target"] in c["context"] and not c["context"].endswith(" ")
        assert 25 <= len(c["context"].split()) + 1 <= 120
    assert sum(i["task"] == "gen" for i in items) == 2 * SMALL.prompts_per_domain


def test_written_once_and_read_back(tmp_path, documents_jsonl, items):
    path = tmp_path / "suite.jsonl"
    calls = []

    def documents():
        calls.append(1)
        return heldout_documents(documents_jsonl)

    assert load_or_build_suite(path, documents, SMALL) == items and calls == [1]
    assert load_or_build_suite(path, documents, SMALL) == items and calls == [1]  # read back, not built again
    write_suite(path, items)
    assert read_suite(path) == items
    path.write_text(path.read_text() + '{"schema": 1, "task": "pair", "domain": "d", "good": "A."}\n')
    with pytest.raises(SuiteError, match=rf"suite.jsonl:{len(items) + 1}: task 'pair' lacks bad"):
        read_suite(path)


def test_user_pairs_are_read_and_a_bad_line_is_named(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"good": "The cat sleeps.", "bad": "The cat sleep.", "kind": "agreement"}\n\n'
                    '{"sentence_good": "He is here.", "sentence_bad": "He are here.", "domain": "blimp"}\n')
    pairs = read_user_pairs(path)
    assert [(p["good"], p["bad"], p["domain"], p["kind"], p["source"]) for p in pairs] == [
        ("The cat sleeps.", "The cat sleep.", "-", "agreement", "user"),
        ("He is here.", "He are here.", "blimp", "-", "user")]
    for line, problem in [('{"good": "A."}', '"bad" must be a non-empty string'), ("not json", "not valid JSON"),
                          ('{"good": "A.", "bad": "A."}', "the same sentence"), ('["A.", "B."]', "expected an object"),
                          ('{"good": "A.", "bad": "B.", "kind": 3}', '"kind" must be a string')]:
        path.write_text('{"good": "A.", "bad": "B."}\n' + line + "\n")
        with pytest.raises(SuiteError) as e:
            read_user_pairs(path)
        assert str(e.value).startswith(f"{path}:2: ") and problem in str(e.value) and "\n" not in str(e.value)


class FakeScorer:
    """Text as code points after a start id 0. Bits: 1 for text in `liked`, 2 for any other (or
    the reverse); greedy continuation: whatever `answer(prompt)` says."""

    kind = "fake"
    start_id = 0

    def __init__(self, label, liked=(), reverse=False, answer=None):
        self.label, self.liked, self.reverse, self.answer = label, set(liked), reverse, answer
        if answer is not None:
            self.decoder = lambda ids: "".join(chr(i) for i in ids if i)
            self.greedy = lambda ids, n: [ord(c) for c in self.answer(self.decoder(ids))][:n]

    def document_ids(self, text):
        return [0] + [ord(c) for c in text]

    def nll_bits(self, ids):
        liked = "".join(chr(i) for i in ids[1:]) in self.liked
        return 1.0 if liked != self.reverse else 2.0


def test_a_model_preferring_the_original_scores_one_and_the_reverse_zero(items):
    pairs = [i for i in items if i["task"] == "pair"]
    originals = {p["good"] for p in pairs}
    targets = {i["context"]: i["target"] for i in items if i["task"] == "cloze"}
    oracle = FakeScorer("oracle", originals, answer=lambda ctx: f" {targets.get(ctx, 'the law')}. And the")
    scored = score_suite(oracle, items)
    assert scored["pairs"]["value"] == 1.0 and scored["pairs"]["items"] == len(pairs)
    assert all(f["value"] == 1.0 for f in scored["pairs"]["per_kind"].values())
    assert scored["cloze"]["value"] == 1.0 and scored["cloze"]["items"] == 2 * SMALL.cloze_per_domain
    bpb = [i for i in items if i["task"] == "bpb"]
    assert scored["bpb"]["items"] == len(bpb)  # 2 bits a text (none is an original sentence)
    assert scored["bpb"]["value"] == pytest.approx(2 * len(bpb) / sum(len(i["text"].encode()) for i in bpb))
    assert score_suite(FakeScorer("reversed", originals, reverse=True), items)["pairs"]["value"] == 0.0
    # a model that knows only the negated statements: the effect shows on that kind alone (the
    # others at chance), over the pairs whose sentence serves one kind only
    once = [p for p in pairs if sum(q["good"] == p["good"] for q in pairs) == 1]
    negation = {p["good"] for p in once if p["kind"] == "negation"}
    per_kind = score_suite(FakeScorer("negation-only", negation), once)["pairs"]["per_kind"]
    assert {k: f["value"] for k, f in per_kind.items()} == {"antonym": 0.5, "entity": 0.5, "negation": 1.0}
    uniform = score_suite(FakeScorer("uniform"), items)["pairs"]
    assert uniform["value"] == 0.5 and uniform["ties"] == len(pairs)  # a tie counts one half
    wrong = score_suite(FakeScorer("wrong", answer=lambda ctx: "Wrong word"), items)
    assert wrong["cloze"]["value"] == 0.0


def test_generation_health_sees_loops():
    looping = generation_health(["the law is good the law is good the law is good"])
    varied = generation_health(["in those days the river was not rich before the king"])
    assert looping["repeated_4gram_share"]["value"] == pytest.approx(5 / 9)
    assert looping["distinct_2"]["value"] == pytest.approx(4 / 11)
    assert varied["distinct_2"]["value"] == 1.0 and varied["repeated_4gram_share"]["value"] == 0.0
    assert [first_word(t) for t in (" house. And", "\n“Moses,” said", "law—and", "", "  ...")] == \
        ["house", "Moses", "law", "", ""]


def test_a_model_that_cannot_generate_or_load_gets_one_line(items):
    def load(spec, device):
        if spec == "missing":
            raise EvalError("missing: no such model")
        return FakeScorer(spec)

    result = evaluate_suite(["scores-only", "missing"], items, load=load)
    ok, missing = result["models"]
    assert missing == {"model": "missing", "error": "missing: no such model"}
    assert ok["cloze"]["not_scored"] and ok["generation"]["items"] == 2 * SMALL.prompts_per_domain
    table = format_suite_markdown(result)
    assert "- `missing`: not scored: missing: no such model" in table
    assert f"- `scores-only`: cloze not scored: {ok['cloze']['not_scored']}" in table
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert f"({len([i for i in items if i['task'] == 'pair'])})" in rows["minimal pairs, all"]
    assert "not scored" in rows["cloze, all"]
    pairs = [i for i in items if i["task"] == "pair"]
    assert result["counts"]["pair"]["per_kind"] == {k: sum(i["kind"] == k for i in pairs)
                                                    for k in ("negation", "antonym", "entity")}


def test_a_tiny_simone_model_generates_greedily_and_is_scored(template, tmp_path):
    from simone.data.documents import read_documents
    from simone.data.tokenizer import load_tokenizer
    from simone.inference.text_bpb import load_simone_scorer
    from simone.inference.load import load_model
    from simone.rundir import RunDir
    from test_hf_export import _save_model_run

    run = _save_model_run(template, tmp_path / "run")
    scorer = load_simone_scorer(str(run), "cpu")
    scorer.decoder = load_tokenizer(RunDir(run).tokenizer).decode  # what the loader will set (integration)
    loaded = load_model(run, device="cpu")
    ids = scorer.document_ids("Lord god heaven earth")
    expected = [int(t) for t in loaded.model.generate(torch.tensor([ids]), 10, temperature=0.0)]
    assert scorer.greedy(ids, 10) == expected

    held_out = [{"id": d["id"], "domain": d["domain"], "text": d["text"]}
                for d in read_documents(RunDir(template).documents, "val")]
    suite = build_suite(held_out, SuiteSettings(pairs_per_kind=4, cloze_per_domain=2, prompts_per_domain=1,
                                                bpb_chars_per_domain=400, gen_tokens=8, cloze_words=(10, 60),
                                                sentence_words=(3, 40)))
    scored = score_suite(scorer, suite)
    assert 0.0 <= scored["pairs"]["value"] <= 1.0 and scored["pairs"]["per_kind"]["antonym"]["items"] > 0
    assert 1.0 < scored["bpb"]["value"] < 20.0
    assert scored["cloze"]["items"] == 6 and scored["generation"]["items"] == 3
    assert 0.0 <= scored["generation"]["distinct_2"]["value"] <= 1.0


def test_the_lm_eval_task_folder_reads_the_suite_offline(items, tmp_path):
    yaml = pytest.importorskip("yaml")
    jinja2 = pytest.importorskip("jinja2")
    pairs_file = tmp_path / "mine.jsonl"
    pairs_file.write_text('{"good": "It\'s \\"so\\".", "bad": "It isn\'t so."}\n')
    names = write_lm_eval_tasks(items + read_user_pairs(pairs_file), tmp_path / "tasks")
    assert names == ["simone_pairs", "simone_pairs_antonym", "simone_pairs_entity", "simone_pairs_negation",
                     "simone_user_pairs", "simone_cloze", "simone_bpb", "simone_suite"]
    configs = {n: yaml.safe_load((tmp_path / "tasks" / f"{n}.yaml").read_text()) for n in names}
    assert configs["simone_suite"]["task"] == names[:-1]
    for name in names[:-1]:
        cfg = configs[name]
        assert cfg["task"] == name and cfg["dataset_path"] == "json" and cfg["test_split"] == "test"
        data = cfg["dataset_kwargs"]["data_files"]["test"]
        rows = [json.loads(line) for line in open(data, encoding="utf-8")]
        if name.startswith(("simone_pairs", "simone_user")):
            assert cfg["output_type"] == "multiple_choice" and cfg["doc_to_target"] == 0
            assert cfg["doc_to_text"] == "" and cfg["target_delimiter"] == ""
            for row in rows:  # the harness renders the choices and reads them as a Python list
                choices = ast.literal_eval(jinja2.Template(cfg["doc_to_choice"]).render(**row))
                assert choices == [row["good"], row["bad"]]
    assert len(rows := [json.loads(x) for x in open(configs["simone_pairs"]["dataset_kwargs"]["data_files"]["test"])]) \
        == sum(i["task"] == "pair" for i in items)
    assert configs["simone_cloze"]["output_type"] == "loglikelihood"
    assert configs["simone_bpb"]["output_type"] == "loglikelihood_rolling"
    assert configs["simone_bpb"]["metric_list"] == [{"metric": "bits_per_byte", "higher_is_better": False}]


def test_user_pairs_alone_make_a_table_of_their_own(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"good": "The law is good.", "bad": "The law is not good.", "kind": "negation"}\n')
    result = evaluate_suite(["m"], read_user_pairs(path),
                            load=lambda spec, device: FakeScorer(spec, {"The law is good."}))
    table = format_suite_markdown(result)
    assert "| user pairs, all | 100.0% (1) |" in table and "| user pairs, kind negation | 100.0% (1) |" in table
    assert not [line for line in table.splitlines() if line.startswith(("| bpb", "| cloze", "| generation", "- "))]
