"""The seed's documented command works as written (issue 12, part 4): legacy flags start from
the original recipe (h200) on whatever device there is, the resolved plan is printed before
training, `--resume_from best_model` resumes, `--validation_dir` takes a pre-split folder, and
a CUDA preset on a machine without CUDA is one line before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from simone.cli import build_config, build_parser, main
from simone.config import preset

LEGACY = ["--vocab_size", "32000", "--hidden_dim", "768", "--num_layers", "12", "--batch_size", "12",
          "--gradient_accumulation_steps", "4", "--learning_rate", "3e-4", "--num_epochs", "7",
          "--patience", "2", "--min_epochs", "6"]


def _config(argv: list[str]):
    return build_config(build_parser().parse_args(argv))


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_legacy_flags_start_from_the_original_recipe():
    cfg = _config(["run", "--data_dir", "D", "--output_dir", "O", *LEGACY])
    h200 = preset("h200")
    assert cfg.preset == "h200"
    assert (cfg.model.n_heads, cfg.model.max_seq_len, cfg.train.max_minutes) == (12, 1024, None)
    assert cfg.model.governance and cfg.to_dict()["train"] == h200.to_dict()["train"] | {"lr": 3e-4}
    # an explicit preset still wins; no legacy flag keeps the small default
    assert _config(["run", "--preset", "cpu", *LEGACY]).model.max_seq_len == preset("cpu").model.max_seq_len == 128
    assert _config(["run", "--data_dir", "D"]).preset == "cpu"


def test_h200_is_the_governance_model_and_can_be_switched_off():
    for name in ("h100", "h200"):
        assert preset(name).model.governance
    assert not _config(["config", "--preset", "h200", "--set", "model.governance=false"]).model.governance


def test_bench_compares_the_plain_shape_of_a_governance_preset():
    from simone.workflows.bench import model_pair

    model_cfg = preset("tiny").model
    model_cfg.governance = True  # as h200's: the transformers peer has no governance parts
    ours, hf = model_pair(model_cfg, torch.device("cpu"))
    assert ours.policy_head is None and ours.num_params() == sum(p.numel() for p in hf.parameters())


def test_cuda_preset_without_cuda_is_one_line_before_any_work(no_cuda, tiny_corpus, tmp_path, capsys):
    run_dir = tmp_path / "run"
    for verb in ("run", "train"):
        rc = main([verb, "--preset", "h200", "--data", str(tiny_corpus), "--run-dir", str(run_dir)])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1, err
        assert "preset h200 wants CUDA" in err and "--set train.device=cpu" in err and "expected time ~" in err
        assert not run_dir.exists()  # nothing curated, nothing written


def test_legacy_command_falls_back_to_cpu_prints_the_plan_and_resumes_best_model(no_cuda, tiny_corpus,
                                                                                tmp_path, capsys, monkeypatch):
    import simone.workflows.pipeline as pipeline

    printed_before_training = []
    real_stage_train = pipeline.stage_train

    def stage_train_spy(*args, **kwargs):
        printed_before_training.append(capsys.readouterr().out)
        return real_stage_train(*args, **kwargs)

    monkeypatch.setattr(pipeline, "stage_train", stage_train_spy)
    run_dir, pkgs = tmp_path / "O", tmp_path / "pkgs"
    tiny = ["--vocab_size", "512", "--hidden_dim", "32", "--num_layers", "1", "--batch_size", "4",
            "--gradient_accumulation_steps", "1", "--learning_rate", "3e-3", "--num_epochs", "2",
            "--patience", "2", "--min_epochs", "1", "--set", "model.n_heads=4", "--set", "model.max_seq_len=64",
            "--set", "train.compile=false", "--set", "train.eval_every=2", "--set", "train.checkpoint_every=2",
            "--package-dir", str(pkgs)]
    rc = main(["run", "--data_dir", str(tiny_corpus), "--output_dir", str(run_dir), *tiny, "--max-steps", "4"])
    assert rc == 0, capsys.readouterr().out
    out = printed_before_training[0]
    assert "starting from the original recipe, preset h200" in out
    assert "wants CUDA, none found: training on the CPU" in out and "expected time ~" in out
    plan = out[out.rindex("[simone] model: Llama-style + governance"):]  # the plan after tokenizing
    for figure in ("parameters (dim 32, 1 layers, 4 heads)", "context 64 tokens", "batch 4 x 1 accumulation",
                   "time cap none", "expected time ~"):
        assert figure in plan, figure
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["preset"] == "h200" and cfg["train"]["device"] == "cpu" and cfg["model"]["governance"]

    from simone.checkpoint import read_pointer

    best = read_pointer(run_dir / "checkpoints", "best")
    rc = main(["run", "--output_dir", str(run_dir), "--resume_from", "best_model", "--max-steps", "6",
               "--package-dir", str(pkgs)])
    assert rc == 0, capsys.readouterr().out
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    resumed = [e for e in events if e.get("event") == "resume"]
    assert resumed and Path(resumed[-1]["path"]).name == best


def test_validation_dir_is_the_validation_split(tiny_corpus, tmp_path):
    from conftest import make_corpus

    val_dir = make_corpus(tmp_path / "val", docs_per_subdomain=1, seed=7)
    run_dir = tmp_path / "run"
    assert main(["curate", "--data_dir", str(tiny_corpus), "--validation_dir", str(val_dir),
                 "--run-dir", str(run_dir)]) == 0
    docs = [json.loads(line) for line in (run_dir / "data" / "documents.jsonl").read_text().splitlines()]
    val = {d["path"] for d in docs if d["split"] == "val"}
    train = {d["path"] for d in docs if d["split"] == "train"}
    assert len(val) == 6 and all(p.startswith("validation_dir:") for p in val)
    assert len(train) == 18 and not any(p.startswith("validation_dir:") for p in train)
    assert {d["domain"] for d in docs if d["split"] == "val"} == {"scripture", "poetry", "history"}
