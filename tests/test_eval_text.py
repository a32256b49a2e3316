"""`simone eval`: tokenizer-independent bits per byte on any folder of text, for simone runs,
packages and Hugging Face folders, overall and per domain."""

from __future__ import annotations

import json
import math
import os
import tarfile

import pytest
import torch

from conftest import make_corpus
from simone.cli import main
from simone.inference.text_bpb import TorchScorer, evaluate_models, read_text_folder, sliding_windows
from simone.inference.package import package_run
from simone.rundir import RunDir
from test_hf_export import _save_model_run


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    root = make_corpus(tmp_path_factory.mktemp("eval") / "text", docs_per_subdomain=1, words_per_doc=100)
    (root / "poetry" / "poetry_a" / "unicode.txt").write_text("Ωμέγα — café 🙂\r\n\ttabs  and  runs <|endoftext|> as text\n",
                                                               encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def package(template, tmp_path_factory):
    """A packaged tiny Llama-style model and its unpacked hf/ folder."""
    root = tmp_path_factory.mktemp("eval_pkg")
    run = _save_model_run(template, root / "run", n_kv_heads=2)
    pkg = package_run(RunDir(run), root / "pkgs")
    with tarfile.open(pkg) as tar:
        tar.extractall(root / "unpacked", filter="data")
    return run, pkg, next((root / "unpacked").iterdir()) / "hf"


def test_sliding_windows_score_every_token_once_within_the_context():
    for n, context in [(2, 8), (8, 8), (9, 8), (10, 8), (100, 8), (1000, 64), (65, 64), (66, 64)]:
        scored = []
        for start, end, n_scored in sliding_windows(n, context):
            assert 0 < end - 1 - start <= context  # the model reads ids[start:end-1]
            targets = list(range(end - n_scored, end))
            assert targets[0] - start >= min(targets[0], context - context // 2)  # context before
            scored += targets
        assert scored == list(range(1, n)), (n, context)


def test_bits_are_the_negative_log_likelihood_of_every_token(text_dir):
    """A uniform model over V ids costs log2(V) bits for each token of each document."""
    vocab = 7
    scorer = TorchScorer("uniform", "test", lambda x: torch.zeros(*x.shape, vocab), lambda t: [1] * len(t),
                         start_id=0, context=16, device=torch.device("cpu"), vocab_size=vocab,
                         batch_size=3)
    files = read_text_folder(text_dir)
    for f in files[:3]:
        assert scorer.nll_bits(scorer.document_ids(f.text)) == pytest.approx(len(f.text) * math.log2(vocab))


def test_package_and_its_hf_folder_give_the_same_bpb_in_one_table(package, text_dir, tmp_path, capsys):
    run, pkg, hf_dir = package
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(pkg), "--model", f"hf:{hf_dir}", "--model", str(run),
                 "--data", str(text_dir), "--json", str(out), "--device", "cpu"]) == 0
    table = capsys.readouterr().out
    result = json.loads(out.read_text())
    ours, theirs, run_dir = result["models"]
    assert [m["kind"] for m in result["models"]] == ["simone", "hf", "simone"]
    assert set(result["domains"]) == {"history", "poetry", "scripture"}
    total_bytes = sum(len(p.read_bytes()) for p in text_dir.rglob("*.txt"))
    assert ours["bytes"] == theirs["bytes"] == total_bytes
    assert 1.0 < ours["bpb"] < 20.0 and ours["tokens"] > 3 * 64  # texts longer than the context
    assert abs(ours["bpb"] - theirs["bpb"]) < 1e-4 and abs(ours["bpb"] - run_dir["bpb"]) < 1e-9
    for domain in result["domains"]:
        assert abs(ours["per_domain"][domain]["bpb"] - theirs["per_domain"][domain]["bpb"]) < 1e-4
    assert ours["bpb"] == pytest.approx(ours["bits"] / ours["bytes"])
    rows = {line.split()[0]: line.split() for line in table.splitlines()[2:]}
    assert set(rows) == {"history", "poetry", "scripture", "overall"}
    assert float(rows["poetry"][2]) == pytest.approx(ours["per_domain"]["poetry"]["bpb"], abs=1e-4)
    assert float(rows["overall"][3]) == pytest.approx(theirs["bpb"], abs=1e-4)


