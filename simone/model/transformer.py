"""Enhanced SIM-ONE: a Llama-style decoder-only transformer in plain PyTorch.

    tokens → embedding → n_layers × [x + attn(RMSNorm(x)); x + SwiGLU(RMSNorm(x))] → RMSNorm
           → output projection (tied to the embedding) → logits

Attention rotates q and k with RoPE, may use fewer key/value heads than query heads
(grouped-query attention) and runs through `scaled_dot_product_attention`. Parameter names
map one-to-one onto Hugging Face `LlamaForCausalLM` (`simone/inference/export.py`).

With `cfg.governance` (simone/model/governance_heads.py) the model also gets learned memory slots
in every attention layer and a policy head on the hidden states of block `policy_layer`;
its training loss becomes the comprehensive (multi-objective) loss. With governance off
none of these exist: the parameters, logits and loss are the plain model's.

Levers of nanochat's recipe, each off by default (and then absent: the default model is the
plain one, weights and all): `mlp="relu2"` (layers.ReluSquared for SwiGLU), `qk_norm`,
`value_embeddings` (token tables of their own, `value_embeds`, mixed into the attention values
of every other block from the last: attention.py), `zero_init_proj` (the blocks' wo and w2 start
at zero, so each block starts as the identity) and `logit_softcap` (base.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from simone.config import ModelConfig, value_embedding_layers
from simone.model.attention import CausalSelfAttention, KVCache
from simone.model.base import LanguageModel
from simone.model.governance_heads import PolicyHead, check_governance_config, governance_loss, uses_memory, uses_policy
from simone.model.layers import Linear, ReluSquared, RMSNorm, SwiGLU, rope_tables, swiglu_hidden_dim


class TransformerBlock(nn.Module):
    """Pre-norm block: attention then SwiGLU (or ReLU²), each added to the residual stream."""

    def __init__(self, cfg: ModelConfig, layer: int, value_gate_channels: int = 0):
        super().__init__()
        self.layer = layer  # index into the KV cache
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = CausalSelfAttention(
            cfg.dim,
            cfg.n_heads,
            cfg.n_kv_heads or cfg.n_heads,
            cfg.dropout,
            bias=False,
            qk_norm_eps=cfg.norm_eps if cfg.qk_norm else None,
            value_gate_channels=value_gate_channels,
        )
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward: SwiGLU | ReluSquared
        if cfg.mlp == "relu2":
            self.feed_forward = ReluSquared(cfg.dim, cfg.ffn_hidden or 4 * cfg.dim, cfg.dropout)
        else:
            hidden = swiglu_hidden_dim(cfg.dim, cfg.ffn_hidden, cfg.multiple_of)
            self.feed_forward = SwiGLU(cfg.dim, hidden, cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv_cache: KVCache | None,
        start_pos: int,
        value_embedding: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), rope, kv_cache, self.layer, start_pos, value_embedding)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(LanguageModel):
    """The Llama-style model; see `LanguageModel` for counts, parameter kinds and `generate`."""

    flat_decoding = True  # decode.py mirrors this forward (without governance parts)
    rope_cos: torch.Tensor  # buffers: cos and sin of RoPE for every position
    rope_sin: torch.Tensor

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        valued = value_embedding_layers(cfg)
        gate_channels = min(32, cfg.dim)  # the input channels a value-embedding gate reads (nanochat's 32)
        blocks = [TransformerBlock(cfg, i, gate_channels if i in valued else 0) for i in range(cfg.n_layers)]
        self.layers = nn.ModuleList(blocks)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        kv_width = (cfg.n_kv_heads or cfg.n_heads) * (cfg.dim // cfg.n_heads)
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(cfg.vocab_size, kv_width) for i in valued})
        # RoPE tables for every position, computed once (not saved: they follow from cfg).
        cos, sin = rope_tables(cfg.dim // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        projections = [p for block in blocks for p in (block.attention.wo.weight, block.feed_forward.w2.weight)]
        self.init_weights(projections)
        with torch.no_grad():
            for weight in projections if cfg.zero_init_proj else []:
                weight.zero_()
            for block in blocks:
                if block.attention.ve_gate is not None:
                    block.attention.ve_gate.weight.zero_()  # every gate starts at 2·sigmoid(0) = 1
        # Governance parts are made after the plain init: with the same seed, a governance
        # model starts from exactly the plain model's weights plus its own.
        check_governance_config(cfg)
        self.policy_head: PolicyHead | None = None
        self.policy_layer = -1  # block whose output feeds the policy head (-1: no head)
        self.loss_terms: dict[str, torch.Tensor] = {}  # detached terms of the last training loss
        if uses_memory(cfg):
            for block in blocks:
                block.attention.add_memory(cfg.n_memory_slots)
        if uses_policy(cfg):
            self.policy_head = PolicyHead(cfg.dim, cfg.n_domains, cfg.norm_eps)
            self.policy_layer = cfg.policy_layer % cfg.n_layers

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        start_pos: int = 0,
        last_logits_only: bool = False,
        domain_ids: torch.Tensor | None = None,
        return_policy: bool = False,
    ):
        """idx [B, T] token ids at positions start_pos..start_pos+T-1 → (logits, loss).

        logits [B, T, vocab] (or [B, 1, vocab] with last_logits_only and no targets; None when
        targets are given with gradients on: the fused training loss keeps none); loss is
        the mean cross-entropy against targets [B, T] (-1 ignored), or None without targets.
        With `kv_cache` (from `new_kv_cache`) earlier positions come from the cache.
        Governance: `domain_ids` ([B] or [B, T], -1 unknown) are the policy head's labels;
        with targets, the loss is then the comprehensive loss and `self.loss_terms` holds its
        terms. return_policy=True returns (logits, loss, policy_logits [B, T or 1, n_domains]
        or None).
        """
        n_new = idx.size(1)
        if start_pos + n_new > self.cfg.max_seq_len:
            raise ValueError(f"positions up to {start_pos + n_new} exceed max_seq_len {self.cfg.max_seq_len}")
        h = self.tok_embeddings(idx)
        if self.cfg.dropout and self.training:
            h = F.dropout(h, self.cfg.dropout, training=True)
        positions = slice(start_pos, start_pos + n_new)
        rope = (self.rope_cos[positions], self.rope_sin[positions])
        policy_h = None
        for block in self.layers:
            key = str(block.layer)
            h = block(h, rope, kv_cache, start_pos, self.value_embeds[key](idx) if key in self.value_embeds else None)
            if block.layer == self.policy_layer:
                policy_h = h
        h = self.norm(h)
        logits, loss = self.logits_and_loss(h, targets, last_logits_only)
        if not self.cfg.governance:  # the plain model: nothing more to do
            return (logits, loss, None) if return_policy else (logits, loss)

        policy_logits = None
        if self.policy_head is not None:
            policy_logits = self.policy_head(policy_h, kv_cache, start_pos)
            if last_logits_only and targets is None:
                policy_logits = policy_logits[:, -1:]
        if loss is not None and self.training:
            if domain_ids is None and self.policy_head is not None:
                raise ValueError("model.policy=true: training needs domain_ids (the loader's next_batch_with_domains)")
            loss, self.loss_terms = governance_loss(self.cfg, loss, policy_logits, domain_ids)
        return (logits, loss, policy_logits) if return_policy else (logits, loss)
