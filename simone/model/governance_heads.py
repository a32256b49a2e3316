"""Governance: the policy head, the multi-objective loss and attention tracing for the
Llama-style model. Governed (steered, traced, streaming) generation and streaming evaluation
that drive these parts live in simone/inference/streaming.py.

Each part has a definition, a switch in `ModelConfig` (`governance` on/off, then `policy`,
`memory`, `trace`) and a measurable effect:

- Policy head (`policy`): predicts at every position t the domain of the text (a class per
  `<|domain:NAME|>` control token, in the tokenizer's id order) from the running mean of
  the hidden states after block `policy_layer` over positions <= t (RMSNorm + linear). A
  mean over the text so far, not one position's state: the domain is a property of the
  whole text (a per-position linear head learned only the class prior on the real corpus).
  It reads only positions <= t, so it is causal; with a KV cache the running sum is kept in
  the cache (`policy_state`), so generation reports the domain of everything generated. Trained with the content-alignment loss below; at generation it reports the
  domain distribution of the text so far and can rerank candidates toward a domain.
- Memory (`memory`): `n_memory_slots` learned key/value slots per layer
  (`CausalSelfAttention.add_memory`), attended to by every position; with
  `StreamingKVCache` they survive eviction, so reading past the context keeps its sinks.
- Trace (`trace`): no parameters. `AttentionRecorder` hooks chosen blocks during generation
  and recomputes the new query's attention (averaged over heads); nothing runs otherwise.

The comprehensive loss (model in training mode, targets given):

    total = lm + policy_loss_weight · policy + coherence_weight · coherence
    lm         (accuracy)           next-token cross-entropy, the plain model's loss
    policy     (content alignment)  cross-entropy of the policy head vs. the domain label
    coherence  (coherence)          Jensen-Shannon divergence between the policy distribution
                                    at t and at t + coherence_distance in the same domain,
                                    the later (better informed) one detached as the target;
                                    bounded in [0, ln 2]
    policy_acc                      share of positions whose argmax is the label (logged only)

Each term is stored detached in `model.loss_terms` (device tensors; no host sync).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from simone.config import ModelConfig
from simone.model.layers import RMSNorm

LOSS_TERMS = ("lm_loss", "policy_loss", "coherence_loss", "policy_acc", "total_loss")


# ----------------------------------------------------------------------------- switches


def uses_policy(cfg: ModelConfig) -> bool:
    return bool(cfg.governance and cfg.policy)


def uses_memory(cfg: ModelConfig) -> bool:
    return bool(cfg.governance and cfg.memory and cfg.n_memory_slots > 0)


def uses_trace(cfg: ModelConfig) -> bool:
    """Tracing needs no parameters; a plain model can be traced too unless switched off."""
    return bool(cfg.trace) if cfg.governance else True


def check_governance_config(cfg: ModelConfig) -> None:
    """Raise ValueError naming the field when a governance setting cannot work."""
    if not cfg.governance:
        return
    if cfg.arch != "llama":
        raise ValueError(
            f"model.governance=true needs model.arch=llama (got {cfg.arch!r}); the GPT-2 baseline stays plain"
        )
    if cfg.policy:
        if cfg.n_domains < 1:
            raise ValueError(
                "model.n_domains=0 with model.policy=true: the policy head needs the "
                "number of domains (set from the tokenizer's domain control tokens "
                "by `set_policy_domains`)"
            )
        if not -cfg.n_layers <= cfg.policy_layer < cfg.n_layers:
            raise ValueError(
                f"model.policy_layer={cfg.policy_layer} is not a block index (model has {cfg.n_layers} blocks)"
            )
    for name in ("policy_loss_weight", "coherence_weight"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"model.{name} must be >= 0")
    if cfg.coherence_distance < 1:
        raise ValueError("model.coherence_distance must be >= 1")
    trace_layers(cfg)  # validates the list


def set_policy_domains(cfg: ModelConfig, domains: list[str]) -> None:
    """Size the policy head from the tokenizer's domain list (class i = domains[i])."""
    if uses_policy(cfg):
        if not domains:
            raise ValueError("model.policy=true but the tokenizer has no <|domain:NAME|> tokens")
        cfg.n_domains = len(domains)


def trace_layers(cfg: ModelConfig) -> list[int]:
    """Block indices named by `model.trace_layers` ("-1" = the last; "0,-1"; "all")."""
    text = str(cfg.trace_layers).strip()
    if text == "all":
        return list(range(cfg.n_layers))
    try:
        picked = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"model.trace_layers={text!r}: expected comma-separated block indices or 'all'") from None
    out = []
    for i in picked:
        if not -cfg.n_layers <= i < cfg.n_layers:
            raise ValueError(f"model.trace_layers: {i} is not a block index (0..{cfg.n_layers - 1})")
        out.append(i % cfg.n_layers)
    return sorted(set(out)) or [cfg.n_layers - 1]


