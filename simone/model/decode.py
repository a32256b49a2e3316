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

`numpy_decode_step` is the same step in NumPy, for float32 weights: a NumPy operation on a few
hundred numbers costs ~1 µs where a PyTorch one costs 5–10, so at the `cpu` preset's shape
(where a token is ~100 small operations) it decodes about twice as fast as `decode_step`
(1.8–3.6× in the runs on an AMD EPYC: `bench/bench_decode_step.py`, README "Decoding speed on a
CPU"). Its
products and sums run in another order (OpenBLAS's, not MKL's): its logits equal the module
path's to float32 rounding, not bit for bit (tests/test_model.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
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


@dataclass
class NumpyPlan:
    """A `DecodePlan` and a KV cache as NumPy arrays sharing their memory (made by `numpy_plan`)."""

    layers: list[tuple[np.ndarray, ...]]  # per layer: LayerWeights' six, in order
    embedding: np.ndarray
    norm: np.ndarray
    output: np.ndarray
    # RoPE as x·cos + x[swap]·sin, with swap exchanging the halves: [max_seq_len, head_dim] each
    rope_cos: np.ndarray  # cos, cos
    rope_sin: np.ndarray  # −sin, sin
    swap: np.ndarray
    keys: list[np.ndarray]  # per layer: [batch, max_len, n_kv_heads, head_dim], the cache's own memory
    values: list[np.ndarray]
    eps: float
    n_heads: int
    n_kv_heads: int
    head_dim: int


def numpy_plan(model: Any, plan: DecodePlan, cache: KVCache) -> NumpyPlan | None:
    """`plan` (`plan_for(model)`) and `cache` as NumPy views for `numpy_decode_step`, or None
    where it does not apply: weights or cache not float32 (NumPy has no bfloat16), or autocast on."""
    layer_weights = [w for layer in plan.layers for w in vars(layer).values()]
    tensors = [plan.embedding, plan.norm, plan.output, cache.k[0], *layer_weights]
    if torch.is_autocast_enabled("cpu") or any(t.dtype is not torch.float32 for t in tensors):
        return None

    def view(t: torch.Tensor) -> np.ndarray:
        return t.detach().numpy()

    cos, sin, half = view(model.rope_cos), view(model.rope_sin), plan.head_dim // 2
    return NumpyPlan(
        [tuple(view(w) for w in vars(layer).values()) for layer in plan.layers],
        view(plan.embedding),
        view(plan.norm),
        view(plan.output),
        np.concatenate((cos, cos), axis=-1),
        np.concatenate((-sin, sin), axis=-1),
        np.r_[half : 2 * half, 0:half],
        [view(k) for k in cache.k],
        [view(v) for v in cache.v],
        plan.eps,
        plan.n_heads,
        plan.n_kv_heads,
        plan.head_dim,
    )


# The step below is ~100 NumPy calls on a few hundred numbers each, where each call's overhead is
# most of its cost: so the reductions are the ufuncs' own (`.sum()` and `.max()` wrap them in
# Python), and RoPE and SiLU are written in as few calls as they take.


def _rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.add.reduce(x * x, axis=-1, keepdims=True) / x.shape[-1] + eps) * weight


def numpy_decode_step(plan: NumpyPlan, tokens: np.ndarray, pos: int) -> np.ndarray:
    """`decode_step` in NumPy: logits [B, vocab] of the token after `tokens` [B] at position
    `pos`, whose keys and values go into the plan's cache (which holds positions 0..pos-1)."""
    batch = tokens.shape[0]
    n_q, n_kv, head_dim = plan.n_heads, plan.n_kv_heads, plan.head_dim
    group, scale = n_q // n_kv, head_dim**-0.5
    cos, sin = plan.rope_cos[pos], plan.rope_sin[pos]
    h = plan.embedding[tokens]  # [B, dim]
    for (attention_norm, wqkv, wo, ffn_norm, w13, w2), keys, values in zip(plan.layers, plan.keys, plan.values):
        qkv = (_rms_norm(h, attention_norm, plan.eps) @ wqkv).reshape(batch, n_q + 2 * n_kv, head_dim)
        qk = qkv[:, : n_q + n_kv]
        qk = qk * cos + qk[..., plan.swap] * sin  # RoPE, half-split (dimension i pairs with i + head_dim/2)
        keys[:batch, pos], values[:batch, pos] = qk[:, n_q:], qkv[:, n_q + n_kv :]
        # each group of n_q / n_kv query heads reads one key/value head (as SDPA's enable_gqa)
        q = qk[:, :n_q].reshape(batch, n_kv, group, head_dim)
        scores = q @ keys[:batch, : pos + 1].transpose(0, 2, 3, 1)  # [B, n_kv, group, pos+1]
        weights = np.exp((scores - np.maximum.reduce(scores, axis=-1, keepdims=True)) * scale)
        weights /= np.add.reduce(weights, axis=-1, keepdims=True)
        y = weights @ values[:batch, : pos + 1].transpose(0, 2, 1, 3)  # [B, n_kv, group, head_dim]
        h = h + y.reshape(batch, n_q * head_dim) @ wo
        gate_up = _rms_norm(h, ffn_norm, plan.eps) @ w13
        half_gate, up = 0.5 * gate_up[:, : w2.shape[0]], gate_up[:, w2.shape[0] :]
        # SiLU: g·sigmoid(g) = (g/2)·(1 + tanh(g/2)), which cannot overflow as exp(−g) can
        h = h + ((half_gate + half_gate * np.tanh(half_gate)) * up) @ w2
    return _rms_norm(h, plan.norm, plan.eps) @ plan.output
