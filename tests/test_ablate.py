"""`simone ablate` on a tiny corpus writes a table with every variant."""

from __future__ import annotations

import json
import math

from simone.workflows.ablate import VARIANTS
from simone.cli import main


def test_ablate_writes_a_table_with_every_variant(tiny_corpus, tmp_path, capsys):
    out = tmp_path / "ablation"
    rc = main(["ablate", "--data", str(tiny_corpus), "--preset", "tiny", "--out", str(out), "--max-steps", "2",
               "--samples-per-domain", "1", "--sample-tokens", "8", "--set", "train.eval_batches=1", "--set", "train.log_every=1"])
    assert rc == 0
    result = json.loads((out / "ablation.json").read_text())
    rows = {r["variant"]: r for r in result["variants"]}
    assert list(rows) == list(VARIANTS)
    for name, r in rows.items():
        assert r["steps"] == 2 and r["tokens_seen"] == 2 * result["tokens_per_step"]  # the same budget
        assert math.isfinite(r["val_bpb"]) and set(r["per_domain_bpb"]) == {"history", "poetry", "scripture"}
        assert 0.0 <= r["steering_accuracy"] <= 1.0 and r["params"] > 0 and r["tokens_per_s"] > 0
        stream = r["streaming"]
        if name == "gpt2":
            assert stream is None  # no RoPE: no streaming
        else:
            assert stream["contexts"] > 1 and stream["max_slots"] <= 64 and math.isfinite(stream["stream_ppl"])
    assert rows["full"]["steering_accuracy_guided"] is not None
    assert rows["no-policy"]["steering_accuracy_guided"] is None
    assert 0.0 <= rows["full"]["policy_accuracy"] <= 1.0 and rows["llama"]["policy_accuracy"] is None
    assert rows["no-memory"]["params"] < rows["full"]["params"]
    assert rows["no-policy"]["params"] < rows["full"]["params"]
    assert rows["llama"]["governance"]["governance"] is False
    # the uncurated variant trained on its own data, evaluated on the clean validation set
    assert (out / "runs" / "uncurated" / "clean_val" / "val.bin").exists()
    assert not (out / "runs" / "uncurated" / "data").is_symlink()
    table = (out / "ablation.md").read_text()
    for name in VARIANTS:
        assert f"| {name} |" in table
    assert (out / "ablation.svg").read_text().startswith("<svg")


def test_ablate_refuses_an_unknown_variant(tiny_corpus, tmp_path, capsys):
    rc = main(["ablate", "--data", str(tiny_corpus), "--preset", "tiny", "--out", str(tmp_path / "a"),
               "--variants", "llama,mamba", "--max-steps", "1"])
    assert rc == 2 and "mamba" in capsys.readouterr().err
