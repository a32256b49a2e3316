"""`simone export --format gguf`: the file read back with the `gguf` package's own reader holds
our hyperparameters, tokenizer and special tokens; its weights, mapped back to our names, give
our logits; its q/k rows are ordered for llama.cpp's neighbour-pair RoPE. (Running the file in
llama.cpp itself is bench/bench_gguf.py: building llama.cpp does not fit the test budget.)"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from simone.cli import main
from simone.inference.load import load_model
from simone.model.layers import apply_rope, rope_tables
from test_hf_export import _save_model_run, tokenizer_strings

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType
# how far a dequantized weight may be from ours: relative to the largest |w| of its row
TOLERANCE = {"f32": 0.0, "f16": 1e-3, "bf16": 8e-3, "q8_0": 8e-3}
MATRIX_TYPE = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0}


def read_gguf(path):
    reader = gguf.GGUFReader(path)
    meta = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    tensors = {t.name: t for t in reader.tensors}
    return meta, tensors


def dequantized(t) -> np.ndarray:
    """A GGUF tensor as float32 numpy [out, in] (ggml lists dimensions innermost first)."""
    shape = tuple(reversed([int(n) for n in t.shape]))
    return gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)


def neighbours_to_pairs(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo the export's q/k row order (written here independently of simone's code)."""
    rows, cols = weight.shape
    hd = rows // n_heads
    return weight.reshape(n_heads, hd // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def ours_from_llama_gguf(tensors, cfg) -> dict[str, torch.Tensor]:
    """Our Transformer state dict rebuilt from llama.cpp's tensor names."""
    w = {name: torch.from_numpy(dequantized(t)) for name, t in tensors.items()}
    n_kv = cfg.n_kv_heads or cfg.n_heads
    sd = {"tok_embeddings.weight": w["token_embd.weight"], "norm.weight": w["output_norm.weight"],
          "output.weight": w.get("output.weight", w["token_embd.weight"])}
    for i in range(cfg.n_layers):
        b = f"blk.{i}."
        sd.update({
            f"layers.{i}.attention_norm.weight": w[b + "attn_norm.weight"],
            f"layers.{i}.attention.wqkv.weight": torch.cat([
                neighbours_to_pairs(w[b + "attn_q.weight"], cfg.n_heads),
                neighbours_to_pairs(w[b + "attn_k.weight"], n_kv), w[b + "attn_v.weight"]]),
            f"layers.{i}.attention.wo.weight": w[b + "attn_output.weight"],
            f"layers.{i}.ffn_norm.weight": w[b + "ffn_norm.weight"],
            f"layers.{i}.feed_forward.w13.weight": torch.cat([w[b + "ffn_gate.weight"], w[b + "ffn_up.weight"]]),
            f"layers.{i}.feed_forward.w2.weight": w[b + "ffn_down.weight"],
        })
    return sd


VARIANTS = {"llama": dict(n_kv_heads=2), "gpt2": dict(arch="gpt2"),
            "governance": dict(governance=True, policy=True, memory=False)}


@pytest.fixture(scope="module")
def exported(template, tmp_path_factory):
    """{(variant, dtype): (gguf file, run dir)}: the llama run in every dtype, the others in f32."""
    root = tmp_path_factory.mktemp("gguf_export")
    runs = {name: _save_model_run(template, root / f"run-{name}", **model) for name, model in VARIANTS.items()}
    files = {}
    for name, dtype in [("llama", d) for d in MATRIX_TYPE] + [("gpt2", "f32"), ("governance", "f32")]:
        out = root / f"{name}-{dtype}.gguf"
        assert main(["export", "--model", str(runs[name]), "--format", "gguf", "--dtype", dtype,
                     "--out", str(out)]) == 0
        files[name, dtype] = (out, runs[name])
    return files


def test_metadata_names_the_architecture_hyperparameters_and_special_tokens(exported):
    path, run = exported["llama", "f32"]
    loaded = load_model(run, device="cpu")
    m, eod = loaded.config.model, loaded.tokenizer.eod_id
    meta, _ = read_gguf(path)
    assert meta["general.architecture"] == "llama"
    assert meta["general.name"] == run.name
    assert meta["general.file_type"] == 0  # ALL_F32
    assert meta["llama.context_length"] == m.max_seq_len
    assert meta["llama.embedding_length"] == m.dim
    assert meta["llama.block_count"] == m.n_layers
    assert meta["llama.attention.head_count"] == m.n_heads
    assert meta["llama.attention.head_count_kv"] == 2
    assert meta["llama.rope.dimension_count"] == m.dim // m.n_heads
    assert meta["llama.rope.freq_base"] == pytest.approx(m.rope_theta)
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(m.norm_eps)
    assert meta["llama.feed_forward_length"] == loaded.model.layers[0].feed_forward.w2.weight.shape[1]
    assert meta["llama.vocab_size"] == m.vocab_size
    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.pre"] == "gpt-2"
    for key in ("bos", "eos", "padding"):
        assert meta[f"tokenizer.ggml.{key}_token_id"] == eod
    assert meta["tokenizer.ggml.add_bos_token"] is False  # simone encodes prompts without one

    gpt2_meta, _ = read_gguf(exported["gpt2", "f32"][0])
    assert gpt2_meta["general.architecture"] == "gpt2"
    assert gpt2_meta["gpt2.feed_forward_length"] == 4 * m.dim
    assert gpt2_meta["gpt2.attention.layer_norm_epsilon"] == pytest.approx(m.norm_eps)
    assert meta_file_types(exported) == {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7}


def meta_file_types(exported) -> dict[str, int]:
    return {d: read_gguf(exported["llama", d][0])[0]["general.file_type"] for d in MATRIX_TYPE}


def test_tokenizer_tokens_types_and_merges_round_trip(exported):
    path, run = exported["llama", "f32"]
    tok = load_model(run, device="cpu").tokenizer
    meta, _ = read_gguf(path)
    tokens = meta["tokenizer.ggml.tokens"]
    assert tokens == [tok.id_to_token(i) for i in range(tok.vocab_size)]
    types = meta["tokenizer.ggml.token_type"]
    special = {tok.eod_id} | {tok.domain_token_id(d) for d in tok.domains} | set(tok.chat_ids.values())
    assert {i for i, t in enumerate(types) if t == gguf.TokenType.CONTROL} == special
    assert all(t == gguf.TokenType.NORMAL for i, t in enumerate(types) if i not in special)
    saved = json.loads(tok.path.read_text(encoding="utf-8"))["model"]["merges"]
    merges = meta["tokenizer.ggml.merges"]
    assert merges == [m if isinstance(m, str) else " ".join(m) for m in saved] and merges

    # a byte-level BPE built from the GGUF alone encodes text exactly as ours does
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split(" ")) for m in merges])
    rebuilt = Tokenizer(bpe)
    rebuilt.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    rebuilt.decoder = decoders.ByteLevel()
    for s in tokenizer_strings(tok.domains):
        assert rebuilt.encode(s).ids == tok.encode(s), s


