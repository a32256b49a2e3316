"""Run directories are never mixed: an earlier run's checkpoints are only continued (--resume)
or moved aside (--force), and one process at a time writes a run, its lock taken first."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from simone.cli import main
from simone.inference.load import load_model
from simone.train.trainer import train
from test_faults import hold_lock
from train_support import new_run, subprocess_env


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest()
                                       if p.is_file() else "")
            for p in sorted(root.rglob("*"))}


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


@pytest.fixture
def trained_run(template, tmp_path):
    cfg, run = new_run(template, tmp_path / "run", max_steps=2, eval_every=100, checkpoint_every=1)
    train(cfg, run)
    return run


def test_an_earlier_runs_checkpoints_are_refused_without_resume_or_force(trained_run, tiny_corpus, capsys):
    run = trained_run
    before = snapshot(run.root)
    assert main(["train", "--run-dir", str(run.root), "--max-steps", "1"]) == 2
    err = one_line_error(capsys)
    assert str(run.root) in err and "--resume latest" in err and "--force" in err
    assert main(["run", "--data", str(tiny_corpus), "--preset", "tiny", "--run-dir", str(run.root)]) == 2
    assert "holds checkpoints of an earlier run" in one_line_error(capsys)
    assert snapshot(run.root) == before  # nothing written: not config.json, not status.json


def test_force_moves_the_earlier_run_aside_and_it_stays_usable(trained_run, capsys):
    run = trained_run
    old_steps = {p.name: (p / "model.safetensors").read_bytes() for p in run.checkpoints.glob("step_*")}
    assert main(["train", "--run-dir", str(run.root), "--max-steps", "1", "--force"]) == 0
    assert "moved to" in capsys.readouterr().out
    [aside] = run.root.glob("replaced-*")
    assert {p.name: (p / "model.safetensors").read_bytes()
            for p in (aside / "checkpoints").glob("step_*")} == old_steps
    assert (aside / "tokenizer" / "tokenizer.json").exists() and (aside / "metrics.jsonl").exists()
    assert [p.name for p in run.checkpoints.glob("step_*")] == ["step_000001"]
    steps = [json.loads(line)["step"] for line in run.metrics.read_text().splitlines()
             if json.loads(line).get("kind") == "train"]
    assert steps == [1]  # the new run's metrics only
    with load_model(aside, device="cpu") as loaded:  # the old run still loads, with its tokenizer
        assert loaded.weights.parent.parent == aside / "checkpoints"


def test_every_writing_verb_waits_for_the_lock_before_writing(template, tmp_path, capsys):
    cfg, run = new_run(template, tmp_path / "run")
    before = snapshot(run.root)
    holder = hold_lock(run.root)
    try:
        for verb in ("curate", "tokenizer", "prepare", "train", "run"):
            args = [verb, "--run-dir", str(run.root), "--set", "train.seed=99"]
            assert main(args) == 2, verb
            assert f"in use by pid {holder.pid}" in one_line_error(capsys), verb
    finally:
        holder.kill()
        holder.wait()
    after = snapshot(run.root)
    after.pop(".lock")  # the holder's, left by its kill
    assert after == before


def test_two_trainings_started_together_one_wins_and_the_loser_writes_nothing(template, tmp_path):
    cfg, run = new_run(template, tmp_path / "run")
    env = subprocess_env(SIMONE_FAULT_STEP_DELAY="1.0")  # the winner holds the run for a few seconds
    procs = {seed: subprocess.Popen([sys.executable, "-m", "simone", "train", "--run-dir", str(run.root),
                                     "--max-steps", "2", "--set", f"train.seed={seed}",
                                     "--set", "train.eval_every=100"],
                                    env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for seed in (101, 202)}
    results = {seed: (p.wait(timeout=120), p.stderr.read()) for seed, p in procs.items()}
    winners = [seed for seed, (rc, _) in results.items() if rc == 0]
    losers = [seed for seed, (rc, _) in results.items() if rc != 0]
    assert len(winners) == 1 and len(losers) == 1, results
    rc, err = results[losers[0]]
    assert rc == 2 and f"in use by pid {procs[winners[0]].pid}" in err, err
    assert json.loads(run.config.read_text())["train"]["seed"] == winners[0]  # the loser wrote nothing


def test_resuming_with_another_tokenizer_is_refused_naming_both(trained_run, capsys):
    run = trained_run
    with run.tokenizer.open("a") as f:
        f.write(" ")  # retrained or replaced since the checkpoints were written
    assert main(["train", "--run-dir", str(run.root), "--resume", "latest"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the trainer's own [failed] event
    assert err.startswith("error: ")
    assert "MANIFEST.json: trained with tokenizer sha256" in err and f"{run.tokenizer} has sha256" in err
