"""MVLM-GPT2: the legacy GPT-2-style baseline, kept to compare against on the same data.

    tokens + learned positions → n_layers × [x + attn(LayerNorm(x)); x + MLP(LayerNorm(x))]
           → LayerNorm → output projection (tied to the embedding) → logits

Differences from the Llama-style model: learned absolute position embeddings instead of
RoPE, LayerNorm with bias instead of RMSNorm, a 4·dim GELU MLP instead of SwiGLU, biases on
every linear layer. Same interface (`LanguageModel`), same attention module and KV cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from simone.config import ModelConfig
from simone.model.attention import CausalSelfAttention, KVCache
from simone.model.base import LanguageModel
from simone.model.layers import Linear


class MLP(nn.Module):
    """proj(gelu(fc(x))), GPT-2's tanh-approximated GELU."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc = Linear(dim, hidden)
        self.proj = Linear(hidden, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(F.gelu(self.fc(x), approximate="tanh"))
        if self.dropout and self.training:
            y = F.dropout(y, self.dropout, training=True)
        return y


class GPT2Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.attention_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attention = CausalSelfAttention(
            cfg.dim, cfg.n_heads, cfg.n_kv_heads or cfg.n_heads, cfg.dropout, bias=True
        )
        self.ffn_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.feed_forward = MLP(cfg.dim, cfg.ffn_hidden or 4 * cfg.dim, cfg.dropout)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None, start_pos: int) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), None, kv_cache, self.layer, start_pos)
        return x + self.feed_forward(self.ffn_norm(x))


class GPT2(LanguageModel):
    """The GPT-2-style baseline; see `LanguageModel` for counts, parameter kinds and `generate`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos_embeddings = nn.Embedding(cfg.max_seq_len, cfg.dim)
        blocks = [GPT2Block(cfg, i) for i in range(cfg.n_layers)]
        self.layers = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.init_weights([p for block in blocks for p in (block.attention.wo.weight, block.feed_forward.proj.weight)])

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        start_pos: int = 0,
        last_logits_only: bool = False,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Same contract as `Transformer.forward`."""
        n_new = idx.size(1)
        if start_pos + n_new > self.cfg.max_seq_len:
            raise ValueError(f"positions up to {start_pos + n_new} exceed max_seq_len {self.cfg.max_seq_len}")
        positions = torch.arange(start_pos, start_pos + n_new, device=idx.device)
        h = self.tok_embeddings(idx) + self.pos_embeddings(positions)
        if self.cfg.dropout and self.training:
            h = F.dropout(h, self.cfg.dropout, training=True)
        for block in self.layers:
            h = block(h, kv_cache, start_pos)
        h = self.norm(h)
        return self.logits_and_loss(h, targets, last_logits_only)
