"""simone.workflows.bench: the comparison is apples to apples, and each kind's JSON has its keys."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from simone.workflows import bench
from simone.cli import main
from simone.config import ModelConfig
from simone.train.optim import build_optimizer

TINY = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32, vocab_size=128)


def test_peer_has_our_config_and_weights():
    ours, hf = bench.model_pair(TINY, torch.device("cpu"))
    # Same parameter count (tied embedding counted once on both sides) and same shapes.
    hf_params = sum(p.numel() for p in hf.parameters())
    assert hf_params == ours.num_params()
    c = hf.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
            c.vocab_size, c.max_position_embeddings, c.tie_word_embeddings) == (32, 2, 4, 2, 128, 32, True)
    assert c.intermediate_size == ours.layers[0].feed_forward.hidden
    # Same function: logits on a batch agree, and so do the training losses.
    ours.eval()
    x = torch.randint(0, 128, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, _ = ours(x)
        hf_logits = hf(input_ids=x).logits
    torch.testing.assert_close(logits, hf_logits, atol=1e-5, rtol=1e-4)


def test_peer_optimizer_matches_ours():
    ours, hf = bench.model_pair(TINY, torch.device("cpu"))
    opt_ours = build_optimizer(ours, "adamw", 1e-3, 0.1, (0.9, 0.95), "cpu")
    opt_hf = bench.hf_optimizer(hf, 1e-3, 0.1, (0.9, 0.95), "cpu")
    decay = lambda opt: sorted(  # noqa: E731 - (weight decay, parameter count) per group
        (g["weight_decay"], sum(p.numel() for p in g["params"])) for g in opt.param_groups)
    assert decay(opt_ours) == decay(opt_hf)
    assert opt_ours.defaults["betas"] == opt_hf.defaults["betas"]
    assert opt_ours.defaults.get("fused") == opt_hf.defaults.get("fused")


def test_bench_train_json(tmp_path: Path):
    out = tmp_path / "train.json"
    r = bench.bench_train("tiny", repeats=1, warmup=0, batch=2, model_cfg=TINY,
                          dtypes=["float32"], compile=False, json_path=out, quiet=True)
    saved = json.loads(out.read_text())
    assert isinstance(saved["ratio"], float) and saved["ratio"] > 0
    assert saved["ratio"] == pytest.approx(r["ratio"])
    assert saved["kind"] == "train" and saved["headline"].startswith("ours eager vs HF eager")
    row = saved["rows"][0]
    assert row["ratio"] == pytest.approx(row["ours_tokens_per_s"] / row["peer_tokens_per_s"])
    assert saved["config"]["params"] == sum(p.numel() for p in bench.model_pair(TINY, torch.device("cpu"))[1].parameters())
    # MFU: the model's FLOPs per token times tokens/s over the measured CPU peak.
    assert row["ours_mfu"] == pytest.approx(saved["flops_per_token"] * row["ours_tokens_per_s"]
                                            / saved["peak_flops"])


def test_bench_generate_json(tmp_path: Path):
    out = tmp_path / "gen.json"
    r = bench.bench_generate("tiny", repeats=1, warmup=0, batches=(1, 3), dtypes=["float32"],
                             prompt_len=4, new_tokens=6, model_cfg=TINY, json_path=out, quiet=True)
    saved = json.loads(out.read_text())
    assert saved["kind"] == "generate"
    assert [(row["batch"], row["mode"]) for row in saved["rows"]] == [
        (1, "greedy"), (3, "greedy"), (1, "sample"), (3, "sample")]
    greedy = [row for row in saved["rows"] if row["mode"] == "greedy"]
    assert saved["ratio"] == pytest.approx(min(row["ratio"] for row in greedy))
    assert saved["ratio_sampled"] == pytest.approx(min(row["ratio"] for row in saved["rows"]
                                                       if row["mode"] == "sample"))
    assert isinstance(r["ratio"], float) and r["ratio"] > 0
    # float32 greedy decoding of the same weights gives the same tokens on both sides.
    assert all(row["same_tokens"] for row in greedy)


def test_bench_prep_json_and_cli(tiny_corpus: Path, tmp_path: Path, capsys):
    corpus = tiny_corpus
    out = tmp_path / "prep.json"
    assert main(["bench", "prep", "--preset", "tiny", "--corpus", str(corpus),
                 "--json", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["kind"] == "prep"
    assert isinstance(saved["seconds"], float) and saved["seconds"] > 0
    assert isinstance(saved["peak_rss_mb"], float) and saved["peak_rss_mb"] > 10
    assert [s["stage"] for s in saved["stages"]] == ["curate", "tokenizer", "shards"]
    assert saved["splits"]["train"]["n_tokens"] > 0
    assert "peak RSS" in capsys.readouterr().out


def test_cli_bench_prep_needs_corpus(capsys):
    assert main(["bench", "prep"]) == 2
    assert "--corpus" in capsys.readouterr().err


def test_resource_meter_sees_memory():
    import psutil

    before = psutil.Process().memory_info().rss
    with bench.ResourceMeter("alloc") as m:
        block = torch.ones(96 * 2**20 // 4)  # 96 MiB, written so the pages are resident
        time.sleep(0.15)  # several sampling intervals
        del block
    # The block was freed before the block ended: only the sampled peak can have seen it.
    assert m.peak - before > 80 * 2**20
    assert m.row()["seconds"] >= 0 and m.row()["stage"] == "alloc"


@pytest.mark.parametrize("kind", ["train", "generate"])
def test_cli_bench_model_kinds(kind: str, tmp_path: Path, capsys):
    out = tmp_path / f"{kind}.json"
    extra = ["--no-compile"]
    assert main(["bench", kind, "--preset", "tiny", "--repeats", "1", "--dtype", "float32",
                 "--threads", "1", "--json", str(out), *extra]) == 0
    saved = json.loads(out.read_text())
    assert saved["kind"] == kind and saved["preset"] == "tiny"
    assert isinstance(saved["ratio"], float) and saved["ratio"] > 0
    assert {row["dtype"] for row in saved["rows"]} == {"float32"}
    assert "ratio" in capsys.readouterr().out  # the table was printed


def test_gpu_preset_without_gpu_is_a_clear_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(["bench", "train", "--preset", "h200-350m"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err
