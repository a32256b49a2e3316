"""One decoding step of the plain Llama-style model, without module dispatch.

Generating a token at a small model size costs more in Python and operator dispatch than
in arithmetic: each `nn.Module` call, each check on the way, and each matrix-vector
product (which streams the weights through the caches the next call needs) adds up. This
path runs the same operations as `Transformer.forward` with a KV cache, on the same helper
functions (so its results equal the module path's: tests/test_model.py), but as one flat
loop over prepared weights. Measured at the cpu preset shape, 2 threads, against
`transformers` generate: greedy float32 decoding 1.40–1.45× → 1.71–1.87× at batch 1,
1.55–1.60× → 1.83–1.96× at batch 8.

It serves only what it can serve exactly: a `Transformer` without governance parts or levers
that change its computation (`architecture_levers`), positions within the cache, eval mode.
`LanguageModel.generate` picks it by `supports`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from simone.config import architecture_levers
from simone.model.attention import KVCache
from simone.model.cpu_blas import rows_matmul
from simone.model.layers import rotary_qkv

# `model` below is a `Transformer`, read by attribute: typed Any, as this module cannot import the
# model classes (their base, base.py, imports it).


@dataclass
class LayerWeights:
    attention_norm: torch.Tensor
    wqkv: torch.Tensor  # [dim, (n_q + 2·n_kv)·head_dim]: laid out for x @ w
    wo: torch.Tensor
    ffn_norm: torch.Tensor
    w13: torch.Tensor
    w2: torch.Tensor


@dataclass
class DecodePlan:
    """The model's weights as the decoding step reads them (made by `plan_for`)."""

    layers: list[LayerWeights]
    embedding: torch.Tensor
    norm: torch.Tensor
    output: torch.Tensor  # [dim, vocab]
    eps: float
    n_heads: int
    n_kv_heads: int
    head_dim: int


def supports(model: Any, cache: KVCache | None) -> bool:
    """Whether `decode_step` computes exactly what `model` would for one new token (on a
    CPU, where the dispatch it saves matters; a GPU wants CUDA graphs for the same)."""
    return (
        getattr(type(model), "flat_decoding", False)
        and not model.cfg.governance
        and not architecture_levers(model.cfg)
        and not model.training
        and type(cache) is KVCache
        and model.output.weight.device.type == "cpu"
        # a forward set on the instance (torch.compile'd) is what the caller asked to run
        and "forward" not in vars(model)
        # sharded parameters (FSDP2 DTensors) are gathered only by the modules' hooks
        and all(type(p.data) is torch.Tensor for p in model.parameters())
    )


def plan_for(model: Any) -> DecodePlan:
    """The weights of a plain `Transformer` for `decode_step`: the norms as they are, each
    projection as its Linear's [in, out] decoding copy (cached across calls)."""
    layers = [
        LayerWeights(
            block.attention_norm.weight,
            block.attention.wqkv.decode_weight(),
            block.attention.wo.decode_weight(),
            block.ffn_norm.weight,
            block.feed_forward.w13.decode_weight(),
            block.feed_forward.w2.decode_weight(),
        )
        for block in model.layers
    ]
    attn = model.layers[0].attention
    return DecodePlan(
        layers,
        model.tok_embeddings.weight,
        model.norm.weight,
        model.output.decode_weight(),
        model.cfg.norm_eps,
        attn.n_heads,
        attn.n_kv_heads,
        attn.head_dim,
    )


def decode_step(model: Any, plan: DecodePlan, tokens: torch.Tensor, cache: KVCache, pos: int) -> torch.Tensor:
    """Logits [B, vocab] of the token after `tokens` [B, 1] at position `pos`, whose keys and
    values are added to `cache` (which holds positions 0..pos-1)."""
    batch = tokens.size(0)
    n_q, n_kv, head_dim = plan.n_heads, plan.n_kv_heads, plan.head_dim
    dim = plan.embedding.size(1)
    cos, sin = model.rope_cos[pos : pos + 1], model.rope_sin[pos : pos + 1]
    h = F.embedding(tokens, plan.embedding)  # [B, 1, dim]
    for i, layer in enumerate(plan.layers):
        x = F.rms_norm(h, (dim,), layer.attention_norm, plan.eps)
        qkv = rows_matmul(x, layer.wqkv).view(batch, 1, n_q + 2 * n_kv, head_dim)
        q, k, v = rotary_qkv(qkv, cos, sin, n_q, n_kv)
        k, v = cache.update(i, k, v, pos)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), enable_gqa=n_kv != n_q
        )
        h = h + rows_matmul(y.view(batch, 1, dim), layer.wo)  # [B, heads, 1, hd] is [B, 1, dim] in memory
        gate, up = rows_matmul(F.rms_norm(h, (dim,), layer.ffn_norm, plan.eps), layer.w13).chunk(2, dim=-1)
        h = h + rows_matmul(F.silu(gate) * up, layer.w2)
    return rows_matmul(F.rms_norm(h, (dim,), plan.norm, plan.eps), plan.output)[:, -1]
