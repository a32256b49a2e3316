"""The Hugging Face mapping is exact: same weights, same logits, loss, gradients and tokens."""

from __future__ import annotations

import pytest
import torch

from simone.config import ModelConfig
from simone.inference.export import (
    from_hf_llama_state_dict,
    hf_llama_config,
    model_config_from_hf,
    to_hf_llama,
    to_hf_llama_state_dict,
)
from simone.model import build_model

transformers = pytest.importorskip("transformers")

VOCAB = 97


def tiny(**overrides):
    fields = dict(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, max_seq_len=32, rope_theta=500.0)
    fields.update(overrides)
    torch.manual_seed(0)
    model = build_model(ModelConfig(**fields)).eval()
    with torch.no_grad():  # non-trivial norm weights, so a swapped norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


VARIANTS = [dict(), dict(n_kv_heads=2), dict(tie_embeddings=False), dict(ffn_hidden=96)]
IDS = ["mha-tied", "gqa", "untied", "ffn96"]


@pytest.mark.parametrize("extra", VARIANTS, ids=IDS)
def test_our_logits_equal_llama_for_causal_lm(extra):
    model = tiny(**extra)
    hf = to_hf_llama(model)
    assert isinstance(hf, transformers.LlamaForCausalLM)
    idx = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = hf(idx).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    assert ours.abs().max() > 0.1  # not a vacuous comparison of near-zero logits


def test_loss_and_gradients_match_transformers():
    model = tiny(n_kv_heads=2).train()
    hf = to_hf_llama(model).train()
    idx = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(2))
    _, loss = model(idx[:, :-1], idx[:, 1:])
    hf_loss = hf(idx[:, :-1], labels=idx[:, :-1]).loss  # HF shifts labels itself
    hf_loss_full = hf(idx, labels=idx).loss
    torch.testing.assert_close(loss, hf_loss_full, rtol=0, atol=1e-5)
    assert not torch.isclose(hf_loss, hf_loss_full)  # the comparison depends on the shift
    loss.backward()
    hf_loss_full.backward()
    hf_grads = to_hf_llama_state_dict({n: p.grad for n, p in model.named_parameters()}, model.cfg)
    for name, p in hf.named_parameters():
        torch.testing.assert_close(hf_grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_greedy_generation_matches_transformers_generate():
    model = tiny(n_kv_heads=2)
    hf = to_hf_llama(model)
    prompt = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(3))
    ours = torch.cat(list(model.generate(prompt, 16, temperature=0.0)), 1)
    theirs = hf.generate(prompt, max_new_tokens=16, min_new_tokens=16, do_sample=False,
                         pad_token_id=0, eos_token_id=None)
    assert torch.equal(ours, theirs[:, 6:])


def test_state_dict_round_trip_and_config_mapping():
    model = tiny(n_kv_heads=1, tie_embeddings=False)
    hf = to_hf_llama(model)
    back = from_hf_llama_state_dict(hf.state_dict(), model.cfg)
    for name, tensor in model.state_dict().items():
        assert torch.equal(back[name], tensor), name
    cfg = model_config_from_hf(hf.config)
    for field in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "max_seq_len",
                  "rope_theta", "norm_eps", "tie_embeddings"):
        assert getattr(cfg, field) == getattr(model.cfg, field), field
    assert cfg.ffn_hidden == hf_llama_config(model.cfg).intermediate_size == 192


def test_gpt2_arch_is_refused():
    with pytest.raises(ValueError, match="arch"):
        hf_llama_config(ModelConfig(arch="gpt2"))


def test_memory_slots_are_refused_but_a_policy_head_is_not():
    with pytest.raises(ValueError, match="memory"):
        hf_llama_config(ModelConfig(governance=True, memory=True))
    hf_llama_config(ModelConfig(governance=True, memory=False, policy=True))
