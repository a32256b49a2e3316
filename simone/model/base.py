"""What both architectures share: the output head and loss, weight init, parameter and FLOP
counts, the parameter kinds the optimizers read, the KV cache and token-by-token generation.

A subclass builds `tok_embeddings`, `layers` (each with `.attention`), `norm` and `output`,
and implements `forward(idx, targets=None, kv_cache=None, start_pos=0) -> (logits, loss)`
(logits None when targets are given with gradients on; see `logits_and_loss`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import nullcontext
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from simone.config import ModelConfig
from simone.model import decode
from simone.model.attention import CausalSelfAttention, KVCache
from simone.model.cpu_blas import decoding_threads, in_caches, streams_weights
from simone.model.layers import Linear
from simone.model.loss import linear_cross_entropy, soft_cap
from simone.model.sampling import sample_next_token


class LanguageModel(nn.Module):
    """Base class of `Transformer` (Llama-style) and `GPT2`; not used on its own."""

    cfg: ModelConfig
    tok_embeddings: nn.Embedding
    layers: nn.ModuleList
    output: nn.Linear
    loss_terms: dict[str, torch.Tensor]  # governance: the detached terms of the last training loss
    # whether decode.py's flat one-token step computes this architecture exactly (a class
    # flag, so decode.py need not import the model classes)
    flat_decoding: bool = False

    # ------------------------------------------------------------------ construction helpers

    def init_weights(self, residual_projections: list[torch.Tensor]) -> None:
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

    def logits_and_loss(
        self, h: torch.Tensor, targets: torch.Tensor | None, last_logits_only: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Final hidden states h [B, T, dim] → logits [B, T, V] and the mean cross-entropy.

        The loss is computed in float32 even under autocast; targets equal to -1 are ignored.
        When gradients are on, the projection and loss are fused (`linear_cross_entropy`):
        the same loss and gradients, but no logits (None is returned in their place); run
        under `torch.no_grad()` to get both. `cfg.logit_softcap` caps the logits in either.
        """
        cap = self.cfg.logit_softcap
        if targets is None:
            if last_logits_only:
                h = h[:, -1:]  # generation only needs the next token
            return soft_cap(self.output(h), cap), None
        if torch.is_grad_enabled() and (h.requires_grad or self.output.weight.requires_grad):
            # Training: fused projection + loss (simone/model/loss.py), no logits kept.
            return None, linear_cross_entropy(h, self.output.weight, targets, cap)
        logits = soft_cap(self.output(h), cap)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    # ------------------------------------------------------------------ counts

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Number of parameters (a tied embedding/output matrix counts once).

        exclude_embeddings=True leaves out the lookup tables that do no matmul work: the
        position embedding (GPT-2), value embeddings and the token embedding when it is not
        tied. A tied matrix stays, since it is also the output projection.
        """
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= sum(p.numel() for p in self.value_tables())
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
        return 6.0 * self.num_params(exclude_embeddings=True) + 12.0 * self.cfg.n_layers * self.cfg.dim * seq_len

    # ------------------------------------------------------------------ parameter kinds

    def param_kinds(self) -> list[tuple[str, nn.Parameter]]:
        """Each trainable parameter with its kind, in `parameters()` order (the order an
        optimizer's state dict numbers them by); the optimizers (simone/train/optim.py) group by it.

        "embedding"     the token embedding (the output head too, when tied), value embeddings
        "head"          an untied output head
        "block_matrix"  a weight of a linear layer inside the blocks (what Muon orthogonalises)
        "matrix"        any other parameter of ≥2 dimensions: position embeddings, memory
                        slots, the policy head's projection
        "vector"        biases and norm weights (never weight-decayed)
        """
        in_blocks = {id(m.weight) for m in self.layers.modules() if isinstance(m, nn.Linear)}
        tables = {id(self.tok_embeddings.weight)} | {id(p) for p in self.value_tables()}

        def kind(p: nn.Parameter) -> str:
            if p.dim() < 2:
                return "vector"
            if id(p) in tables:
                return "embedding"
            if p is self.output.weight:
                return "head"
            return "block_matrix" if id(p) in in_blocks else "matrix"

        return [(kind(p), p) for p in self.parameters() if p.requires_grad]

    def value_tables(self) -> list[nn.Parameter]:
        """The value-embedding tables (`model.value_embeddings`; Transformer only)."""
        tables = getattr(self, "value_embeds", None)
        return [] if tables is None else list(tables.parameters())

    # ------------------------------------------------------------------ generation

    def new_kv_cache(
        self, batch_size: int, max_len: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> KVCache:
        """A preallocated cache for `batch_size` sequences of up to `max_len` positions
        (capped at cfg.max_seq_len). Defaults: the model's device, and its dtype — or the
        autocast dtype when autocast is on."""
        param = self.tok_embeddings.weight
        device = param.device if device is None else torch.device(device)
        if dtype is None:
            dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else param.dtype
        attn = cast(CausalSelfAttention, self.layers[0].attention)  # every block has one
        max_len = min(max_len, self.cfg.max_seq_len)
        return KVCache(len(self.layers), batch_size, attn.n_kv_heads, attn.head_dim, max_len, device, dtype)

    @torch.inference_mode()  # like no_grad, minus view and version tracking: a few % per step
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
        eos_id: int | None = None,
        decoder: CachedDecoder | None = None,
    ) -> Iterator[torch.Tensor]:
        """Continue the token sequences idx [B, T]; yields each new token [B, 1] as it is made.

        temperature 0 is greedy; `generator` makes sampling repeatable. use_cache=False
        recomputes the whole (cropped) prefix every step. Only the last cfg.max_seq_len
        tokens are ever seen: a longer prompt is cropped. With the cache, once the sequence
        no longer fits in max_seq_len positions, generation falls back to recomputing the last
        max_seq_len tokens each step — the same tokens use_cache=False gives, only slower.
        With eos_id, a row that has produced eos_id keeps producing it, and generation stops
        when every row has. Call model.eval() first (dropout). `decoder` runs the model and
        picks each token (default: a `CachedDecoder`; simone/inference/decoding.py has others).
        """
        decoder = decoder or CachedDecoder(self, idx, max_new_tokens, use_cache)
        finished = torch.zeros(idx.size(0), 1, dtype=torch.bool, device=idx.device)
        token = idx  # what the decoder reads next: first the prompt
        # steps through NumPy's BLAS (cpu_blas.py): float32 only, so not under a CPU autocast
        blas_threads = None if torch.is_autocast_enabled("cpu") else getattr(decoder, "blas_threads", None)
        for _ in range(max_new_tokens):
            with decoding_threads(blas_threads) if blas_threads and decoder.is_cached_step(token) else nullcontext():
                token = decoder.pick(decoder.feed(token), temperature, top_k, top_p, generator)
            if eos_id is not None:
                token = token.masked_fill(finished, eos_id)
                finished |= token == eos_id
            yield token
            if eos_id is not None and bool(finished.all()):
                return


class CachedDecoder:
    """What `generate` runs: `feed(new)` appends the tokens new [B, n] to the text and returns
    the logits [B, V] of the token after it (kept as `logits`); `pick(logits, temperature,
    top_k, top_p, generator)` chooses that token [B, 1]. This one feeds a KV cache (a single new
    token through the flat `decode.numpy_decode_step` or `decode.decode_step` where they apply)
    and, once the text outgrows it (or without one), recomputes the last max_seq_len tokens each step."""

    pick = staticmethod(sample_next_token)

    def __init__(self, model: LanguageModel, idx: torch.Tensor, max_new_tokens: int, use_cache: bool = True):
        self.model, self.max_len = model, model.cfg.max_seq_len
        size = min(self.max_len, min(idx.size(1), self.max_len) + max_new_tokens)
        self.cache = model.new_kv_cache(idx.size(0), size, idx.device) if use_cache else None
        self.plan = decode.plan_for(model) if decode.supports(model, self.cache) else None
        # the flat step in NumPy (cpu_blas.py): for a model in the caches, or where NumPy's BLAS is the faster
        streams = streams_weights(model)
        self.numpy_plan: decode.NumpyPlan | None = None
        if self.plan is not None and self.cache is not None and (streams or in_caches(model)):
            self.numpy_plan = decode.numpy_plan(model, self.plan, self.cache)
        # `generate` runs each cached step in cpu_blas.decoding_threads(blas_threads) (None: not)
        self.blas_threads = torch.get_num_threads() if streams else 1 if self.numpy_plan is not None else None
        self.idx: torch.Tensor | None = None  # the text so far (its last max_len tokens when recomputed)
        self.n_cached = 0  # positions of idx already in the cache
        self.logits: torch.Tensor | None = None

    def is_cached_step(self, new: torch.Tensor) -> bool:
        """Whether `feed(new)` will be a few rows through the KV cache (not a long prompt, not a
        recomputation of the whole context): the steps `generate` runs in cpu_blas.decoding_threads."""
        n_text = min(new.size(1), self.max_len) if self.idx is None else self.idx.size(1) + new.size(1)
        return self.cache is not None and n_text <= self.cache.max_len and new.numel() <= Linear.decode_rows

    def feed(self, new: torch.Tensor) -> torch.Tensor:
        idx = new[:, -self.max_len :] if self.idx is None else torch.cat((self.idx, new), dim=1)
        if self.cache is not None and idx.size(1) <= self.cache.max_len:
            if self.numpy_plan is not None and self.n_cached > 0:  # exactly one new token
                tokens = idx[:, self.n_cached].numpy()
                logits = torch.from_numpy(decode.numpy_decode_step(self.numpy_plan, tokens, self.n_cached))
            elif self.plan is not None and self.n_cached > 0:
                logits = decode.decode_step(self.model, self.plan, idx[:, self.n_cached :], self.cache, self.n_cached)
            else:
                logits = self.model(
                    idx[:, self.n_cached :], kv_cache=self.cache, start_pos=self.n_cached, last_logits_only=True
                )[0][:, -1]
            self.n_cached = idx.size(1)
        else:
            self.cache = None  # full (or never made): recompute the last max_len tokens
            idx = idx[:, -self.max_len :]
            logits = self.model(idx, last_logits_only=True)[0][:, -1]
        self.idx, self.logits = idx, logits
        return logits
