"""Trace: on a model trained to copy, each copied token's top source is the token it copies;
`simone generate --trace/--trace-html` write one record per token with the documented keys."""

from __future__ import annotations

import json

import torch

from simone.config import Config, ModelConfig, TokenizerConfig
from simone.model import build_model
from simone.inference.streaming import governed_generate

N_COPY, VOCAB, SEP = 10, 24, 1


def train_copy_model(steps: int = 200):
    """[a_0..a_9, SEP, a_0..a_9]: the second half is learnable only by looking back."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=VOCAB, dim=48, n_layers=2, n_heads=2, max_seq_len=32, governance=True,
                      policy=False, memory=False, trace_layers="all")
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        a = torch.randint(2, VOCAB, (32, N_COPY), generator=g)
        seq = torch.cat([a, torch.full((32, 1), SEP), a], 1)
        x, y = seq[:, :-1], seq[:, 1:].clone()
        y[:, :N_COPY] = -1  # the random first half cannot be predicted
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_trace_of_a_copied_token_points_at_its_source():
    model = train_copy_model()
    g = torch.Generator().manual_seed(123)
    hits = total = 0
    for _ in range(3):
        a = torch.randint(2, VOCAB, (N_COPY,), generator=g).tolist()
        steps = list(governed_generate(model, a + [SEP], N_COPY, temperature=0.0, trace=True))
        assert [s.token for s in steps] == a  # it learned to copy
        for j, step in enumerate(steps):
            assert step.sources is not None and len(step.sources) == 5
            weights = [w for _, w in step.sources]
            assert weights == sorted(weights, reverse=True) and 0 < sum(weights) <= 1 + 1e-5
            hits += step.sources[0][0] == j  # copy token j sits at prompt position j
            total += 1
    assert hits / total >= 0.9


def test_an_untrained_model_does_not_point_at_the_source():
    """The copy test above can fail: without training the top source is mostly elsewhere."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=VOCAB, dim=48, n_layers=2, n_heads=2, max_seq_len=32, governance=True,
                      policy=False, memory=False, trace_layers="all")
    model = build_model(cfg).eval()
    a = list(range(2, 2 + N_COPY))
    steps = list(governed_generate(model, a + [SEP], N_COPY, temperature=0.0, trace=True))
    assert sum(s.sources[0][0] == j for j, s in enumerate(steps)) < N_COPY * 0.5


def _checkpoint_dir(tmp_path):
    """A checkpoint folder (weights, config, tokenizer) of a tiny untrained governance model."""
    from safetensors.torch import save_model

    from simone.data.tokenizer import train_tokenizer

    docs = tmp_path / "documents.jsonl"
    with open(docs, "w", encoding="utf-8") as f:
        for i, (domain, words) in enumerate([("alpha", "sun moon star"), ("beta", "law court vote")] * 3):
            f.write(json.dumps({"id": str(i), "domain": domain, "split": "train", "text": (words + " ") * 30}) + "\n")
    tok = train_tokenizer(docs, tmp_path / "tok", TokenizerConfig(vocab_size=280, min_frequency=1))
    cfg = Config()
    cfg.model = ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=4, max_seq_len=32,
                            governance=True, n_domains=len(tok.domains), n_memory_slots=2)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    torch.manual_seed(0)
    save_model(build_model(cfg.model), str(ckpt / "model.safetensors"))
    (ckpt / "config.json").write_text(cfg.to_json())
    tok.save(ckpt / "tokenizer.json")
    return ckpt, tok


def test_generate_writes_trace_jsonl_and_html(tmp_path, capsys):
    from simone.cli import main

    ckpt, tok = _checkpoint_dir(tmp_path)
    trace, page = tmp_path / "t.jsonl", tmp_path / "t.html"
    # 60 tokens: past the 32-token context, through the streaming cache
    rc = main(["generate", "--model", str(ckpt), "--prompt", "sun moon", "--max-tokens", "60", "--domain", "alpha",
               "--policy-guidance", "2", "--trace", str(trace), "--trace-html", str(page), "--device", "cpu"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "[policy: " in err and "alpha" in err  # the policy head's reading of the text
    records = [json.loads(line) for line in trace.read_text(encoding="utf-8").splitlines()]
    assert 0 < len(records) <= 60
    assert f"[{len(records)} tokens in " in err  # tokens counted, not pieces of text
    n_prompt = 2 + len(tok.encode("sun moon"))  # eod, <|domain:alpha|>, prompt
    for i, rec in enumerate(records):
        assert set(rec) >= {"token", "text", "prob", "entropy", "top_sources", "policy"}
        assert 0 <= rec["prob"] <= 1 and rec["entropy"] >= 0
        assert rec["text"] == tok.decode([rec["token"]])
        assert set(rec["policy"]) == {"alpha", "beta"} and abs(sum(rec["policy"].values()) - 1) < 1e-4
        for position, text, weight in rec["top_sources"]:
            assert 0 <= position < n_prompt + i and 0 <= weight <= 1  # only what came before
    html = page.read_text(encoding="utf-8")
    assert html.count('class="tok"') == len(records) and "hsl(" in html


def test_generate_refuses_an_unknown_domain(tmp_path, capsys):
    from simone.cli import main

    ckpt, _ = _checkpoint_dir(tmp_path)
    rc = main(["generate", "--model", str(ckpt), "--domain", "nowhere", "--max-tokens", "3", "--device", "cpu"])
    assert rc == 2 and "nowhere" in capsys.readouterr().err


def test_stream_tokens_reports_every_token_id_behind_the_text(tmp_path):
    from simone.inference.generate import stream_tokens
    from simone.inference.load import load_model

    ckpt, tok = _checkpoint_dir(tmp_path)
    loaded = load_model(ckpt, device="cpu")
    token_ids: list[int] = []
    pieces = list(stream_tokens(loaded, "sun", max_tokens=20, seed=1, token_ids=token_ids))
    assert 0 < len(token_ids) <= 20 and tok.eod_id not in token_ids
    assert tok.decode(token_ids).startswith("".join(pieces))  # a split character may trail
