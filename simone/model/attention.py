"""Causal self-attention through `scaled_dot_product_attention`, with a static KV cache.

One module serves both architectures: the Llama-style model rotates q and k with RoPE and
may share key/value heads between query heads (grouped-query attention, `n_kv_heads`); the
GPT-2 baseline passes no RoPE tables and uses biases. PyTorch picks the fastest kernel the
device has (flash / memory-efficient on CUDA, the fused flash kernel on CPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from simone.model.layers import apply_rope


class KVCache:
    """Keys and values of every layer for positions [0, max_len), preallocated once.

    k[layer] and v[layer] are [batch, n_kv_heads, max_len, head_dim]. A forward call with
    `start_pos=p` on T tokens writes positions p..p+T-1 and attends over 0..p+T-1, so the
    caller feeds the prompt once and then one token at a time.
    """

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, head_dim: int,
                 max_len: int, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None):
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.max_len = max_len
        self.batch_size = batch_size
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor,
               start_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, n_kv_heads, T, head_dim] at start_pos; return all keys/values so far."""
        batch, _, n_new, _ = k.shape
        end = start_pos + n_new
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; asked to write up to {end}")
        if batch > self.batch_size:
            raise ValueError(f"KV cache was made for batch {self.batch_size}, got batch {batch}")
        cache_k, cache_v = self.k[layer], self.v[layer]
        if batch != self.batch_size:
            cache_k, cache_v = cache_k[:batch], cache_v[:batch]
        cache_k[:, :, start_pos:end] = k
        cache_v[:, :, start_pos:end] = v
        return cache_k[:, :, :end], cache_v[:, :, :end]


class CausalSelfAttention(nn.Module):
    """Multi-head (or grouped-query) causal attention with one fused q/k/v projection.

    `wqkv` holds [W_q; W_k; W_v] stacked on the output dimension: one matmul instead of
    three. `wo` maps the concatenated heads back to the model width.
    """

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, dropout: float = 0.0,
                 bias: bool = False):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"dim {dim} is not divisible by n_heads {n_heads}")
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads {n_heads} is not divisible by n_kv_heads {n_kv_heads}")
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = dim // n_heads
        self.dropout = dropout
        self.wqkv = nn.Linear(dim, (n_heads + 2 * n_kv_heads) * self.head_dim, bias=bias)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                kv_cache: KVCache | None = None, layer: int = 0,
                start_pos: int = 0) -> torch.Tensor:
        """x [B, T, dim] → [B, T, dim]; `rope` = (cos, sin) for positions start_pos..+T."""
        batch, n_new, _ = x.shape
        n_q, n_kv = self.n_heads, self.n_kv_heads
        qkv = self.wqkv(x).view(batch, n_new, n_q + 2 * n_kv, self.head_dim)
        # split, not slicing: its backward is one concatenation, not zero-filled copies.
        qk, v = qkv.split([n_q + n_kv, n_kv], dim=2)
        if rope is not None:
            qk = apply_rope(qk, *rope)  # q and k rotated together: one pass over both
        q, k = qk.split([n_q, n_kv], dim=2)
        # [B, T, heads, head_dim] → [B, heads, T, head_dim]: views, SDPA accepts the strides.
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

        attn_mask, is_causal = None, True
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v, start_pos)
            if k.dtype != q.dtype:  # a cache made in another dtype than autocast's
                k, v = k.to(q.dtype), v.to(q.dtype)
            if n_new == 1:
                is_causal = False  # one new query may see every cached position
            elif start_pos > 0:
                # Queries at start_pos..start_pos+T-1 against keys 0..start_pos+T-1:
                # is_causal would align the mask top-left, so spell it out.
                is_causal = False
                q_pos = torch.arange(start_pos, start_pos + n_new, device=x.device)
                attn_mask = torch.arange(start_pos + n_new, device=x.device) <= q_pos[:, None]
        # Future extension (governance memory): persistent memory K/V would be concatenated
        # to k, v here, before the causal positions.
        if n_kv != n_q:
            k = k.repeat_interleave(n_q // n_kv, dim=1)
            v = v.repeat_interleave(n_q // n_kv, dim=1)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
        )
        y = y.transpose(1, 2).reshape(batch, n_new, n_q * self.head_dim)
        return self.resid_dropout(self.wo(y))
