"""Continued pretraining through the command line: `simone run --init-from PARENT --data NEW` starts
from a parent made in the same test (a package, or a run directory), keeps its tokenizer, records
its lineage everywhere and shows what it forgot; a config changing the parent's model is refused."""

import dataclasses
import hashlib
import json
import math
import random
import tarfile

import pytest
import torch
from conftest import make_corpus

from simone.checkpoint import resolve_checkpoint
from simone.cli import main
from simone.config import load_config, preset
from simone.inference.load import load_model
from simone.rundir import RunDir
from simone.train.distributed import dist_env_from_environ
from simone.train.state import start_or_resume
from simone.train.trainer import Trainer
from simone.workflows.continued import prepare_init_from, read_parent

pytestmark = pytest.mark.slow

SCIENCE = "the of and to in a is atom energy cell matter force wave field light mass orbit charge".split()


def science_corpus(root):
    """New data: a domain the parent never saw (the same prose shape, other words)."""
    rng = random.Random(7)
    for sub in ("a", "b"):
        folder = root / "science" / f"science_{sub}"
        folder.mkdir(parents=True)
        for i in range(4):
            sentences = [" ".join(rng.choice(SCIENCE) for _ in range(8)).capitalize() + "." for _ in range(60)]
            body = "\n".join(" ".join(sentences[j : j + 5]) for j in range(0, 60, 5))
            (folder / f"science-{sub}-{i}.txt").write_text(f"Notes on Science {sub.upper()}{i}\n\n{body}\n")
    return root


def run(args, capsys):
    rc = main(args)
    out = capsys.readouterr()
    assert rc == 0, out.out + out.err
    return out.out


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def package_member(pkg, name):
    with tarfile.open(pkg) as tar:
        return tar.extractfile(next(m for m in tar if m.name.endswith("/" + name))).read()


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    """A tiny model trained and packaged once for this file: (its run dir, its package)."""
    root = tmp_path_factory.mktemp("parent")
    corpus = make_corpus(root / "corpus")
    rc = main(["run", "--data", str(corpus), "--preset", "tiny", "--run-dir", str(root / "run"),
               "--max-steps", "40", "--package-dir", str(root / "pkgs")])
    assert rc == 0
    return root / "run", next((root / "pkgs").glob("*.tar.gz"))


def test_a_run_continued_from_a_package_starts_from_its_weights_and_records_its_lineage(parent, tmp_path, capsys):
    parent_run, pkg = parent
    child, pkgs = tmp_path / "child", tmp_path / "pkgs"
    out = run(["run", "--init-from", str(pkg), "--data", str(science_corpus(tmp_path / "new")),
               "--run-dir", str(child), "--package-dir", str(pkgs), "--max-steps", "20"], capsys)
    name, digest = pkg.name.removesuffix(".tar.gz"), sha256(pkg)
    # the plan says where the run starts from and its learning rate: 0.3 x the parent's
    parent_cfg, cfg = load_config(parent_run / "config.json"), load_config(child / "config.json")
    assert f"continued from {name} (sha256 {digest[:12]}" in out and "0.3 x the parent's" in out
    assert cfg.train.lr == pytest.approx(0.3 * parent_cfg.train.lr)
    assert cfg.train.init_from == str(pkg.resolve()) and cfg.model == parent_cfg.model

    # the parent's tokenizer, byte for byte (no tokenizer trained on the new data)
    assert (child / "tokenizer" / "tokenizer.json").read_bytes() == package_member(pkg, "tokenizer.json")
    assert (child / "tokenizer" / "tokenizer.json").read_bytes() == (parent_run / "tokenizer" / "tokenizer.json").read_bytes()

    # lineage: config.json, report.json, the training summary and the model card
    assert {k: cfg.train.parent[k] for k in ("name", "sha256", "of")} == {"name": name, "sha256": digest, "of": "package"}
    report = json.loads((child / "validation" / "report.json").read_text())
    assert report["ok"], report["failed"]
    assert report["continued_from"] == {"name": name, "sha256": digest, "of": "package"}
    child_pkg = next(pkgs.glob("*.tar.gz"))
    summary = json.loads(package_member(child_pkg, "training_summary.json"))
    assert summary["parent"] == {"name": name, "sha256": digest}
    assert json.loads((pkgs / (child_pkg.name.removesuffix(".tar.gz") + ".training_summary.json")).read_text())["parent"] == summary["parent"]
    card = package_member(child_pkg, "README.md").decode()
    assert f"continued from `{name}` (sha256 `{digest[:16]}" in card and "## Forgetting" in card

    # forgetting: bpb of the parent before and of the child after, on the new data and on the
    # parent's validation text (which its package carries); the new data is learned
    forgetting = report["forgetting"]
    assert forgetting == summary["forgetting"]
    for text in ("new_data", "parent_data"):
        assert all(math.isfinite(forgetting[text][when]) for when in ("before", "after")), forgetting
    assert forgetting["new_data"]["after"] < forgetting["new_data"]["before"]
    assert "## Continued from" in (child / "validation" / "report.md").read_text()
    assert f"continued from {name}: bits per byte before" in out

    # the first step starts from the parent's weights (a fresh optimizer: no state yet)
    trainer = Trainer(cfg, RunDir(child), dist_env_from_environ())
    try:
        start_or_resume(trainer.state, trainer, None)
        with load_model(pkg) as loaded:
            expected = loaded.model.state_dict()
        for key, value in trainer.state.model.state_dict().items():
            assert torch.equal(value, expected[key]), key
        assert not trainer.state.optimizer.state_dict()["state"]
    finally:
        trainer.close()
    events = [json.loads(line) for line in (child / "metrics.jsonl").read_text().splitlines()]
    assert any(e.get("event") == "init_from" and e.get("sha256") == digest for e in events)

    # the continued package generates and exports like any other
    text = run(["generate", "--model", str(child_pkg), "--prompt", "The ", "--max-tokens", "8", "--no-stream"], capsys)
    assert text.startswith("The ")
    run(["export", "--model", str(child_pkg), "--format", "hf", "--out", str(tmp_path / "hf")], capsys)
    assert (tmp_path / "hf" / "config.json").is_file() and (tmp_path / "hf" / "model.safetensors").is_file()


