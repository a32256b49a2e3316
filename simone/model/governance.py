"""Governance: the policy head, the multi-objective loss, attention tracing and governed
(steered, traced, streaming) generation for the Llama-style model.

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
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from simone.config import ModelConfig
from simone.model.attention import StreamingKVCache
from simone.model.layers import RMSNorm
from simone.model.sampling import sample_next_token

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
        raise ValueError(f"model.governance=true needs model.arch=llama (got {cfg.arch!r}); "
                         f"the GPT-2 baseline stays plain")
    if cfg.policy:
        if cfg.n_domains < 1:
            raise ValueError("model.n_domains=0 with model.policy=true: the policy head needs the "
                             "number of domains (set from the tokenizer's domain control tokens "
                             "by `set_policy_domains`)")
        if not -cfg.n_layers <= cfg.policy_layer < cfg.n_layers:
            raise ValueError(f"model.policy_layer={cfg.policy_layer} is not a block index "
                             f"(model has {cfg.n_layers} blocks)")
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
        raise ValueError(f"model.trace_layers={text!r}: expected comma-separated block indices "
                         f"or 'all'") from None
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


def governance_loss(cfg: ModelConfig, lm_loss: torch.Tensor, policy_logits: torch.Tensor | None,
                    domain_ids: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
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
        policy = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-1)
        coherence = policy_coherence(logits, labels, cfg.coherence_distance)
        known = labels >= 0
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


class LossTermMeter:
    """Sums of `model.loss_terms` over a logging interval, kept on the device.

    `add(terms)` every micro-step (no sync); `read_and_reset()` at a logging step returns
    {name: mean} with one host transfer.
    """

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._count = 0

    def add(self, terms: dict[str, torch.Tensor] | None) -> None:
        if not terms:
            return
        for name, value in terms.items():
            value = value.detach().float()
            self._sums[name] = self._sums[name] + value if name in self._sums else value.clone()
        self._count += 1

    def read_and_reset(self) -> dict[str, float]:
        if not self._sums:
            return {}
        names = list(self._sums)
        values = torch.stack([self._sums[n] for n in names]).tolist()
        out = {n: v / self._count for n, v in zip(names, values)}
        self._sums, self._count = {}, 0
        return out


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
            attention = self.model.layers[i].attention

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


# ----------------------------------------------------------------------------- generation


@dataclass
class GenStep:
    """One generated token and what governance knows about it."""

    token: int
    prob: float  # the model's probability of the token (temperature 1, before filtering)
    entropy: float  # of that distribution, in nats
    sources: list[tuple[int, float]] | None = None  # (text position, attention weight), best first
    memory_weight: float | None = None  # attention mass on the memory slots
    policy: list[float] | None = None  # domain distribution of the text including this token


def new_streaming_cache(model: nn.Module, batch_size: int, capacity: int | None = None,
                        keep_first: int = 0, evict_chunk: int | None = None,
                        device: torch.device | None = None) -> StreamingKVCache:
    """A `StreamingKVCache` shaped for `model` (capacity defaults to max_seq_len)."""
    cfg = model.cfg
    if cfg.arch != "llama":
        raise ValueError("streaming needs RoPE (model.arch=llama); the GPT-2 baseline has "
                         "absolute positions")
    attn = model.layers[0].attention
    param = model.tok_embeddings.weight
    capacity = min(capacity or cfg.max_seq_len, cfg.max_seq_len)
    return StreamingKVCache(len(model.layers), batch_size, attn.n_kv_heads, attn.head_dim, capacity,
                            keep_first=keep_first, evict_chunk=evict_chunk, rope_theta=cfg.rope_theta,
                            device=device or param.device, dtype=param.dtype)


def _feed(model: nn.Module, cache: StreamingKVCache, ids: torch.Tensor,
          recorder: AttentionRecorder | None):
    """Run ids [R, n] through the model at the cache's next slots; return (last logits [R, V],
    policy probs [R, D] or None, attention [R, n_mem + S] or None, slot positions [S])."""
    start = cache.reserve(ids.size(1))
    logits, _, policy_logits = model(ids, kv_cache=cache, start_pos=start, last_logits_only=True,
                                     return_policy=True)
    policy = None if policy_logits is None else policy_logits[:, -1].float().softmax(-1)
    attn = recorder.weights() if recorder is not None else None
    return logits[:, -1].float(), policy, attn, cache.positions[: cache.length].clone()


def _sources(attn_row: torch.Tensor, positions: torch.Tensor, n_memory: int,
             top: int) -> tuple[list[tuple[int, float]], float]:
    token_weights = attn_row[n_memory:]
    k = min(top, token_weights.numel())
    w, slot = torch.topk(token_weights, k)
    sources = [(int(positions[s]), float(x)) for s, x in zip(slot.tolist(), w.tolist())]
    return sources, float(attn_row[:n_memory].sum())


@torch.no_grad()
def governed_generate(model: nn.Module, prompt_ids: list[int], max_new_tokens: int,
                      temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                      generator: torch.Generator | None = None, eos_id: int | None = None,
                      guidance_domain: int | None = None, guidance_weight: float = 0.0,
                      guidance_top_k: int = 8, trace: bool = False, trace_top: int = 5,
                      keep_first: int = 0) -> Iterator[GenStep]:
    """Generate after `prompt_ids` with a streaming KV cache (any length, constant memory).

    guidance_weight W > 0 with guidance_domain d: the `guidance_top_k` most likely next tokens
    are each fed to the model as rows of one batch, and the token is drawn from
    softmax((log p_lm(c) + W · log p_policy(d | text + c)) / temperature) over them
    (argmax at temperature 0); the winner's keys are copied to every row. trace=True records
    the attention of the query that produced each token (blocks `model.trace_layers`).
    Without guidance, sampling is `sample_next_token` (temperature, top-k, top-p).
    """
    cfg = model.cfg
    if not prompt_ids:
        raise ValueError("governed_generate needs at least one prompt token (e.g. the eod token)")
    guided = guidance_domain is not None and guidance_weight > 0
    if guided and model.policy_head is None:
        raise ValueError("policy guidance needs a model trained with the policy head "
                         "(model.governance=true, model.policy=true)")
    if trace and not uses_trace(cfg):
        raise ValueError("this model was configured with model.trace=false")
    rows = max(1, guidance_top_k) if guided else 1
    device = model.tok_embeddings.weight.device
    cache = new_streaming_cache(model, rows, keep_first=keep_first, device=device)
    n_memory = model.layers[0].attention.n_memory
    recorder = AttentionRecorder(model, trace_layers(cfg)) if trace else None
    with recorder if recorder is not None else contextlib.nullcontext():
        # Prompt: chunks that fit the cache's evictable room, batch 1 (rows 1.. copied after).
        chunk = cache.capacity - cache.keep_first
        prompt = torch.tensor([prompt_ids], dtype=torch.long, device=device)
        for lo in range(0, prompt.size(1), chunk):
            logits, policy, attn, positions = _feed(model, cache, prompt[:, lo : lo + chunk], recorder)
        if rows > 1:
            for k, v in zip(cache.k, cache.v):
                k[1:, : cache.length] = k[:1, : cache.length]
                v[1:, : cache.length] = v[:1, : cache.length]
        logits, attn = logits[0], None if attn is None else attn[0]
        for _ in range(max_new_tokens):
            log_probs = F.log_softmax(logits, dim=-1)
            if guided:
                cand_logp, cand = torch.topk(log_probs, rows)
                c_logits, c_policy, c_attn, c_positions = _feed(model, cache, cand[:, None], recorder)
                score = cand_logp + guidance_weight * c_policy[:, guidance_domain].clamp_min(1e-12).log()
                if temperature <= 0:
                    pick = int(score.argmax())
                else:
                    pick = int(torch.multinomial((score / temperature).softmax(-1), 1, generator=generator))
                token = int(cand[pick])
                slot = cache.length - 1
                for k, v in zip(cache.k, cache.v):  # every row continues from the winner
                    k[:, slot] = k[pick, slot]
                    v[:, slot] = v[pick, slot]
                running, count = cache.policy_state
                cache.policy_state = (running[pick : pick + 1], count)
                next_logits, next_policy = c_logits[pick], c_policy[pick]
                next_attn = None if c_attn is None else c_attn[pick]
            else:
                token = int(sample_next_token(logits[None], temperature, top_k, top_p, generator)[0, 0])
                n_logits, n_policy, n_attn, c_positions = _feed(
                    model, cache, torch.tensor([[token]], device=device), recorder)
                next_logits = n_logits[0]
                next_policy = None if n_policy is None else n_policy[0]
                next_attn = None if n_attn is None else n_attn[0]
            step = GenStep(token=token, prob=float(log_probs[token].exp()),
                           entropy=float(-(log_probs.exp() * log_probs).nan_to_num().sum()),
                           policy=None if next_policy is None else next_policy.tolist())
            if attn is not None:
                step.sources, step.memory_weight = _sources(attn, positions, n_memory, trace_top)
            yield step
            if eos_id is not None and token == eos_id:
                return
            logits, attn, positions = next_logits, next_attn, c_positions


@torch.no_grad()
def streaming_nll(model: nn.Module, tokens: torch.Tensor, chunk: int = 16, keep_first: int = 0,
                  capacity: int | None = None, evict_chunk: int | None = None) -> dict:
    """Read a long token sequence [N] through a `StreamingKVCache` (N may far exceed
    max_seq_len); return {"nll_sum" (nats), "n_tokens", "ppl", "cache_bytes" (constant),
    "max_slots"}. Each token is predicted from the cache (memory slots + first + recent)."""
    device = model.tok_embeddings.weight.device
    cache = new_streaming_cache(model, 1, capacity=capacity, keep_first=keep_first,
                                evict_chunk=evict_chunk, device=device)
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
        assert cache.nbytes() == cache_bytes
    n = tokens.size(1) - 1
    total = float(nll)
    return {"nll_sum": total, "n_tokens": n, "ppl": math.exp(min(total / max(n, 1), 50.0)),
            "cache_bytes": cache_bytes, "max_slots": max_slots}
