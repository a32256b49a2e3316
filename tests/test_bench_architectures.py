"""bench/bench_architectures.py: both runs share the prepared data, and the numbers it
reports come from the runs' own metrics."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "bench_architectures.py"


@pytest.fixture(scope="module")
def arch():
    spec = importlib.util.spec_from_file_location("bench_architectures", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_run_dirs_link_the_prepared_data(arch, tmp_path: Path):
    prepared = tmp_path / "prepared"
    for name in ("data", "tokenizer"):
        (prepared / name).mkdir(parents=True)
    (prepared / "data" / "index.json").write_text("{}")
    run = tmp_path / "llama"
    (run / "checkpoints").mkdir(parents=True)  # a leftover from an earlier run goes away
    arch.make_run_dir(prepared, run)
    assert (run / "data").is_symlink() and (run / "data" / "index.json").read_text() == "{}"
    assert (run / "tokenizer").resolve() == (prepared / "tokenizer").resolve()
    assert not (run / "checkpoints").exists()


def test_read_metrics_skips_the_first_interval(arch, tmp_path: Path):
    rows = [{"t": 0, "kind": "event", "event": "start", "step": 0},
            {"t": 1, "kind": "train", "step": 10, "loss": 7.0, "tokens_per_s": 100.0, "mfu": 0.01,
             "tokens_seen": 40960},
            {"t": 2, "kind": "train", "step": 20, "loss": 6.0, "tokens_per_s": 2000.0, "mfu": 0.2,
             "tokens_seen": 81920},
            {"t": 3, "kind": "train", "step": 30, "loss": 5.5, "tokens_per_s": 2200.0, "mfu": 0.22,
             "tokens_seen": 122880},
            {"t": 4, "kind": "eval", "step": 30, "val_loss": 5.6, "val_bpb": 2.5, "per_domain": {}}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = arch.read_metrics(tmp_path)
    assert m["steps"] == 30 and m["tokens_seen"] == 122880
    assert m["tokens_per_s"] == pytest.approx(2100.0)  # median without the start-up interval
    assert m["mfu"] == pytest.approx(0.21)
    assert m["trainer_val_bpb"] == 2.5 and m["last_train_loss"] == 5.5
