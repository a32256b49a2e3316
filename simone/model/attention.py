"""Causal self-attention through `scaled_dot_product_attention`, with a static KV cache.

One module serves both architectures: the Llama-style model rotates q and k with RoPE and
may share key/value heads between query heads (grouped-query attention, `n_kv_heads`); the
GPT-2 baseline passes no RoPE tables and uses biases. PyTorch picks the fastest kernel the
device has (flash / memory-efficient on CUDA, the fused flash kernel on CPU).

Governance memory (optional, `add_memory`): learned persistent key/value slots that every
query attends to besides the causal positions, like attention sinks that the model learns.
Their keys carry no RoPE rotation, so they sit at no position.

Levers of nanochat's recipe (off unless asked): QK-norm (`qk_norm_eps`: queries and keys
RMS-normalised per head, without weights, after RoPE) and a value embedding (`value_gate_channels`:
a per-token vector from a table of the model's, added to the values, times a gate per key/value
head, 2·sigmoid of a projection of the input's first channels; the model starts it at 1).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from simone.model.layers import Linear, apply_rope, rope_tables, rotary_qkv


class KVCache:
    """Keys and values of every layer for positions [0, max_len), preallocated once.

    k[layer] and v[layer] are [batch, max_len, n_kv_heads, head_dim] (the layout the q/k/v
    projection produces, so storing is a plain copy). A forward call with
    `start_pos=p` on T tokens writes positions p..p+T-1 and attends over 0..p+T-1, so the
    caller feeds the prompt once and then one token at a time.
    """

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_kv_heads: int,
        head_dim: int,
        max_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        shape = (batch_size, max_len, n_kv_heads, head_dim)
        self.max_len = max_len
        self.batch_size = batch_size
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        # governance policy head: (running sum of its input [B or 1, dim], count) so far
        self.policy_state: tuple[torch.Tensor, float] | None = None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, T, n_kv_heads, head_dim] at start_pos; return all keys/values so far."""
        batch, n_new = k.shape[:2]
        end = start_pos + n_new
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; asked to write up to {end}")
        if batch > self.batch_size:
            raise ValueError(f"KV cache was made for batch {self.batch_size}, got batch {batch}")
        cache_k, cache_v = self.k[layer], self.v[layer]
        if batch != self.batch_size:
            cache_k, cache_v = cache_k[:batch], cache_v[:batch]
        cache_k[:, start_pos:end] = k
        cache_v[:, start_pos:end] = v
        return cache_k[:, :end], cache_v[:, :end]