def test_a_flat_folder_is_one_domain(package, tmp_path):
    flat = tmp_path / "mybooks"
    flat.mkdir()
    (flat / "a.txt").write_text("The lord god of heaven and earth.\n")
    (flat / "b.txt").write_text("Love and sorrow, summer and winter.\n")
    result = evaluate_models([str(package[1])], flat, device="cpu")
    assert list(result["domains"]) == ["mybooks"] and result["domains"]["mybooks"]["files"] == 2
    assert result["models"][0]["per_domain"]["mybooks"]["bpb"] == result["models"][0]["bpb"]


@pytest.mark.parametrize("model,words", [
    ("{tmp}/no-such-run", ["no-such-run", "no such file"]),
    ("hf:{tmp}", ["not a Hugging Face model folder"]),
    ("{tmp}/model.gguf", ["model.gguf", "llama-cpp-python"]),
])
def test_a_bad_model_is_one_clear_line(model, words, text_dir, tmp_path, capsys):
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    assert main(["eval", "--model", model.format(tmp=tmp_path), "--data", str(text_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: ")
    for word in words:
        assert word in err


def test_bad_text_is_one_clear_line(package, tmp_path, capsys):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "bad.txt").write_bytes(b"ok \xff\xfe")
    assert main(["eval", "--model", str(package[1]), "--data", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert "bad.txt: not UTF-8 at byte 3" in err and "\n" not in err


def test_run_with_eval_data_stores_the_package_bpb(text_dir, tmp_path, capsys):
    corpus = make_corpus(tmp_path / "corpus", docs_per_subdomain=2, words_per_doc=200)
    run_dir = tmp_path / "run"
    main(["run", "--data", str(corpus), "--preset", "tiny", "--run-dir", str(run_dir), "--max-steps", "2",
          "--package-dir", str(tmp_path / "pkgs"), "--set", "curate.workers=1", "--eval-data", str(text_dir)])
    out = capsys.readouterr().out
    result = json.loads((run_dir / "validation" / "eval.json").read_text())
    (model,) = result["models"]
    assert model["model"].endswith(".tar.gz") and set(model["per_domain"]) == set(result["domains"])
    assert "bits per byte on" in out and model["bpb"] > 0


def test_run_with_a_missing_eval_folder_fails_before_training(tmp_path, capsys):
    rc = main(["run", "--preset", "tiny", "--run-dir", str(tmp_path / "run"), "--eval-data", str(tmp_path / "no")])
    assert rc == 2
    assert "no such folder" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.timeout(60)  # the FIFO must be skipped, never opened
def test_skipped_files_are_listed_under_the_table_and_in_the_json(package, tmp_path, capsys):
    data = tmp_path / "books"
    data.mkdir()
    (data / "a.txt").write_text("The lord god of heaven and earth.\n")
    os.mkfifo(data / "pipe.txt")
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(package[1]), "--data", str(data), "--json", str(out), "--device", "cpu"]) == 0
    table = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["skipped"] == ["pipe.txt: not a regular file (a FIFO); not opened"]
    assert table.splitlines()[-1] == "skipped pipe.txt: not a regular file (a FIFO); not opened"
    assert result["domains"] == {"books": {"files": 1, "bytes": 34}}
    assert result["models"][0]["window"] == 64  # the tiny model's whole context: nothing shortened


def test_a_symlinked_json_is_refused_before_scoring(tmp_path, capsys):
    target = tmp_path / "kept.json"
    target.write_text("{}")
    (tmp_path / "link.json").symlink_to(target)
    assert main(["eval", "--model", str(tmp_path / "no-such-model"), "--data", str(tmp_path),
                 "--json", str(tmp_path / "link.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "link.json: is a symlink" in err
    assert (tmp_path / "link.json").is_symlink() and target.read_text() == "{}"