def test_a_config_that_changes_the_parents_model_is_refused_before_any_work(parent, tmp_path, capsys):
    _, pkg = parent
    new = science_corpus(tmp_path / "new")
    for extra in (["--set", "model.dim=96"], ["--set", "tokenizer.vocab_size=600"], ["--preset", "cpu"]):
        run_dir = tmp_path / "refused"
        assert main(["run", "--init-from", str(pkg), "--data", str(new), "--run-dir", str(run_dir), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "Traceback" not in err, err
        assert extra[1].split("=")[0] in err, err
        assert not run_dir.exists()  # nothing curated, nothing written


def test_a_governance_run_dir_continues_on_domains_its_policy_head_never_saw(tmp_path, capsys):
    corpus, new = make_corpus(tmp_path / "corpus"), science_corpus(tmp_path / "new")
    run(["run", "--data", str(corpus), "--preset", "tiny", "--set", "model.governance=true", "--run-dir",
         str(tmp_path / "gov"), "--max-steps", "20", "--package-dir", str(tmp_path / "pkgs")], capsys)
    run(["run", "--init-from", str(tmp_path / "gov"), "--data", str(new), "--run-dir", str(tmp_path / "child"),
         "--max-steps", "10", "--package-dir", str(tmp_path / "pkgs")], capsys)
    cfg = load_config(tmp_path / "child" / "config.json")
    assert cfg.model.governance and cfg.train.parent["of"] == "weights"
    weights = resolve_checkpoint(tmp_path / "gov", ("best", "latest")) / "model.safetensors"  # what loads
    assert cfg.train.parent["sha256"] == sha256(weights)
    report = json.loads((tmp_path / "child" / "validation" / "report.json").read_text())
    assert report["ok"] and report["continued_from"]["name"] == f"gov/{weights.parent.name}"
    # the parent run's own validation split is its validation text
    assert math.isfinite(report["forgetting"]["parent_data"]["after"])


def test_a_parent_without_validation_text_gives_its_recorded_bpb_and_says_so(parent, tmp_path):
    _, pkg = parent
    found = read_parent(pkg)
    assert found.validation and found.recorded_bpb is not None  # packages carry their validation text now
    older = dataclasses.replace(found, validation=None)  # as a package made before they did
    cfg = preset("tiny")  # the preset's vocabulary target (512) fits the parent's settled 516 ids
    run_dir = RunDir(tmp_path / "run")
    prepare_init_from(cfg, older, run_dir)
    assert cfg.model.vocab_size == found.config.model.vocab_size and cfg.train.parent == found.record
    parent_data = json.loads((run_dir.validation / "forgetting.json").read_text())["parent_data"]
    assert parent_data["before"] == found.recorded_bpb and parent_data["after"] is None
    assert "no validation text" in parent_data["note"]


def test_a_package_of_a_private_corpus_can_leave_its_validation_text_out(parent, tmp_path, capsys):
    run_dir, pkg = parent
    assert package_member(pkg, "validation.jsonl")  # by default a package carries some held-out text
    private = RunDir(tmp_path / "private")
    private.root.mkdir()
    for part in ("checkpoints", "data", "tokenizer"):
        (private.root / part).symlink_to(run_dir / part)
    cfg = load_config(RunDir(run_dir).config)
    cfg.data.package_validation_text = False
    private.config.write_text(cfg.to_json())
    run(["package", "--run-dir", str(private.root), "--out", str(tmp_path / "pkgs")], capsys)
    (quiet,) = (tmp_path / "pkgs").glob("*.tar.gz")
    with tarfile.open(quiet) as tar:
        assert not [m.name for m in tar if m.name.endswith("validation.jsonl")]
    assert read_parent(quiet).validation is None  # a run continued from it says it has none