@pytest.mark.parametrize("dtype", list(MATRIX_TYPE))
def test_weights_read_back_equal_ours(exported, dtype):
    """Names, shapes and types as llama.cpp expects; the dequantized weights, mapped back to our
    names, are ours (exactly in f32, within the type's rounding otherwise) and give our logits."""
    path, run = exported["llama", dtype]
    loaded = load_model(run, device="cpu")
    cfg, model = loaded.config.model, loaded.model
    _, tensors = read_gguf(path)
    names = {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{p}.weight" for i in range(cfg.n_layers) for p in
        ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}
    assert set(tensors) == names  # tied output: llama.cpp reuses token_embd
    hd, n_kv = cfg.dim // cfg.n_heads, cfg.n_kv_heads
    assert dequantized(tensors["blk.0.attn_k.weight"]).shape == (n_kv * hd, cfg.dim)
    assert dequantized(tensors["token_embd.weight"]).shape == (cfg.vocab_size, cfg.dim)
    for name, t in tensors.items():
        assert t.tensor_type == (T.F32 if name.endswith("norm.weight") else MATRIX_TYPE[dtype]), name

    ours = model.state_dict()
    rebuilt = ours_from_llama_gguf(tensors, cfg)
    for name, w in rebuilt.items():
        ref = ours[name]
        scale = ref.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12)
        err = ((w - ref).abs() / scale).max().item()
        assert err <= TOLERANCE[dtype], (name, err)

    ids = torch.tensor([loaded.tokenizer.encode("The lord god of heaven and the earth")])
    with torch.no_grad():
        want = model(ids)[0]
        model.load_state_dict(rebuilt, strict=False)
        got = model(ids)[0]
    if dtype == "f32":
        assert torch.equal(got, want)
    else:
        assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9


