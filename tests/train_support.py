"""Shared helpers for the trainer tests: a tiny prepared run directory built with the real
tokenizer and shard functions (once per test session), and subprocess helpers."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

from simone.config import Config, preset, save_config
from simone.data.shards import build_shards
from simone.rundir import RunDir
from simone.data.tokenizer import train_tokenizer

DOMAINS = {
    "scripture": "lord god heaven earth light darkness waters spirit day night land seed fruit tree".split(),
    "poetry": "love heart rose summer winter moon star sweet fair sorrow dream night song bird".split(),
    "history": "congress people state law liberty union war treaty nation president rights army".split(),
}
_PREPARED: dict[str, Path] = {}


def _documents(seed: int = 0) -> list[dict]:
    """Learnable text: each domain repeats short phrases from its own word list."""
    rng = random.Random(seed)
    docs = []
    for domain, words in DOMAINS.items():
        phrases = [" ".join(rng.choice(words) for _ in range(5)) for _ in range(12)]
        for i in range(5):
            text = ". ".join(rng.choice(phrases).capitalize() for _ in range(110)) + "."
            docs.append({"id": f"{domain}-{i}", "path": f"{domain}/x/{i}.txt", "domain": domain,
                         "subdomain": "x", "title": f"{domain} {i}", "author": "A",
                         "split": "val" if i == 4 else "train", "status": "ok", "text": text})
    return docs


def prepared_template(root: Path) -> Path:
    """A run directory with tokenizer and shards (built once per session, then reused)."""
    if "template" in _PREPARED:
        return _PREPARED["template"]
    run = RunDir(root / "template").make()
    with open(run.documents, "w", encoding="utf-8") as f:
        for d in _documents():
            f.write(json.dumps(d) + "\n")
    cfg = tiny_config()
    tok = train_tokenizer(run.documents, run.tokenizer_dir, cfg.tokenizer)
    build_shards(run.documents, tok, run.data)
    cfg.model.vocab_size = tok.vocab_size
    save_config(cfg, run.config)
    _PREPARED["template"] = run.root
    return run.root


def tiny_config(**train: object) -> Config:
    cfg = preset("tiny")
    cfg.tokenizer.vocab_size = 320
    cfg.model.vocab_size = 320
    cfg.train.max_minutes = None
    cfg.train.log_every = 1
    cfg.train.device = "cpu"
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def new_run(template: Path, dest: Path, **train: object) -> tuple[Config, RunDir]:
    """A fresh copy of the prepared run directory, with `train` overrides in its config.json."""
    shutil.copytree(template, dest)
    from simone.config import load_config

    cfg = load_config(dest / "config.json")
    for k, v in train.items():
        setattr(cfg.train, k, v)
    save_config(cfg, dest / "config.json")
    return cfg, RunDir(dest)


def straight_and_resumed(template: Path, tmp_path: Path, monkeypatch, stop_at: int, **train: object):
    """One run twice from the same template: `a` straight to the end, `b` stopped by SIGTERM at
    step `stop_at` and resumed from its latest checkpoint. Returns run_a, run_b and b's two results."""
    from simone.train.trainer import train as run_training

    cfg_a, run_a = new_run(template, tmp_path / "a", **train)
    run_training(cfg_a, run_a)
    cfg_b, run_b = new_run(template, tmp_path / "b", **train)
    monkeypatch.setenv("SIMONE_FAULT_SIGTERM_AT_STEP", str(stop_at))
    stopped = run_training(cfg_b, run_b)
    monkeypatch.delenv("SIMONE_FAULT_SIGTERM_AT_STEP")
    return run_a, run_b, stopped, run_training(cfg_b, run_b, resume="latest")


def read_metrics(run: RunDir, kind: str | None = None) -> list[dict]:
    if not run.metrics.exists():
        return []
    rows = []
    for line in run.metrics.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by kill -9
        if kind is None or row.get("kind") == kind:
            rows.append(row)
    return rows


def losses_by_step(run: RunDir) -> dict[int, float]:
    """The loss logged at each step; after a resume the later value wins."""
    return {r["step"]: r["loss"] for r in read_metrics(run, "train")}


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    for k in list(env):
        if k.startswith("SIMONE_FAULT_"):
            del env[k]
    env.update(extra)
    return env


def start_training(run: RunDir, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "simone.train", "--run-dir", str(run.root), *args]
    return subprocess.Popen(cmd, env=env or subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def run_training(run: RunDir, *args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "simone.train", "--run-dir", str(run.root), *args]
    return subprocess.run(cmd, env=env or subprocess_env(), capture_output=True, text=True, timeout=timeout)


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.02) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False
