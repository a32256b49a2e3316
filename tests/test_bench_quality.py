"""bench/bench_quality.py: the held-out documents are kept out of the training copy, and the
smoke mode trains both recipes and scores them on the same held-out text."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from conftest import make_corpus

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "bench_quality.py"


@pytest.fixture(scope="module")
def bq():
    spec = importlib.util.spec_from_file_location("bench_quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_one_document_per_domain_is_held_out_of_training(bq, tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    held = bq.choose_held_out(corpus)
    assert [p.relative_to(corpus).parts[0] for p in held] == ["history", "poetry", "scripture"]
    assert held == bq.choose_held_out(corpus)  # deterministic
    train_dir, eval_dir = bq.split_corpus(corpus, held, tmp_path / "work", eval_chars=500)
    trained = {p.relative_to(train_dir) for p in train_dir.rglob("*") if p.is_file()}
    for p in held:
        rel = p.relative_to(corpus)
        assert rel not in trained and rel.with_suffix(".json") not in trained
        scored = (eval_dir / rel).read_text()
        assert len(scored) == 500 and p.read_text().startswith(scored)
    every = {p.relative_to(corpus) for p in corpus.rglob("*") if p.is_file()}
    assert trained == every - {p.relative_to(corpus) for p in held} - \
        {p.relative_to(corpus).with_suffix(".json") for p in held}


@pytest.mark.slow
def test_smoke_mode_scores_both_recipes_on_the_same_text(bq, tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    report = bq.main(["--minutes", "0.03", "--tiny", "--corpus", str(corpus), "--work", str(tmp_path / "w"),
                      "--recipes", "ours,peer,slow", "--variant", "slow:train.lr=1e-5,train.batch_size=4"])
    ours, peer, slow = report["recipes"]["ours"], report["recipes"]["peer"], report["recipes"]["slow"]
    # a --variant is ours with its overrides, scored on the same text
    assert "batch 4x1, lr 1e-05" in slow["shape"] and "batch 8x1, lr 0.003" in ours["shape"]
    assert slow["eval_bytes"] == ours["eval_bytes"] and slow["ratio_vs_peer"] == pytest.approx(slow["bpb"] / peer["bpb"])
    assert ours["eval_bytes"] == peer["eval_bytes"] > 0  # the same held-out text
    assert 0.5 < ours["bpb"] < 8 and 0.5 < peer["bpb"] < 8
    assert report["ratio"] == pytest.approx(ours["bpb"] / peer["bpb"])
    assert ours["steps"] > 0 and peer["steps"] > 0 and report["cpu_model"]
    saved = json.loads((tmp_path / "w" / "quality.json").read_text())
    assert saved["ratio"] == report["ratio"] and saved["held_out"] == report["held_out"]


def test_variants_parse_and_bad_ones_say_what_is_wrong(bq):
    assert bq.parse_variants(["muon:train.optimizer=muon", "b8:train.batch_size=8, train.lr=1e-3"]) == {
        "muon": ["train.optimizer=muon"], "b8": ["train.batch_size=8", "train.lr=1e-3"]}
    for bad in ("nocolon", "x:", "x:train.lr", "ours:train.lr=1"):
        with pytest.raises(SystemExit, match="--variant"):
            bq.parse_variants([bad])


def test_every_built_in_variant_builds_and_trains_two_steps(bq, template, tmp_path):
    """Each lever of nanochat's recipe, and all of them as `nanochat`, through the real trainer."""
    from simone.config import apply_overrides
    from simone.train.trainer import train
    from train_support import losses_by_step, new_run

    assert {"relu2", "qk-norm", "value-embed", "zero-init", "softcap", "untied-head", "muon-shape", "warmdown",
            "doc-aligned"} <= set(bq.BUILT_IN_VARIANTS)
    assert set(bq.BUILT_IN_VARIANTS["nanochat"]) == {o for v in bq.LEVERS.values() for o in v}
    for name, overrides in bq.BUILT_IN_VARIANTS.items():
        cfg, run = new_run(template, tmp_path / name, max_steps=2, eval_every=0, checkpoint_every=0, log_every=1)
        result = train(apply_overrides(cfg, overrides), run)
        losses = losses_by_step(run)
        assert result.steps == 2 and sorted(losses) == [1, 2] and all(0 < v < 10 for v in losses.values()), name


def test_overrides_of_prints_a_variant_and_a_length_is_required(bq, capsys):
    assert bq.main(["--overrides-of", "nanochat"]) == {}
    assert capsys.readouterr().out.split() == bq.BUILT_IN_VARIANTS["nanochat"]
    with pytest.raises(SystemExit):
        bq.main(["--recipes", "ours"])  # neither --minutes nor --screen
    with pytest.raises(SystemExit):
        bq.main(["--minutes", "1", "--screen", "5"])


def test_screen_mode_trains_every_recipe_for_the_same_steps(bq, tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    report = bq.main(["--screen", "3", "--tiny", "--corpus", str(corpus), "--work", str(tmp_path / "w"),
                      "--recipes", "ours,peer,nanochat"])
    assert report["screen_steps"] == 3 and report["minutes"] is None
    assert {n: r["steps"] for n, r in report["recipes"].items()} == {"ours": 3, "peer": 3, "nanochat": 3}
    assert "muon" in report["recipes"]["nanochat"]["shape"] and report["recipes"]["nanochat"]["ratio_vs_peer"] > 0
