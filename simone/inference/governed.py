"""Governed generation and streaming evaluation: generation through a `StreamingKVCache`
(any length, constant memory) with policy steering and attention trace, and the negative
log-likelihood of a long text read the same way.

The parts they use (policy head, memory slots, `AttentionRecorder`) live in
simone/model/governance.py; this module only drives a built model.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from simone.model.attention import StreamingKVCache
from simone.model.governance import AttentionRecorder, trace_layers, uses_trace
from simone.model.sampling import sample_next_token


@dataclass
class GenStep:
    """One generated token and what governance knows about it."""

    token: int
    prob: float  # the model's probability of the token (temperature 1, before filtering)
    entropy: float  # of that distribution, in nats
    sources: list[tuple[int, float]] | None = None  # (text position, attention weight), best first
    memory_weight: float | None = None  # attention mass on the memory slots
    policy: list[float] | None = None  # domain distribution of the text including this token


def new_streaming_cache(model: nn.Module, batch_size: int, capacity: int | None = None,
                        keep_first: int = 0, evict_chunk: int | None = None,
                        device: torch.device | None = None) -> StreamingKVCache:
    """A `StreamingKVCache` shaped for `model` (capacity defaults to max_seq_len)."""
    cfg = model.cfg
    if cfg.arch != "llama":
        raise ValueError("streaming needs RoPE (model.arch=llama); the GPT-2 baseline has "
                         "absolute positions")
    attn = model.layers[0].attention
    param = model.tok_embeddings.weight
    capacity = min(capacity or cfg.max_seq_len, cfg.max_seq_len)
    return StreamingKVCache(len(model.layers), batch_size, attn.n_kv_heads, attn.head_dim, capacity,
                            keep_first=keep_first, evict_chunk=evict_chunk, rope_theta=cfg.rope_theta,
                            device=device or param.device, dtype=param.dtype)


def _feed(model: nn.Module, cache: StreamingKVCache, ids: torch.Tensor,
          recorder: AttentionRecorder | None):
    """Run ids [R, n] through the model at the cache's next slots; return (last logits [R, V],
    policy probs [R, D] or None, attention [R, n_mem + S] or None, slot positions [S])."""
    start = cache.reserve(ids.size(1))
    logits, _, policy_logits = model(ids, kv_cache=cache, start_pos=start, last_logits_only=True,
                                     return_policy=True)
    policy = None if policy_logits is None else policy_logits[:, -1].float().softmax(-1)
    attn = recorder.weights() if recorder is not None else None
    return logits[:, -1].float(), policy, attn, cache.positions[: cache.length].clone()


def _sources(attn_row: torch.Tensor, positions: torch.Tensor, n_memory: int,
             top: int) -> tuple[list[tuple[int, float]], float]:
    token_weights = attn_row[n_memory:]
    k = min(top, token_weights.numel())
    w, slot = torch.topk(token_weights, k)
    sources = [(int(positions[s]), float(x)) for s, x in zip(slot.tolist(), w.tolist())]
    return sources, float(attn_row[:n_memory].sum())


def _guided_pick(cand_logp: torch.Tensor, domain_prob: torch.Tensor | None, weight: float, temperature: float,
                 generator: torch.Generator | None) -> torch.Tensor:
    """Which of the candidates (last dim) to take: by log p_lm(c) + weight · log p_policy(d | text + c),
    greedy at temperature <= 0, else drawn from the softmax at `temperature`."""
    score = cand_logp if weight <= 0 else cand_logp + weight * domain_prob.clamp_min(1e-12).log()
    if temperature <= 0:
        return score.argmax(-1)
    return torch.multinomial((score / temperature).softmax(-1), 1, generator=generator)[..., 0]


@torch.no_grad()
def governed_generate(model: nn.Module, prompt_ids: list[int], max_new_tokens: int,
                      temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                      generator: torch.Generator | None = None, eos_id: int | None = None,
                      guidance_domain: int | None = None, guidance_weight: float = 0.0,
                      guidance_top_k: int = 8, trace: bool = False, trace_top: int = 5,
                      keep_first: int = 0) -> Iterator[GenStep]:
    """Generate after `prompt_ids` with a streaming KV cache (any length, constant memory).

    guidance_weight W > 0 with guidance_domain d: the `guidance_top_k` most likely next tokens
    are each fed to the model as rows of one batch, and the token is drawn from
    softmax((log p_lm(c) + W · log p_policy(d | text + c)) / temperature) over them
    (argmax at temperature 0); the winner's keys are copied to every row. trace=True records
    the attention of the query that produced each token (blocks `model.trace_layers`).
    Without guidance, sampling is `sample_next_token` (temperature, top-k, top-p).
    """
    cfg = model.cfg
    if not prompt_ids:
        raise ValueError("governed_generate needs at least one prompt token (e.g. the eod token)")
    guided = guidance_domain is not None and guidance_weight > 0
    if guided and model.policy_head is None:
        raise ValueError("policy guidance needs a model trained with the policy head "
                         "(model.governance=true, model.policy=true)")
    if trace and not uses_trace(cfg):
        raise ValueError("this model was configured with model.trace=false")
    rows = max(1, guidance_top_k) if guided else 1
    device = model.tok_embeddings.weight.device
    cache = new_streaming_cache(model, rows, keep_first=keep_first, device=device)
    n_memory = model.layers[0].attention.n_memory
    recorder = AttentionRecorder(model, trace_layers(cfg)) if trace else None
    with recorder if recorder is not None else contextlib.nullcontext():
        # Prompt: chunks that fit the cache's evictable room, batch 1 (rows 1.. copied after).
        chunk = cache.capacity - cache.keep_first
        prompt = torch.tensor([prompt_ids], dtype=torch.long, device=device)
        for lo in range(0, prompt.size(1), chunk):
            logits, policy, attn, positions = _feed(model, cache, prompt[:, lo : lo + chunk], recorder)
        if rows > 1:
            for k, v in zip(cache.k, cache.v):
                k[1:, : cache.length] = k[:1, : cache.length]
                v[1:, : cache.length] = v[:1, : cache.length]
        logits, attn = logits[0], None if attn is None else attn[0]
        for _ in range(max_new_tokens):
            log_probs = F.log_softmax(logits, dim=-1)
            if guided:
                cand_logp, cand = torch.topk(log_probs, rows)
                c_logits, c_policy, c_attn, c_positions = _feed(model, cache, cand[:, None], recorder)
                pick = int(_guided_pick(cand_logp, c_policy[:, guidance_domain], guidance_weight, temperature,
                                        generator))
                token = int(cand[pick])
                slot = cache.length - 1
                for k, v in zip(cache.k, cache.v):  # every row continues from the winner
                    k[:, slot] = k[pick, slot]
                    v[:, slot] = v[pick, slot]
                running, count = cache.policy_state
                cache.policy_state = (running[pick : pick + 1], count)
                next_logits, next_policy = c_logits[pick], c_policy[pick]
                next_attn = None if c_attn is None else c_attn[pick]
            else:
                token = int(sample_next_token(logits[None], temperature, top_k, top_p, generator)[0, 0])
                n_logits, n_policy, n_attn, c_positions = _feed(
                    model, cache, torch.tensor([[token]], device=device), recorder)
                next_logits = n_logits[0]
                next_policy = None if n_policy is None else n_policy[0]
                next_attn = None if n_attn is None else n_attn[0]
            step = GenStep(token=token, prob=float(log_probs[token].exp()),
                           entropy=float(-(log_probs.exp() * log_probs).nan_to_num().sum()),
                           policy=None if next_policy is None else next_policy.tolist())
            if attn is not None:
                step.sources, step.memory_weight = _sources(attn, positions, n_memory, trace_top)
            yield step
            if eos_id is not None and token == eos_id:
                return
            logits, attn, positions = next_logits, next_attn, c_positions


@torch.no_grad()
def guided_sample_batch(model: nn.Module, prompt_ids: list[int], n: int, max_new_tokens: int,
                        guidance_domain: int, guidance_weight: float, guidance_top_k: int = 8,
                        temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """`n` samples after the same prompt, each step drawn as `governed_generate` draws a guided
    token, for all samples at once: the `guidance_top_k` (K) most likely next tokens of every
    sample are fed as one batch of n·K rows, and each sample draws from
    softmax((log p_lm(c) + W · log p_policy(d | text + c)) / temperature) over its K. W = 0 is
    the same sampler without the policy (top-K sampling), the reference that isolates what the
    policy adds. Returns the new token ids [n, max_new_tokens] (the caller cuts at eod).
    The text must fit the context: prompt + max_new_tokens <= model.cfg.max_seq_len."""
    if model.policy_head is None and guidance_weight > 0:
        raise ValueError("policy guidance needs a model trained with the policy head "
                         "(model.governance=true, model.policy=true)")
    if len(prompt_ids) + max_new_tokens > model.cfg.max_seq_len:
        raise ValueError(f"{len(prompt_ids)} prompt + {max_new_tokens} new tokens exceed the context "
                         f"({model.cfg.max_seq_len})")
    k = max(1, guidance_top_k)
    rows = n * k
    device = model.tok_embeddings.weight.device
    cache = new_streaming_cache(model, rows, device=device)
    prompt = torch.tensor([prompt_ids] * rows, dtype=torch.long, device=device)
    logits, _, _, _ = _feed(model, cache, prompt, None)
    logits = logits.view(n, k, -1)[:, 0]  # every row read the same prompt
    samples = torch.arange(n, device=device)
    out = torch.empty(n, max_new_tokens, dtype=torch.long, device=device)
    for step in range(max_new_tokens):
        cand_logp, cand = torch.topk(F.log_softmax(logits, dim=-1), k, dim=-1)  # [n, K]
        c_logits, c_policy, _, _ = _feed(model, cache, cand.reshape(rows, 1), None)
        domain_prob = None if c_policy is None else c_policy[:, guidance_domain].view(n, k)
        pick = _guided_pick(cand_logp, domain_prob, guidance_weight, temperature, generator)
        out[:, step] = cand[samples, pick]
        # every row of a sample continues from its winner: its keys, values and policy state
        slot, winner = cache.length - 1, samples * k + pick
        for kk, vv in zip(cache.k, cache.v):
            kk[:, slot] = kk[winner, slot].repeat_interleave(k, dim=0)
            vv[:, slot] = vv[winner, slot].repeat_interleave(k, dim=0)
        if cache.policy_state is not None:
            running, count = cache.policy_state
            cache.policy_state = (running[winner].repeat_interleave(k, dim=0), count)
        logits = c_logits[winner]
    return out


@torch.no_grad()
def streaming_nll(model: nn.Module, tokens: torch.Tensor, chunk: int = 16, keep_first: int = 0,
                  capacity: int | None = None, evict_chunk: int | None = None) -> dict:
    """Read a long token sequence [N] through a `StreamingKVCache` (N may far exceed
    max_seq_len); return {"nll_sum" (nats), "n_tokens", "ppl", "cache_bytes" (constant),
    "max_slots"}. Each token is predicted from the cache (memory slots + first + recent)."""
    device = model.tok_embeddings.weight.device
    cache = new_streaming_cache(model, 1, capacity=capacity, keep_first=keep_first,
                                evict_chunk=evict_chunk, device=device)
    chunk = max(1, min(chunk, cache.capacity - cache.keep_first))
    tokens = tokens.to(device=device, dtype=torch.long).view(1, -1)
    nll = torch.zeros((), dtype=torch.float64, device=device)
    max_slots = 0
    cache_bytes = cache.nbytes()
    for lo in range(0, tokens.size(1) - 1, chunk):
        x = tokens[:, lo : min(lo + chunk, tokens.size(1) - 1)]
        y = tokens[:, lo + 1 : lo + 1 + x.size(1)]
        start = cache.reserve(x.size(1))
        logits, _ = model(x, kv_cache=cache, start_pos=start)
        nll += F.cross_entropy(logits[0].float(), y[0], reduction="sum").double()
        max_slots = max(max_slots, cache.length)
        if cache.nbytes() != cache_bytes:  # what streaming promises: memory that does not grow
            raise RuntimeError(f"the bounded KV cache grew from {cache_bytes} to {cache.nbytes()} bytes")
    n = tokens.size(1) - 1
    total = float(nll)
    return {"nll_sum": total, "n_tokens": n, "ppl": math.exp(min(total / max(n, 1), 50.0)),
            "cache_bytes": cache_bytes, "max_slots": max_slots}
