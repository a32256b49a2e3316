"""`simone run --models llama,gpt2` (issue 12, part 5): both architectures on one data
preparation and the same budget, each validated and packaged, one side-by-side table; every
package gets its training summary beside the tarball as well as inside it."""

from __future__ import annotations

import json
import tarfile

from simone.cli import main


def test_models_llama_and_gpt2_share_the_data_and_write_one_table(tiny_corpus, tmp_path, capsys):
    run_dir, pkgs = tmp_path / "cmp", tmp_path / "pkgs"
    rc = main(["run", "--preset", "tiny", "--models", "llama,gpt2", "--data", str(tiny_corpus),
               "--run-dir", str(run_dir), "--package-dir", str(pkgs), "--max-steps", "3",
               "--set", "train.eval_every=3", "--set", "train.eval_batches=2"])
    out = capsys.readouterr().out
    assert rc == 0, out

    # prepared once: each model's run dir links to the shared tokenizer and shards
    for name in ("llama", "gpt2"):
        sub = run_dir / "runs" / name
        assert (sub / "data").resolve() == (run_dir / "data").resolve()
        assert (sub / "tokenizer").resolve() == (run_dir / "tokenizer").resolve()
        cfg = json.loads((sub / "config.json").read_text())
        assert cfg["model"]["arch"] == name and cfg["train"]["max_steps"] == 3
        assert json.loads((sub / "validation" / "report.json").read_text())["ok"]

    comparison = json.loads((run_dir / "comparison.json").read_text())
    rows = {r["model"]: r for r in comparison["models"]}
    assert set(rows) == {"llama", "gpt2"}
    for r in rows.values():
        assert r["val_bpb"] > 0 and r["params"] > 0 and r["tokens_per_s"] > 0 and r["steps"] == 3
    assert rows["llama"]["params"] != rows["gpt2"]["params"]
    table = (run_dir / "comparison.md").read_text()
    assert "| model | val bpb | parameters | tokens/s |" in table and table in out  # printed too
    assert f"| llama | {rows['llama']['val_bpb']:.4f} | {rows['llama']['params']:,} |" in table

    # models_for_download: NAME.tar.gz and NAME.training_summary.json, the same summary inside
    for name in ("llama", "gpt2"):
        stem = f"simone-tiny-{name}-cmp"
        beside = json.loads((pkgs / f"{stem}.training_summary.json").read_text())
        with tarfile.open(pkgs / f"{stem}.tar.gz") as tar:
            inside = json.load(tar.extractfile(f"{stem}/training_summary.json"))
        assert beside == inside and beside["config"]["model"]["arch"] == name
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"


def test_unknown_model_is_one_line(tmp_path, capsys):
    assert main(["run", "--preset", "tiny", "--models", "llama,bert", "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "unknown model(s) bert" in err and "llama, gpt2" in err and not (tmp_path / "r").exists()
