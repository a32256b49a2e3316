"""Governed generation and streaming evaluation: generation through a `StreamingKVCache`
(any length, constant memory) with policy steering and attention trace (the decode engine's
`StreamingDecoder`, simone/inference/decoding.py), and the negative log-likelihood of a long
text read the same way.

The parts they use (policy head, memory slots, `AttentionRecorder`) live in
simone/model/governance_heads.py; this module only drives a built model.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from simone.inference.decoding import Guidance, Step, StreamingDecoder, new_streaming_cache, sample_tokens
from simone.model.base import LanguageModel


def governed_generate(
    model: LanguageModel,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    eos_id: int | None = None,
    guidance_domain: int | None = None,
    guidance_weight: float = 0.0,
    guidance_top_k: int = 8,
    trace: bool = False,
    trace_top: int = 5,
    keep_first: int = 0,
) -> Iterator[Step]:
    """Generate after `prompt_ids` with a streaming KV cache (any length, constant memory).

    guidance_weight W > 0 with guidance_domain d: the `guidance_top_k` most likely next tokens
    are each fed to the model as rows of one batch, and the token is drawn from
    softmax((log p_lm(c) + W · log p_policy(d | text + c)) / temperature) over them
    (argmax at temperature 0); the winner's keys are copied to every row. trace=True records
    the attention of the query that produced each token (blocks `model.trace_layers`).
    Without guidance, sampling is `sample_next_token` (temperature, top-k, top-p).
    """
    guidance = None
    if guidance_domain is not None and guidance_weight > 0:
        guidance = Guidance(guidance_domain, guidance_weight, guidance_top_k)
    return sample_tokens(
        model,
        prompt_ids,
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        generator,
        eos_id,
        streaming=True,
        guidance=guidance,
        trace=trace,
        trace_top=trace_top,
        keep_first=keep_first,
    )


@torch.inference_mode()
def guided_sample_batch(
    model: LanguageModel,
    prompt_ids: list[int],
    n: int,
    max_new_tokens: int,
    guidance_domain: int,
    guidance_weight: float,
    guidance_top_k: int = 8,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """`n` samples after the same prompt, each step drawn as `governed_generate` draws a guided
    token, for all samples at once: the `guidance_top_k` (K) most likely next tokens of every
    sample are fed as one batch of n·K rows, and each sample draws from
    softmax((log p_lm(c) + W · log p_policy(d | text + c)) / temperature) over its K. W = 0 is
    the same sampler without the policy (top-K sampling), the reference that isolates what the
    policy adds. Returns the new token ids [n, max_new_tokens] (the caller cuts at eod).
    The text must fit the context: prompt + max_new_tokens <= model.cfg.max_seq_len."""
    decoder = StreamingDecoder(model, n, Guidance(guidance_domain, guidance_weight, guidance_top_k))
    if len(prompt_ids) + max_new_tokens > model.cfg.max_seq_len:
        raise ValueError(
            f"{len(prompt_ids)} prompt + {max_new_tokens} new tokens exceed the context ({model.cfg.max_seq_len})"
        )
    idx = torch.tensor([prompt_ids] * n, dtype=torch.long, device=model.tok_embeddings.weight.device)
    # generate() runs any decoder with feed/pick/logits (see sample_tokens)
    tokens = list(model.generate(idx, max_new_tokens, temperature, generator=generator, decoder=decoder))  # type: ignore[arg-type]
    return torch.cat(tokens, dim=1) if tokens else idx[:, :0]


@torch.no_grad()
def streaming_nll(
    model: LanguageModel,
    tokens: torch.Tensor,
    chunk: int = 16,
    keep_first: int = 0,
    capacity: int | None = None,
    evict_chunk: int | None = None,
) -> dict:
    """Read a long token sequence [N] through a `StreamingKVCache` (N may far exceed
    max_seq_len); return {"nll_sum" (nats), "n_tokens", "ppl", "cache_bytes" (constant),
    "max_slots"}. Each token is predicted from the cache (memory slots + first + recent)."""
    device = model.tok_embeddings.weight.device
    cache = new_streaming_cache(
        model, 1, capacity=capacity, keep_first=keep_first, evict_chunk=evict_chunk, device=device
    )
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
    return {
        "nll_sum": total,
        "n_tokens": n,
        "ppl": math.exp(min(total / max(n, 1), 50.0)),
        "cache_bytes": cache_bytes,
        "max_slots": max_slots,
    }