class StreamingKVCache(KVCache):
    """A KV cache of constant size for generating (or reading) past max_seq_len.

    It keeps the first `keep_first` tokens and the most recent ones and evicts the middle,
    `evict_chunk` tokens at a time, so memory stays `capacity` slots however long the text.
    The memory slots of a governance model are not in the cache (the attention adds them to
    every step), so they always survive eviction.

    RoPE positions are cache slots, not positions in the text: a caller asks `reserve(n)`
    for the slot to pass as `start_pos`. When the middle is evicted the recent keys move E
    slots left and are rotated back by E positions (rotations compose exactly), so their
    distance to every later query is what it would have been without eviction, and no
    distance ever exceeds what the model saw in training. `positions[s]` is the text
    position of the token in slot s (for traces).
    """

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_kv_heads: int,
        head_dim: int,
        capacity: int,
        keep_first: int = 0,
        evict_chunk: int | None = None,
        rope_theta: float | None = 10000.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        if not 0 <= keep_first < capacity:
            raise ValueError(f"keep_first={keep_first} must be in [0, capacity={capacity})")
        super().__init__(n_layers, batch_size, n_kv_heads, head_dim, capacity, device, dtype)
        self.capacity = capacity
        self.keep_first = keep_first
        self.evict_chunk = max(1, evict_chunk if evict_chunk is not None else capacity // 16)
        self.rope_theta = rope_theta  # None: keys carry no rotation (nothing to undo)
        self.head_dim = head_dim
        self.length = 0  # slots in use
        self.n_seen = 0  # tokens written so far (the text position of the next one)
        self.positions = torch.zeros(capacity, dtype=torch.long)

    def reserve(self, n_new: int) -> int:
        """Make room for n_new tokens (evicting the oldest middle ones if needed); return
        the slot to pass as `start_pos` to the model's forward."""
        if self.length + n_new > self.capacity:
            room = self.capacity - self.keep_first
            if n_new > room:
                raise ValueError(
                    f"cannot write {n_new} tokens at once into a streaming cache with {room} evictable slots"
                )
            n_evict = min(max(self.length + n_new - self.capacity, self.evict_chunk), self.length - self.keep_first)
            self._evict(n_evict)
        start = self.length
        self.length += n_new
        self.positions[start : self.length] = torch.arange(self.n_seen, self.n_seen + n_new)
        self.n_seen += n_new
        return start

    def _evict(self, n: int) -> None:
        lo, hi = self.keep_first, self.length
        rotate_back = None
        if self.rope_theta is not None:
            cos, sin = rope_tables(self.head_dim, n + 1, self.rope_theta)
            rotate_back = (cos[n:], -sin[n:])  # rotation by -n positions
        for layer in range(len(self.k)):
            kept_k = self.k[layer][:, lo + n : hi]
            if rotate_back is not None:
                kept_k = apply_rope(kept_k.float(), *rotate_back).to(kept_k.dtype)
            self.k[layer][:, lo : hi - n] = kept_k.clone()
            self.v[layer][:, lo : hi - n] = self.v[layer][:, lo + n : hi].clone()
        self.positions[lo : hi - n] = self.positions[lo + n : hi].clone()
        self.length -= n

    def nbytes(self) -> int:
        """Bytes held by the key/value buffers (constant for the cache's lifetime)."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class CausalSelfAttention(nn.Module):
    """Multi-head (or grouped-query) causal attention with one fused q/k/v projection.

    `wqkv` holds [W_q; W_k; W_v] stacked on the output dimension: one matmul instead of
    three. `wo` maps the concatenated heads back to the model width. `ve_gate` (value embeddings
    only) maps the input's first `value_gate_channels` channels to one gate per key/value head.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: int,
        dropout: float = 0.0,
        bias: bool = False,
        qk_norm_eps: float | None = None,
        value_gate_channels: int = 0,
    ):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"dim {dim} is not divisible by n_heads {n_heads}")
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads {n_heads} is not divisible by n_kv_heads {n_kv_heads}")
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = dim // n_heads
        self.dropout = dropout
        self.wqkv = Linear(dim, (n_heads + 2 * n_kv_heads) * self.head_dim, bias=bias)
        self.wo = Linear(n_heads * self.head_dim, dim, bias=bias)
        self.register_parameter("memory_k", None)  # [n_slots, n_kv_heads, head_dim] or None
        self.register_parameter("memory_v", None)
        self.qk_norm_eps = qk_norm_eps  # None: no QK-norm
        self.ve_gate = Linear(value_gate_channels, n_kv_heads, bias=False) if value_gate_channels else None

    def add_memory(self, n_slots: int, std: float = 0.02) -> None:
        """Give this layer `n_slots` learned key/value slots (governance memory)."""
        shape = (n_slots, self.n_kv_heads, self.head_dim)
        device = self.wqkv.weight.device
        self.memory_k = nn.Parameter(torch.randn(shape, device=device) * std)
        self.memory_v = nn.Parameter(torch.randn(shape, device=device) * std)

    @property
    def n_memory(self) -> int:
        return 0 if self.memory_k is None else self.memory_k.size(0)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        kv_cache: KVCache | None = None,
        layer: int = 0,
        start_pos: int = 0,
        value_embedding: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, T, dim] → [B, T, dim]; `rope` = (cos, sin) for positions start_pos..+T;
        `value_embedding` [B, T, n_kv_heads·head_dim]: this layer's value embedding of the tokens."""
        batch, n_new, _ = x.shape
        n_q, n_kv = self.n_heads, self.n_kv_heads
        qkv = self.wqkv(x).view(batch, n_new, n_q + 2 * n_kv, self.head_dim)
        if rope is not None:  # q and k rotated together; the backward writes d(qkv) at once
            q, k, v = rotary_qkv(qkv, *rope, n_q, n_kv)
        else:  # split, not slicing: its backward is one concatenation, not zero-filled copies
            q, k, v = qkv.split([n_q, n_kv, n_kv], dim=2)
        if self.qk_norm_eps is not None:
            q, k = self._qk_norm(q), self._qk_norm(k)
        if self.ve_gate is not None and value_embedding is not None:
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., : self.ve_gate.in_features]))  # [B, T, n_kv]
            v = v + gate.unsqueeze(-1) * value_embedding.view_as(v).to(v.dtype)

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
        n_pad = 0
        if self.memory_k is not None:
            q, k, v, attn_mask, n_pad = self._prepend_memory(q, k, v, attn_mask, is_causal)
        # [B, T, heads, head_dim] → [B, heads, T, head_dim]: views, SDPA accepts the strides.
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=n_kv != n_q,  # kv head j serves query heads j·g..(j+1)·g-1, no copies
        )
        if n_pad:
            y = y[:, :, n_pad:]
        y = y.transpose(1, 2).reshape(batch, n_new, n_q * self.head_dim)
        y = self.wo(y)
        if self.dropout and self.training:  # checked here: a module call costs µs per token
            y = F.dropout(y, self.dropout, training=True)
        return y

    def _qk_norm(self, x: torch.Tensor) -> torch.Tensor:
        """RMS-normalise each head of x [B, T, heads, head_dim], no weights; in x's dtype (SDPA
        wants q, k and v in one, and autocast may run the norm in float32)."""
        return F.rms_norm(x, (self.head_dim,), eps=self.qk_norm_eps).to(x.dtype)

    def _prepend_memory(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool
    ):
        """Put the memory slots in front of the keys and values ([B, S, heads, head_dim]).

        Every query may see every slot. Under `is_causal` (no cache offset) the queries get
        as many zero rows in front, so SDPA's top-left-aligned causal mask lets query i
        (now row M+i) see the M slots and tokens 0..i; the padded rows are dropped after.
        An explicit mask gets M all-true columns. Returns (q, k, v, attn_mask, n_pad).
        """
        batch, n_slots = q.size(0), self.memory_k.size(0)
        mem_k = self.memory_k.to(k.dtype).expand(batch, -1, -1, -1)
        mem_v = self.memory_v.to(v.dtype).expand(batch, -1, -1, -1)
        k, v = torch.cat((mem_k, k), dim=1), torch.cat((mem_v, v), dim=1)
        n_pad = 0
        if is_causal:
            q = torch.cat((q.new_zeros(batch, n_slots, *q.shape[2:]), q), dim=1)
            n_pad = n_slots
        elif attn_mask is not None:
            attn_mask = torch.cat((attn_mask.new_ones(attn_mask.size(0), n_slots), attn_mask), dim=1)
        return q, k, v, attn_mask, n_pad

    @torch.no_grad()
    def attention_weights(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        kv_cache: KVCache | None = None,
        layer: int = 0,
        start_pos: int = 0,
        value_embedding: torch.Tensor | None = None,  # the forward's; values do not change the weights
    ) -> torch.Tensor:
        """Attention probabilities of the LAST query of x, [B, n_heads, n_memory + n_keys].

        Columns: the memory slots (if any), then key positions 0..start_pos+T-1 (cache slots
        when a cache is given). Call it with the arguments of a forward that already ran
        (the cache then holds this call's keys). For tracing only: the forward never
        materialises these weights.
        """
        batch, n_new, _ = x.shape
        n_q, n_kv = self.n_heads, self.n_kv_heads
        qkv = self.wqkv(x).view(batch, n_new, n_q + 2 * n_kv, self.head_dim)
        qk, _ = qkv.split([n_q + n_kv, n_kv], dim=2)
        if rope is not None:
            qk = apply_rope(qk, *rope)
        q, k = qk.split([n_q, n_kv], dim=2)
        if self.qk_norm_eps is not None:
            q, k = self._qk_norm(q), self._qk_norm(k)
        if kv_cache is not None:
            k = kv_cache.k[layer][:batch, : start_pos + n_new]
        if self.memory_k is not None:
            k = torch.cat((self.memory_k.to(k.dtype).expand(batch, -1, -1, -1), k), dim=1)
        k = k.float().repeat_interleave(n_q // n_kv, dim=2)  # [B, S, n_heads, head_dim]
        scores = torch.einsum("bhd,bshd->bhs", q[:, -1].float(), k) / math.sqrt(self.head_dim)
        return scores.softmax(dim=-1)
