"""`simone eval --suite / --pairs / --lm-eval-tasks`: the consistency suite on any model, and the
same items scored by lm-evaluation-harness on the exported model, offline."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from simone.cli import main
from simone.inference.hf_folder import export_hf
from simone.train.trainer import train
from test_data_variants import make_sentence_corpus
from train_support import new_run


@pytest.fixture(scope="module")
def scored(template, tmp_path_factory):
    """A run trained a few steps, its Hugging Face export, a suite built from a folder of books,
    and `simone eval --suite` on both models."""
    root = tmp_path_factory.mktemp("suite")
    cfg, run = new_run(template, root / "run", max_steps=3, eval_every=100)
    train(cfg, run)
    exported = export_hf(run.root, root / "hf")
    corpus = make_sentence_corpus(root / "books", docs_per_domain=2, sentences=30)
    pairs = root / "mine.jsonl"
    pairs.write_text(json.dumps({"good": "The law is good.", "bad": "The law is not good.", "kind": "negation"}) + "\n"
                     + json.dumps({"sentence_good": "Light is light.", "sentence_bad": "Light is darkness."}) + "\n")
    out = root / "scores.json"
    rc = main(["eval", "--model", str(run.root), "--model", f"hf:{exported}", "--suite", str(root / "suite.jsonl"),
               "--data", str(corpus), "--suite-items", "20", "--pairs", str(pairs), "--lm-eval-tasks", str(root / "tasks"),
               "--json", str(out), "--device", "cpu"])
    assert rc == 0
    return root, json.loads(out.read_text())


def test_every_figure_comes_with_its_item_count_and_both_models_agree(scored):
    root, result = scored
    ours, hf = result["models"]
    assert ours["kind"] == "simone" and hf["kind"] == "hf"
    for m in (ours, hf):
        assert m["pairs"]["items"] == result["counts"]["pair"]["items"] > 0
        assert set(m["pairs"]["per_kind"]) == {"negation", "antonym", "entity"}
        assert m["user_pairs"]["items"] == 2
        assert m["cloze"]["items"] > 0 and m["cloze"]["value"] is not None  # the scorers decode greedily
        assert m["generation"]["items"] == 3 * 4 and len(m["generation"]["samples"]) == 3  # 20 // 5 prompts a domain
        assert m["bpb"]["value"] > 0 and set(m["bpb"]["per_domain"]) == {"history", "poetry", "scripture"}
    # the export is the same model: the same choices on every pair, the same greedy words
    assert hf["pairs"]["value"] == ours["pairs"]["value"] and hf["cloze"]["value"] == ours["cloze"]["value"]
    assert hf["bpb"]["value"] == pytest.approx(ours["bpb"]["value"], rel=1e-4)


def test_a_second_run_scores_the_same_items(scored, capsys):
    root, first = scored
    rc = main(["eval", "--model", str(root / "run"), "--suite", str(root / "suite.jsonl"), "--device", "cpu",
               "--json", str(root / "again.json")])  # no --data: the suite file is read, not rebuilt
    assert rc == 0
    again = json.loads((root / "again.json").read_text())
    assert again["counts"]["pair"] == first["counts"]["pair"]
    assert again["models"][0]["pairs"]["value"] == first["models"][0]["pairs"]["value"]
    assert f"`{root / 'run'}`" in capsys.readouterr().out  # the table has the model's column


def test_a_model_that_cannot_be_loaded_gets_one_line(scored, capsys):
    root, _ = scored
    rc = main(["eval", "--model", str(root / "nowhere"), "--suite", str(root / "suite.jsonl"), "--device", "cpu"])
    out = capsys.readouterr()
    assert rc == 1 and "not scored" in out.out and "Traceback" not in out.err + out.out
    rc = main(["eval", "--model", str(root / "run"), "--suite", str(root / "missing.jsonl")])
    assert rc == 2 and "give --data" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-evaluation-harness is not installed")
def test_lm_eval_harness_gives_the_same_pair_accuracy_offline(scored):
    root, result = scored
    hf = result["models"][1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(root / "hf_home"), "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-m", "lm_eval", "run", "--model", "hf",
                           "--model_args", f"pretrained={root / 'hf'},dtype=float32", "--device", "cpu",
                           "--include_path", str(root / "tasks"), "--tasks", "simone_pairs,simone_user_pairs",
                           "--output_path", str(root / "lm_eval_out")],
                          capture_output=True, text=True, env=env, timeout=240, cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(next((root / "lm_eval_out").rglob("results_*.json")).read_text())["results"]
    for task, figure in (("simone_pairs", hf["pairs"]), ("simone_user_pairs", hf["user_pairs"])):
        # the harness breaks a tie for the first (good) sentence; the suite counts it one half
        assert results[task]["acc,none"] == pytest.approx(figure["value"] + figure["ties"] / (2 * figure["items"]),
                                                          abs=1e-9), task


def test_batched_scoring_and_decoding_give_what_one_at_a_time_gives(scored):
    from simone.inference.text_bpb import load_scorer

    root, _ = scored
    scorer = load_scorer(str(root / "run"), "cpu")
    texts = ["The law is good.", "Light", "And the people of the land were glad and wise and strong " * 6,
             "A much longer text that needs more than one window " * 40]
    ids = [scorer.document_ids(t) for t in texts]
    assert len(ids[3]) > scorer.context + 1 and len(ids[1]) < len(ids[0])  # one window and several
    for many, one in zip(scorer.nll_bits_many(ids), (scorer.nll_bits(i) for i in ids)):
        assert many == pytest.approx(one, rel=1e-5)
    assert scorer.greedy_many(ids, 6) == [scorer.greedy(i, 6) for i in ids]
