"""Governance: policy causality, exact equivalence with the plain model when switched off,
memory slots, the streaming cache, loss terms, guided generation, control tokens, labels."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from simone.config import ModelConfig, TokenizerConfig
from simone.data.loader import BatchLoader
from simone.data.shards import TokenShard, build_shards, takes_control_token
from simone.model import build_model
from simone.model.attention import StreamingKVCache
from simone.inference.streaming import governed_generate, streaming_nll
from simone.model.governance_heads import LOSS_TERMS, policy_coherence
from simone.train.metrics import LossTermMeter
from simone.model.layers import apply_rope, rope_tables
from simone.data.tokenizer import domain_token, train_tokenizer

VOCAB = 61


def cfg(**overrides) -> ModelConfig:
    fields = dict(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, max_seq_len=32, n_domains=3,
                  n_memory_slots=4, coherence_distance=4)
    fields.update(overrides)
    return ModelConfig(**fields)


def model(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return build_model(cfg(**overrides)).eval()


def batch(seed: int = 1, b: int = 2, t: int = 24):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (b, t), generator=g), torch.randint(0, VOCAB, (b, t), generator=g)


# ----------------------------------------------------------------------------- policy


@pytest.mark.parametrize("layer", [0, -1])
def test_policy_output_never_depends_on_future_tokens(layer):
    m = model(governance=True, policy_layer=layer)
    x, _ = batch()
    _, _, policy = m(x, return_policy=True)
    assert policy.shape == (2, 24, 3)
    for t in (0, 9, 23):
        changed = x.clone()
        changed[:, t] = (changed[:, t] + 1) % VOCAB
        _, _, policy2 = m(changed, return_policy=True)
        torch.testing.assert_close(policy2[:, :t], policy[:, :t], rtol=0, atol=1e-6)
        assert (policy2[:, t:] - policy[:, t:]).abs().max() > 1e-6  # it does read the past


def test_governance_off_is_exactly_the_plain_model():
    plain = model(governance=False)
    off = model(governance=False, policy_loss_weight=0.0, coherence_weight=0.0)
    assert plain.state_dict().keys() == off.state_dict().keys()
    for k, v in plain.state_dict().items():
        assert torch.equal(v, off.state_dict()[k])
    x, y = batch()
    plain.train(), off.train()
    (_, loss1), (_, loss2) = plain(x, y), off(x, y)
    assert torch.equal(loss1, loss2)
    plain.eval(), off.eval()
    assert torch.equal(plain(x)[0], off(x)[0])


def test_policy_only_with_zero_weights_has_the_plain_logits_and_loss():
    """The policy head adds parameters but, with weights 0, changes neither logits nor loss;
    the plain parameters start identical (governance parts are initialised after them)."""
    plain = model(governance=False)
    gov = model(governance=True, memory=False, policy_loss_weight=0.0, coherence_weight=0.0)
    extra = set(gov.state_dict()) - set(plain.state_dict())
    assert extra and all(k.startswith("policy_head.") for k in extra)
    for k, v in plain.state_dict().items():
        assert torch.equal(v, gov.state_dict()[k]), k
    x, y = batch()
    d = torch.tensor([0, 2])
    plain.train(), gov.train()
    _, loss_plain = plain(x, y)
    _, loss_gov = gov(x, y, domain_ids=d)
    assert torch.equal(loss_plain, loss_gov)
    assert gov.loss_terms["policy_loss"] > 0  # computed and logged, just not added
    plain.eval(), gov.eval()
    assert torch.equal(plain(x)[0], gov(x)[0])


def test_gpt2_and_missing_domains_are_refused():
    with pytest.raises(ValueError, match="arch=llama"):
        build_model(cfg(arch="gpt2", governance=True))
    with pytest.raises(ValueError, match="n_domains"):
        build_model(cfg(governance=True, n_domains=0))
    m = model(governance=True).train()
    x, y = batch()
    with pytest.raises(ValueError, match="domain_ids"):
        m(x, y)


# ----------------------------------------------------------------------------- loss terms


def test_each_loss_term_is_finite_bounded_and_summed_with_its_weight():
    m = model(governance=True, policy_loss_weight=0.3, coherence_weight=0.2).train()
    x, y = batch()
    labels = torch.tensor([[0] * 12 + [1] * 12, [2] * 24])
    _, loss = m(x, y, domain_ids=labels)
    terms = m.loss_terms
    assert set(terms) == set(LOSS_TERMS)
    assert all(torch.isfinite(v) for v in terms.values())
    assert 0.0 <= float(terms["coherence_loss"]) <= math.log(2) + 1e-6
    assert 0.0 <= float(terms["policy_acc"]) <= 1.0
    expected = terms["lm_loss"] + 0.3 * terms["policy_loss"] + 0.2 * terms["coherence_loss"]
    torch.testing.assert_close(loss.detach(), expected)
    loss.backward()
    assert m.policy_head.proj.weight.grad.abs().sum() > 0


def test_coherence_is_zero_for_agreeing_positions_and_at_most_ln2():
    labels = torch.zeros(1, 10, dtype=torch.long)
    same = torch.randn(1, 1, 3).expand(1, 10, 3)
    assert float(policy_coherence(same, labels, 2)) == pytest.approx(0.0, abs=1e-7)
    opposite = torch.tensor([[[50.0, -50.0]] * 5 + [[-50.0, 50.0]] * 5])
    js = float(policy_coherence(opposite, torch.zeros(1, 10, dtype=torch.long), 5))
    assert js == pytest.approx(math.log(2), rel=1e-4)
    # pairs across a domain boundary are not compared
    assert float(policy_coherence(opposite, torch.tensor([[0] * 5 + [1] * 5]), 5)) == 0.0


def test_loss_term_meter_averages_over_the_interval():
    meter = LossTermMeter()
    meter.add({"lm_loss": torch.tensor(2.0)})
    meter.add({"lm_loss": torch.tensor(4.0)})
    assert meter.read_and_reset() == {"lm_loss": 3.0}
    assert meter.read_and_reset() == {}


# ----------------------------------------------------------------------------- memory


def test_memory_slots_change_the_logits_and_learn():
    with_memory = model(governance=True, policy=False)
    without = model(governance=False)
    missing, unexpected = without.load_state_dict(with_memory.state_dict(), strict=False)
    assert not missing and all(".memory_" in k for k in unexpected) and unexpected
    x, y = batch()
    assert (with_memory(x)[0] - without(x)[0]).abs().max() > 1e-4
    before = with_memory(x)[0]
    with torch.no_grad():
        with_memory.layers[1].attention.memory_v.add_(1.0)
    assert (with_memory(x)[0] - before).abs().max() > 1e-4
    with_memory.train()
    _, loss = with_memory(x, y)
    loss.backward()
    assert with_memory.layers[0].attention.memory_k.grad.abs().sum() > 0


@pytest.mark.parametrize("memory", [True, False])
def test_cache_and_chunked_prefill_match_the_full_forward_with_memory(memory):
    m = model(governance=True, policy=False, memory=memory)
    x, _ = batch(t=20)
    full = m(x)[0]
    cache = m.new_kv_cache(2, 32)
    a = m(x[:, :7], kv_cache=cache, start_pos=0)[0]
    b = m(x[:, 7:19], kv_cache=cache, start_pos=7)[0]  # several queries at an offset: explicit mask
    c = m(x[:, 19:], kv_cache=cache, start_pos=19)[0]  # one query
    torch.testing.assert_close(torch.cat([a, b, c], 1), full, rtol=1e-4, atol=1e-5)


def test_eviction_rotates_kept_keys_back_to_their_new_slots():
    head_dim, theta = 8, 10000.0
    cache = StreamingKVCache(1, 1, 1, head_dim, capacity=8, keep_first=1, evict_chunk=3, rope_theta=theta)
    raw = torch.randn(1, 8, 1, head_dim)
    cos, sin = rope_tables(head_dim, 16, theta)
    start = cache.reserve(8)
    cache.update(0, apply_rope(raw, cos[:8], sin[:8]), raw, start)
    slot = cache.reserve(1)  # full: evicts slots 1..3, the rest move 3 left
    assert slot == 5 and cache.positions[:6].tolist() == [0, 4, 5, 6, 7, 8]
    kept = cache.k[0][:, 1:5]
    torch.testing.assert_close(kept, apply_rope(raw[:, 4:8], cos[1:5], sin[1:5]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cache.k[0][:, :1], apply_rope(raw[:, :1], cos[:1], sin[:1]))


def test_streaming_cache_stays_bounded_over_ten_contexts():
    m = model(governance=True, policy=False)
    tokens = torch.randint(0, VOCAB, (10 * 32 + 1,), generator=torch.Generator().manual_seed(3))
    out = streaming_nll(m, tokens, chunk=5)
    assert out["n_tokens"] == 320 and math.isfinite(out["ppl"])
    assert out["max_slots"] <= 32
    expected_bytes = 2 * 2 * 32 * 4 * 8 * 4  # k+v, layers, slots, heads, head_dim, float32
    assert out["cache_bytes"] == expected_bytes
    # before the first eviction, streaming equals the plain forward
    head = streaming_nll(m, tokens[:30], chunk=7)
    with torch.no_grad():
        logits = m(tokens[None, :29])[0][0]
    ref = torch.nn.functional.cross_entropy(logits, tokens[1:30], reduction="sum")
    assert head["nll_sum"] == pytest.approx(float(ref), rel=1e-5)


# ----------------------------------------------------------------------------- generation


def test_governed_greedy_generation_matches_plain_generate_and_runs_past_the_context():
    m = model(governance=True)
    prompt = [5, 9, 2, 7]
    ref = [int(t) for t in m.generate(torch.tensor([prompt]), 20, temperature=0.0)]
    got = [s.token for s in governed_generate(m, prompt, 20, temperature=0.0)]
    assert got == ref
    long = list(governed_generate(m, prompt, 100, temperature=1.0, generator=torch.Generator().manual_seed(0)))
    assert len(long) == 100  # 3x the context, constant cache
    assert all(s.policy is not None and abs(sum(s.policy) - 1) < 1e-5 for s in long)


def test_policy_guidance_picks_the_candidate_the_policy_prefers():
    m = model(governance=True)
    prompt = [5, 9, 2, 7]
    # weight 0 at temperature 0: guidance reduces to greedy (checks the shared-row cache)
    plain = [s.token for s in governed_generate(m, prompt, 8, temperature=0.0)]
    zero = [s.token for s in governed_generate(m, prompt, 8, temperature=0.0, guidance_domain=1,
                                               guidance_weight=1e-9, guidance_top_k=4)]
    assert zero == plain
    strong = [s.token for s in governed_generate(m, prompt, 6, temperature=0.0, guidance_domain=1,
                                                 guidance_weight=1e6, guidance_top_k=4)]
    seq = list(prompt)
    for token in strong:  # each pick maximises p_policy(domain 1 | text + candidate) among the top 4
        logits = m(torch.tensor([seq]))[0][0, -1]
        candidates = torch.topk(logits, 4).indices.tolist()
        scores = [m(torch.tensor([seq + [c]]), return_policy=True)[2][0, -1].softmax(-1)[1] for c in candidates]
        assert token == candidates[int(torch.stack(scores).argmax())]
        seq.append(token)


# ----------------------------------------------------------------------------- data


def _documents(path, n_per_domain=6):
    rng = np.random.default_rng(0)
    words = {"alpha": "sun moon star sky light".split(), "beta": "law court judge state vote".split(),
             "gamma": "cell gene protein acid virus".split()}
    with open(path, "w", encoding="utf-8") as f:
        for domain, vocab in words.items():
            for i in range(n_per_domain):
                text = " ".join(rng.choice(vocab, 120))
                f.write(json.dumps({"id": f"{domain}-{i}", "domain": domain, "split": "val" if i == 0 else "train",
                                    "text": text}) + "\n")
    return path


def test_control_tokens_round_trip_and_are_placed_before_chosen_training_documents(tmp_path):
    docs = _documents(tmp_path / "documents.jsonl")
    tok = train_tokenizer(docs, tmp_path / "tok", TokenizerConfig(vocab_size=300, min_frequency=1))
    assert tok.domains == ["alpha", "beta", "gamma"]
    for name in tok.domains:
        tid = tok.domain_token_id(name)
        assert tok.encode(domain_token(name), allow_special=True) == [tid]
        assert tok.decode([tid]) == domain_token(name)
        assert tid not in tok.encode(domain_token(name))  # plain text never makes one
    index = build_shards(docs, tok, tmp_path / "data", control_token_prob=0.5, control_seed=7)
    train = TokenShard(tmp_path / "data", "train")
    chosen = set(index["splits"]["train"]["control_docs"])
    assert chosen == {d[0] for d in train.docs if takes_control_token(d[0], 0.5, 7)}
    assert 0 < len(chosen) < len(train.docs)
    for doc_id, domain, start, end, _ in train.docs:
        before = int(train.tokens[start - 1]) if start else tok.eod_id
        assert before == (tok.domain_token_id(domain) if doc_id in chosen else tok.eod_id)
    assert index["splits"]["val"]["control_docs"] == []
    # a new setting rebuilds; the same one is skipped
    assert build_shards(docs, tok, tmp_path / "data", 0.5, 7) == index
    assert build_shards(docs, tok, tmp_path / "data", 0.0)["splits"]["train"]["control_docs"] == []


def test_loader_domain_labels_follow_the_domain_ranges(tmp_path):
    docs = _documents(tmp_path / "documents.jsonl")
    tok = train_tokenizer(docs, tmp_path / "tok", TokenizerConfig(vocab_size=300, min_frequency=1))
    build_shards(docs, tok, tmp_path / "data")
    shard = TokenShard(tmp_path / "data", "train")
    classes = ["gamma", "alpha"]  # beta unknown → -1
    plain = BatchLoader(shard, 4, 16, seed=1)
    labelled = BatchLoader(shard, 4, 16, seed=1, domain_classes=classes)
    for _ in range(plain.batches_per_epoch + 2):
        x, y = plain.next_batch()
        x2, y2, d = labelled.next_batch_with_domains()
        assert torch.equal(x, x2) and torch.equal(y, y2) and d.shape == x.shape
    key = (labelled.epoch, labelled.position - 1)
    starts = labelled.window_ids(*key) * 16
    for row, s in enumerate(starts):
        for t in (0, 15):
            pos = s + t
            domain = next(n for n in shard.domains if shard.domain_range(n)[0] <= pos < shard.domain_range(n)[1])
            assert int(d[row, t]) == (classes.index(domain) if domain in classes else -1)


def test_each_part_has_its_own_switch():
    full = model(governance=True)
    assert full.policy_head is not None and full.layers[0].attention.n_memory == 4
    no_policy = model(governance=True, policy=False)
    assert no_policy.policy_head is None and no_policy.layers[0].attention.n_memory == 4
    no_memory = model(governance=True, memory=False)
    assert no_memory.policy_head is not None and no_memory.layers[0].attention.n_memory == 0
    no_trace = model(governance=True, trace=False)
    with pytest.raises(ValueError, match="trace=false"):
        list(governed_generate(no_trace, [1, 2], 2, trace=True))
    assert len(list(governed_generate(no_trace, [1, 2], 2))) == 2  # generation itself still works
    with pytest.raises(ValueError, match="policy head"):
        list(governed_generate(no_policy, [1, 2], 2, guidance_domain=0, guidance_weight=1.0))


def test_policy_with_a_cache_equals_the_policy_of_the_whole_text():
    """The head averages the text so far; a cache carries the running sum across calls."""
    m = model(governance=True)
    x, _ = batch(t=20)
    full = m(x, return_policy=True)[2]
    cache = m.new_kv_cache(2, 32)
    parts = [m(x[:, :6], kv_cache=cache, start_pos=0, return_policy=True)[2],
             m(x[:, 6:15], kv_cache=cache, start_pos=6, return_policy=True)[2],
             m(x[:, 15:16], kv_cache=cache, start_pos=15, return_policy=True)[2],
             m(x[:, 16:], kv_cache=cache, start_pos=16, last_logits_only=True, return_policy=True)[2]]
    torch.testing.assert_close(torch.cat(parts[:3], 1), full[:, :16], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(parts[3][:, -1], full[:, -1], rtol=1e-4, atol=1e-5)
    # a new sequence (start_pos 0) starts a new average
    again = m(x[:, :6], kv_cache=cache, start_pos=0, return_policy=True)[2]
    torch.testing.assert_close(again, full[:, :6], rtol=1e-4, atol=1e-5)

