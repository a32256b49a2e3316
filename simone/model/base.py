"""What both architectures share: the output head and loss, weight init, parameter and FLOP
counts, the optimizer, the KV cache and token-by-token generation.

A subclass builds `tok_embeddings`, `layers` (each with `.attention`), `norm` and `output`,
and implements `forward(idx, targets=None, kv_cache=None, start_pos=0) -> (logits, loss)`
(logits None when targets are given with gradients on; see `logits_and_loss`).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from simone.config import ModelConfig
from simone.model import decode
from simone.model.attention import KVCache
from simone.model.loss import linear_cross_entropy
from simone.model.sampling import sample_next_token


class LanguageModel(nn.Module):
    """Base class of `Transformer` (Llama-style) and `GPT2`; not used on its own."""

    cfg: ModelConfig
    tok_embeddings: nn.Embedding
    layers: nn.ModuleList
    output: nn.Linear
    # whether decode.py's flat one-token step computes this architecture exactly (a class
    # flag, so decode.py need not import the model classes)
    flat_decoding: bool = False

    # ------------------------------------------------------------------ construction helpers

    def init_weights(self, residual_projections: list[nn.Parameter]) -> None:
        """nanoGPT init: N(0, 0.02) for matrices and embeddings, zero biases; the matrices
        that write into the residual stream get std 0.02/sqrt(2·n_layers) so the residual
        variance does not grow with depth. Norm weights keep their ones (and zeros)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
        for weight in residual_projections:
            nn.init.normal_(weight, mean=0.0, std=0.02 / math.sqrt(2 * self.cfg.n_layers))

    def logits_and_loss(self, h: torch.Tensor, targets: torch.Tensor | None,
                        last_logits_only: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Final hidden states h [B, T, dim] → logits [B, T, V] and the mean cross-entropy.

        The loss is computed in float32 even under autocast; targets equal to -1 are ignored.
        When gradients are on, the projection and loss are fused (`linear_cross_entropy`):
        the same loss and gradients, but no logits (None is returned in their place); run
        under `torch.no_grad()` to get both.
        """
        if targets is None:
            if last_logits_only:
                h = h[:, -1:]  # generation only needs the next token
            return self.output(h), None
        if torch.is_grad_enabled() and (h.requires_grad or self.output.weight.requires_grad):
            # Training: fused projection + loss (simone/model/loss.py), no logits kept.
            return None, linear_cross_entropy(h, self.output.weight, targets)
        logits = self.output(h)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=-1)
        return logits, loss

    # ------------------------------------------------------------------ counts

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Number of parameters (a tied embedding/output matrix counts once).

        exclude_embeddings=True leaves out the lookup tables that do no matmul work: the
        position embedding (GPT-2) and the token embedding when it is not tied. A tied
        matrix stays, since it is also the output projection.
        """
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            pos = getattr(self, "pos_embeddings", None)
            if pos is not None:
                n -= pos.weight.numel()
            if self.output.weight is not self.tok_embeddings.weight:
                n -= self.tok_embeddings.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward) at sequence length `seq_len`.

        6·N + 12·n_layers·dim·seq_len, the PaLM / nanoGPT convention: 2 FLOPs per parameter
        per token in the forward matmuls and 4 in the backward (N = num_params(
        exclude_embeddings=True)), plus the attention scores and weighted sum (q·kᵀ and
        att·v: 2·2·dim·seq_len FLOPs per layer forward, ×3 with backward). Causal masking
        is not discounted. Used for MFU = flops_per_token · tokens_per_s / peak_flops.
        """
        n = self.num_params(exclude_embeddings=True)
        return 6.0 * n + 12.0 * self.cfg.n_layers * self.cfg.dim * seq_len

    # ------------------------------------------------------------------ optimizer

    def configure_optimizer(self, lr: float, weight_decay: float, betas: tuple[float, float],
                            device_type: str, fused: bool | None = None,
                            embed_lr_scale: float = 1.0) -> torch.optim.AdamW:
        """AdamW with weight decay only on parameters with ≥2 dimensions (matrices,
        embeddings); biases and norm weights are not decayed.

        fused=None: use the fused kernel on CUDA and on CPU (PyTorch ≥ 2.4 has a fused CPU
        AdamW: 3.3 ms against 17.5 ms for the for-each one, one step of the `cpu` preset's
        4.3M parameters on one thread); False switches it off.
        embed_lr_scale ≠ 1: the token embedding (the output head too, when tied) gets its own
        group at that multiple of the learning rate (`set_lr` keeps the ratio).
        """
        params = [p for p in self.parameters() if p.requires_grad]
        groups = adamw_param_groups(params, self.tok_embeddings.weight, lr, weight_decay, embed_lr_scale)
        return new_adamw(groups, lr, betas, device_type, fused)

    # ------------------------------------------------------------------ generation

    def new_kv_cache(self, batch_size: int, max_len: int, device: torch.device | str | None = None,
                     dtype: torch.dtype | None = None) -> KVCache:
        """A preallocated cache for `batch_size` sequences of up to `max_len` positions
        (capped at cfg.max_seq_len). Defaults: the model's device, and its dtype — or the
        autocast dtype when autocast is on."""
        param = self.tok_embeddings.weight
        device = param.device if device is None else torch.device(device)
        if dtype is None:
            dtype = param.dtype
            if torch.is_autocast_enabled(device.type):
                dtype = torch.get_autocast_dtype(device.type)
        attn = self.layers[0].attention
        return KVCache(len(self.layers), batch_size, attn.n_kv_heads, attn.head_dim,
                       min(max_len, self.cfg.max_seq_len), device, dtype)

    @torch.inference_mode()  # like no_grad, minus view and version tracking: a few % per step
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None,
                 generator: torch.Generator | None = None, use_cache: bool = True,
                 eos_id: int | None = None) -> Iterator[torch.Tensor]:
        """Continue the token sequences idx [B, T]; yields each new token [B, 1] as it is made.

        temperature 0 is greedy; `generator` makes sampling repeatable. use_cache=False
        recomputes the whole (cropped) prefix every step. Only the last cfg.max_seq_len
        tokens are ever seen: a longer prompt is cropped. With the cache, once the sequence
        no longer fits in max_seq_len positions, generation falls back to recomputing the last
        max_seq_len tokens each step — the same tokens use_cache=False gives, only slower.
        With eos_id, a row that has produced eos_id keeps producing it, and generation stops
        when every row has. Call model.eval() first (dropout).
        """
        max_len = self.cfg.max_seq_len
        idx = idx[:, -max_len:]
        batch = idx.size(0)
        cache = None
        if use_cache:
            cache = self.new_kv_cache(batch, min(max_len, idx.size(1) + max_new_tokens), idx.device)
        n_cached = 0  # positions of idx already in the cache
        # One token at a time through the flat decoding step where it applies (decode.py).
        plan = decode.plan_for(self) if decode.supports(self, cache) else None
        finished = torch.zeros(batch, 1, dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            if cache is not None and idx.size(1) <= cache.max_len:
                if plan is not None and n_cached > 0:  # exactly one new token
                    logits = decode.decode_step(self, plan, idx[:, n_cached:], cache, n_cached)
                else:
                    logits = self(idx[:, n_cached:], kv_cache=cache, start_pos=n_cached,
                                  last_logits_only=True)[0][:, -1]
                n_cached = idx.size(1)
            else:
                cache = None  # full (or never made): recompute the last max_len tokens
                logits = self(idx[:, -max_len:], last_logits_only=True)[0][:, -1]
            token = sample_next_token(logits, temperature, top_k, top_p, generator)
            if eos_id is not None:
                token = token.masked_fill(finished, eos_id)
                finished |= token == eos_id
            idx = torch.cat((idx, token), dim=1)
            if cache is None:
                idx = idx[:, -max_len:]
            yield token
            if eos_id is not None and bool(finished.all()):
                return


def adamw_param_groups(params: list[nn.Parameter], embedding: nn.Parameter, lr: float, weight_decay: float,
                       embed_lr_scale: float = 1.0) -> list[dict]:
    """AdamW's parameter groups: matrices decayed, vectors (biases, norms) not; with
    `embed_lr_scale` ≠ 1 the embedding gets a decayed group of its own whose `lr_scale` the
    schedule multiplies. Two groups otherwise, so checkpoints written before the option load."""
    apart = embed_lr_scale != 1.0 and any(p is embedding for p in params)
    groups = [{"params": [p for p in params if p.dim() >= 2 and not (apart and p is embedding)],
               "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    if apart:
        groups.append({"params": [embedding], "weight_decay": weight_decay, "lr_scale": embed_lr_scale,
                       "lr": lr * embed_lr_scale})
    return groups


def new_adamw(groups: list[dict], lr: float, betas: tuple[float, float], device_type: str,
              fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over `groups`, with the fused kernel where this PyTorch has it and the device is
    CUDA or CPU (fused=None), or as `fused` says."""
    fused_supported = "fused" in inspect.signature(torch.optim.AdamW).parameters
    if fused is None:
        fused = fused_supported and device_type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, **({"fused": True} if fused and fused_supported else {}))