# ----------------------------------------------------------------------------- policy head


class PolicyHead(nn.Module):
    """Domain logits [B, T, n_domains] from hidden states [B, T, dim]: position t sees the
    mean of the hidden states at positions <= t (plus, with a cache, everything before)."""

    def __init__(self, dim: int, n_domains: int, eps: float = 1e-5):
        super().__init__()
        self.norm = RMSNorm(dim, eps)
        self.proj = nn.Linear(dim, n_domains)
        nn.init.normal_(self.proj.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)

    def forward(self, h: torch.Tensor, kv_cache=None, start_pos: int = 0) -> torch.Tensor:
        running = h.float().cumsum(dim=1)
        count = torch.arange(1, h.size(1) + 1, device=h.device, dtype=torch.float32)
        if kv_cache is not None:
            state = kv_cache.policy_state if start_pos > 0 else None
            if state is not None:  # (sum [B or 1, dim], count) of the positions before start_pos
                running = running + state[0][:, None]
                count = count + state[1]
            kv_cache.policy_state = (running[:, -1].detach(), float(count[-1]))
        mean = running / count[None, :, None]
        return self.proj(self.norm(mean.to(h.dtype)))


def governance_loss(
    cfg: ModelConfig, lm_loss: torch.Tensor, policy_logits: torch.Tensor | None, domain_ids: torch.Tensor | None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The comprehensive loss and its detached terms (see the module docstring).

    domain_ids: [B] (one label per row) or [B, T] (per position), -1 = unknown (ignored).
    A term whose weight is 0 is still computed for the log but not added, so zero weights
    give exactly the language-model loss.
    """
    terms = {"lm_loss": lm_loss.detach()}
    total = lm_loss
    if policy_logits is not None and domain_ids is not None:
        labels = domain_ids if domain_ids.dim() == 2 else domain_ids[:, None].expand(policy_logits.shape[:2])
        labels = labels.to(policy_logits.device)
        logits = policy_logits.float()
        known = labels >= 0
        # the mean over known labels; 0, not 0/0 = nan, for a batch with none (text of a domain the
        # head has no class for, e.g. a continued run's new data)
        policy = F.cross_entropy(
            logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-1, reduction="sum"
        ) / known.sum().clamp(min=1)
        coherence = policy_coherence(logits, labels, cfg.coherence_distance)
        acc = ((logits.argmax(-1) == labels) & known).sum() / known.sum().clamp(min=1)
        terms.update(policy_loss=policy.detach(), coherence_loss=coherence.detach(), policy_acc=acc.detach())
        if cfg.policy_loss_weight > 0:
            total = total + cfg.policy_loss_weight * policy
        if cfg.coherence_weight > 0:
            total = total + cfg.coherence_weight * coherence
    terms["total_loss"] = total.detach()
    return total, terms


def policy_coherence(policy_logits: torch.Tensor, labels: torch.Tensor, distance: int) -> torch.Tensor:
    """Mean Jensen-Shannon divergence (nats, in [0, ln 2]) between the policy distribution at
    position t and the detached one at t + distance, over pairs inside one domain's text.

    The later position has read more of the document; pulling the earlier one toward it
    teaches the head to commit early. 0 when no pair qualifies.
    """
    if policy_logits.size(1) <= distance:
        return policy_logits.new_zeros(())
    log_p = F.log_softmax(policy_logits[:, :-distance], dim=-1)
    log_q = F.log_softmax(policy_logits[:, distance:].detach(), dim=-1)
    pair = (labels[:, :-distance] == labels[:, distance:]) & (labels[:, :-distance] >= 0)
    log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
    js = 0.5 * (log_p.exp() * (log_p - log_m)).sum(-1) + 0.5 * (log_q.exp() * (log_q - log_m)).sum(-1)
    return (js * pair).sum() / pair.sum().clamp(min=1)


# ----------------------------------------------------------------------------- trace


class AttentionRecorder(contextlib.AbstractContextManager):
    """While active, each forward of the model records the head-averaged attention of its
    last query in the chosen blocks. `weights()` -> [B, n_memory + n_keys] (the mean over the
    recorded blocks of the latest forward), or None before any forward."""

    def __init__(self, model: nn.Module, layers: list[int]):
        self.model = model
        self.layers = layers
        self._latest: dict[int, torch.Tensor] = {}
        self._handles: list = []

    def __enter__(self) -> AttentionRecorder:
        for i in self.layers:
            attention = self.model.get_submodule(f"layers.{i}.attention")

            def hook(module, args, output, i=i):  # args: (x, rope, kv_cache, layer, start_pos)
                self._latest[i] = module.attention_weights(*args).mean(dim=1)

            self._handles.append(attention.register_forward_hook(hook))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def weights(self) -> torch.Tensor | None:
        if not self._latest:
            return None
        return torch.stack([self._latest[i] for i in self.layers]).mean(dim=0)
