"""Governance through the real trainer: every loss term is finite and logged in metrics.jsonl,
the policy learns the domain, and the checkpoint loads back with its governance parts."""

from __future__ import annotations

import json
import math
import random

import pytest

from simone.config import preset
from simone.data.shards import build_shards
from simone.model.governance_heads import LOSS_TERMS
from simone.rundir import RunDir
from simone.data.tokenizer import train_tokenizer
from simone.train.trainer import settle_model_sizes

WORDS = {
    "scripture": "lord god heaven earth light darkness waters spirit day night land seed".split(),
    "poetry": "love heart rose summer winter moon star sweet fair sorrow dream song".split(),
    "history": "congress people state law liberty union war treaty nation president rights".split(),
}


def prepared_run(root, **model):
    rng = random.Random(0)
    run = RunDir(root).make()
    with open(run.documents, "w", encoding="utf-8") as f:
        for domain, words in WORDS.items():
            for i in range(6):
                text = ". ".join(" ".join(rng.choice(words) for _ in range(6)) for _ in range(60))
                f.write(json.dumps({"id": f"{domain}-{i}", "domain": domain, "split": "val" if i == 0 else "train",
                                    "text": text}) + "\n")
    cfg = preset("tiny")
    cfg.tokenizer.vocab_size = 300
    tok = train_tokenizer(run.documents, run.tokenizer_dir, cfg.tokenizer)
    build_shards(run.documents, tok, run.data, control_token_prob=0.5)
    cfg.model.governance = True
    for k, v in model.items():
        setattr(cfg.model, k, v)
    settle_model_sizes(cfg, tok)  # as the pipeline does: the trainer only checks the sizes
    cfg.train.max_minutes = None
    cfg.train.device = "cpu"
    cfg.train.log_every = 1
    cfg.train.eval_batches = 1
    return cfg, run, tok


def test_each_loss_term_is_logged_and_finite(tmp_path):
    from simone.inference.generate import GovernanceOptions, sample_with_domain
    from simone.inference.load import load_model
    from simone.train.trainer import train

    cfg, run, tok = prepared_run(tmp_path / "run", policy_loss_weight=0.5, coherence_weight=0.1)
    cfg.train.max_steps = 40
    cfg.train.lr = 1e-2
    train(cfg, run)
    rows = [json.loads(line) for line in run.metrics.read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert len(train_rows) >= 30
    for r in train_rows:
        for term in LOSS_TERMS:
            assert math.isfinite(r[term]), (term, r)
        assert r["total_loss"] == pytest.approx(r["loss"], rel=1e-4)
        expected = r["lm_loss"] + 0.5 * r["policy_loss"] + 0.1 * r["coherence_loss"]
        assert r["total_loss"] == pytest.approx(expected, rel=1e-4)
    # the policy head learns the domain from the text (3 domains: chance is 1/3)
    assert train_rows[-1]["policy_acc"] > 0.6
    assert train_rows[-1]["policy_loss"] < train_rows[0]["policy_loss"]

    loaded = load_model(run.root, device="cpu")
    assert loaded.config.model.n_domains == 3 and loaded.model.policy_head is not None
    assert loaded.model.layers[0].attention.n_memory == cfg.model.n_memory_slots
    text = sample_with_domain(loaded, GovernanceOptions(domain="poetry", policy_guidance=1.0), max_tokens=8)
    assert isinstance(text, str)


def test_the_trainer_checks_the_settled_sizes_and_changes_nothing(tmp_path):
    from simone.train.trainer import ModelSizeError, train

    cfg, run, tok = prepared_run(tmp_path / "run")
    cfg.train.max_steps = 1
    cfg.model.n_domains = len(tok.domains) + 1  # not what the tokenizer has
    with pytest.raises(ModelSizeError, match="model.n_domains"):
        train(cfg, run)
    assert cfg.model.n_domains == len(tok.domains) + 1
    cfg.model.n_domains = len(tok.domains)
    cfg.model.vocab_size = tok.vocab_size - 1
    with pytest.raises(ModelSizeError, match="model.vocab_size"):
        train(cfg, run)
    assert cfg.model.vocab_size == tok.vocab_size - 1


def test_settle_model_sizes_keeps_a_larger_vocab_only_for_a_run_that_had_its_tokenizer(tmp_path):
    cfg, run, tok = prepared_run(tmp_path / "run")
    cfg.model.vocab_size, cfg.model.n_domains = tok.vocab_size + 64, 0
    settle_model_sizes(cfg, tok, keep_larger_vocab=True)
    assert cfg.model.vocab_size == tok.vocab_size + 64 and cfg.model.n_domains == len(tok.domains) == 3
    settle_model_sizes(cfg, tok)
    assert cfg.model.vocab_size == tok.vocab_size


def test_python_m_simone_train_settles_the_sizes_of_a_run_dir_that_lacks_them(tmp_path):
    import subprocess
    import sys

    from simone.config import load_config, save_config

    cfg, run, tok = prepared_run(tmp_path / "run")
    cfg.model.n_domains = 0  # as a run dir prepared before the sizes were settled has it
    cfg.train.max_steps = 1
    save_config(cfg, run.config)
    done = subprocess.run([sys.executable, "-m", "simone.train", "--run-dir", str(run.root)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert load_config(run.config).model.n_domains == 0  # config.json is left as it was (no --set)
    saved = json.loads((run.checkpoints / "step_000001" / "config.json").read_text())
    assert saved["model"]["n_domains"] == len(tok.domains)


def test_window_control_tokens_reach_the_trainers_batches(tmp_path):
    from simone.train.distributed import DistEnv
    from simone.train.trainer import Trainer

    cfg, run, tok = prepared_run(tmp_path / "run")
    cfg.data.control_window_prob = 1.0
    trainer = Trainer(cfg, run, DistEnv())
    try:
        x, _, d = trainer.loader.next_batch_with_domains()
        controls = {tok.domain_token_id(name) for name in tok.domains}
        assert set(x[:, 0].tolist()) <= controls  # every window opens with a control token ...
        for row in range(x.size(0)):  # ... of the domain its text is in
            assert tok.domains[int(d[row, 1])] == tok.id_to_token(int(x[row, 0]))[len("<|domain:"):-2]
    finally:
        trainer.close()
    # a tokenizer without control tokens cannot give them: one clear error naming it
    from simone.train.trainer import ModelSizeError, window_control_ids

    bare = RunDir(tmp_path / "bare").make()
    bare.documents.write_text(run.documents.read_text())
    train_tokenizer(bare.documents, bare.tokenizer_dir, cfg.tokenizer, domains=[])
    with pytest.raises(ModelSizeError, match="no <\\|domain:NAME\\|> tokens"):
        window_control_ids(cfg, bare)
    cfg.data.control_window_prob = 0.0
    assert window_control_ids(cfg, bare) is None