def test_gpt2_and_governance_tensors(exported):
    _, tensors = read_gguf(exported["gpt2", "f32"][0])
    ours = load_model(exported["gpt2", "f32"][1], device="cpu").model.state_dict()
    assert torch.equal(torch.from_numpy(dequantized(tensors["blk.1.attn_qkv.weight"])),
                       ours["layers.1.attention.wqkv.weight"])  # [out, in], as ours: not Conv1D
    assert torch.equal(torch.from_numpy(dequantized(tensors["blk.0.ffn_up.bias"])),
                       ours["layers.0.feed_forward.fc.bias"])
    assert torch.equal(torch.from_numpy(dequantized(tensors["position_embd.weight"])),
                       ours["pos_embeddings.weight"])
    # governance: the language model only (no policy head in the file)
    _, gov = read_gguf(exported["governance", "f32"][0])
    _, plain = read_gguf(exported["llama", "f32"][0])
    assert not [n for n in gov if "policy" in n] and len(gov) == len(plain)


def test_q_k_rows_suit_neighbour_pair_rope():
    """llama.cpp's "llama" RoPE rotates (x[2j], x[2j+1]); ours rotates (x[j], x[j+hd/2]). With the
    exported row order the attention scores are the same."""
    from simone.inference.gguf_file import rope_pairs_to_neighbours

    torch.manual_seed(0)
    n_heads, hd, dim, T_ = 2, 8, 16, 5
    wq, wk = torch.randn(n_heads * hd, dim), torch.randn(n_heads * hd, dim)
    x = torch.randn(T_, dim)
    cos, sin = rope_tables(hd, T_)

    def ours(w):  # [heads, T, hd] rotated by our RoPE ([B, T, heads, hd] in, cos/sin [T, 1, hd/2])
        return apply_rope((x @ w.T).view(1, T_, n_heads, hd), cos[:T_], sin[:T_])[0].transpose(0, 1)

    def neighbours(w):  # llama.cpp's convention, written out
        v = (x @ w.T).view(T_, n_heads, hd // 2, 2).transpose(0, 1)
        pos = torch.arange(T_, dtype=torch.float32)[:, None]
        ang = pos * 10000.0 ** (-torch.arange(0, hd, 2, dtype=torch.float32) / hd)
        a, b = v[..., 0], v[..., 1]
        return torch.stack([a * ang.cos() - b * ang.sin(), a * ang.sin() + b * ang.cos()], -1).flatten(-2)

    want = ours(wq) @ ours(wk).transpose(-1, -2)
    q, k = neighbours(rope_pairs_to_neighbours(wq, n_heads)), neighbours(rope_pairs_to_neighbours(wk, n_heads))
    got = q @ k.transpose(-1, -2)
    assert torch.allclose(got, want, atol=1e-4)
    unpermuted = neighbours(wq) @ neighbours(wk).transpose(-1, -2)
    assert not torch.allclose(unpermuted, want, atol=1e-2)  # the reorder is needed


def test_refusals_are_one_line(template, tmp_path, capsys):
    mem = _save_model_run(template, tmp_path / "run-mem", governance=True, policy=True, memory=True)
    out = tmp_path / "m.gguf"
    assert main(["export", "--model", str(mem), "--format", "gguf", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "model.memory=true" in err and len(err.splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".m.gguf*"))  # nothing half-written
    assert main(["export", "--model", str(mem), "--format", "gguf", "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert main(["export", "--model", str(mem), "--format", "hf", "--dtype", "q8_0",
                 "--out", str(tmp_path / "hf")]) == 2
    assert "--dtype applies to --format gguf only" in capsys.readouterr().err


def test_q8_0_falls_back_to_f16_for_short_rows():
    from simone.inference.gguf_file import tensor_type

    assert tensor_type(np.zeros((4, 64), np.float32), "q8_0") == "q8_0"
    assert tensor_type(np.zeros((4, 48), np.float32), "q8_0") == "f16"
    assert tensor_type(np.zeros(64, np.float32), "q8_0") == "f32"


def _sharp_run(template, dest, arch: str):
    """A run whose attention is far from uniform (q and k scaled up) and whose logits are
    spread (embedding scaled up): so RoPE and every weight visibly shape the logits."""
    from simone.config import save_config
    from simone.model import build_model
    from simone.checkpoint import save_checkpoint
    from train_support import new_run

    cfg, run = new_run(template, dest)
    cfg.model.arch = arch
    cfg.model.n_kv_heads = 2 if arch == "llama" else None  # GPT-2 has no grouped-query attention
    torch.manual_seed(0)
    net = build_model(cfg.model)
    qk_rows = (cfg.model.n_heads + (cfg.model.n_kv_heads or cfg.model.n_heads)) * (cfg.model.dim // cfg.model.n_heads)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            if name.endswith("wqkv.weight"):
                p[:qk_rows].mul_(15.0)
        net.tok_embeddings.weight.mul_(20.0)
    save_config(cfg, run.config)
    save_checkpoint(run.checkpoints, 1, net.state_dict(), {}, cfg.to_dict(), best=True)
    return run.root


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_llama_cpp_runs_the_file_as_ours(template, tmp_path, arch):
    """llama.cpp itself (only where llama-cpp-python is installed; see bench/bench_gguf.py):
    our token ids, our logits and greedy tokens from the f32 file, and our bits per byte in
    `simone eval`."""
    pytest.importorskip("llama_cpp")
    from simone.inference.text_bpb import evaluate_models
    from simone.inference.gguf_file import llama_cpp_greedy, llama_cpp_logits, open_in_llama_cpp

    run = _sharp_run(template, tmp_path / "run", arch)
    path = tmp_path / "sharp.gguf"
    assert main(["export", "--model", str(run), "--format", "gguf", "--out", str(path)]) == 0
    loaded = load_model(run, device="cpu")
    tok, model = loaded.tokenizer, loaded.model
    context = loaded.config.model.max_seq_len
    llm = open_in_llama_cpp(path, context, logits_all=True)
    for s in tokenizer_strings(tok.domains):
        assert llm.tokenize(s.encode("utf-8"), add_bos=False, special=False) == tok.encode(s), s

    ids = ([tok.eod_id] + tok.encode("In the beginning God created the heaven and the earth. " * 6))[:context]
    with torch.no_grad():
        want = model(torch.tensor([ids]))[0][0]
    got = torch.from_numpy(llama_cpp_logits(llm, ids))
    assert want.std() > 1.0  # spread logits: a wrong weight or RoPE order shows
    assert (got - want).abs().max() < 1e-3 * want.abs().max()

    prompt = tok.encode("The lord god of heaven")
    with torch.no_grad():
        ours = torch.cat(list(model.generate(torch.tensor([prompt]), 32, temperature=0.0)), 1)[0].tolist()
    assert llama_cpp_greedy(llm, prompt, 32) == ours

    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("In the beginning God created the heaven and the earth. " * 8)
    result = evaluate_models([str(run), f"gguf:{path}"], tmp_path / "text", device="cpu")
    simone_bpb, gguf_bpb = (m["bpb"] for m in result["models"])
    assert gguf_bpb == pytest.approx(simone_bpb, rel=1e-4)


def test_bench_generate_has_llama_cpp_as_a_peer_when_installed():
    from simone.workflows import bench
    from simone.inference.gguf_file import llama_cpp_available

    r = bench.bench_generate("tiny", repeats=1, warmup=0, batches=(1,), dtypes=["float32"], prompt_len=4,
                             new_tokens=12, sampling=False, device="cpu", quiet=True)
    if not llama_cpp_available():
        assert r["llama_cpp"] == []
        return
    (row,) = r["llama_cpp"]
    assert row["gguf"] == "f32" and row["batch"] == 1 and row["peer_tokens_per_s"] > 0
    assert row["same_tokens"]  # float32 greedy on the same weights
