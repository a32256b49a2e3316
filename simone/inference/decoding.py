"""The decode engine: generate, serve, governed and steering all decode through here.

The token loop is the model's own `generate` (simone/model/base.py); a decoder runs the model
in it: the model's `CachedDecoder` (KV cache) or `StreamingDecoder` (a `StreamingKVCache`: any
length, the policy head's reading, attention trace, policy guidance). `sample_tokens` yields a
`Step` per token of one sequence; `StopText` releases its text as far as the text is final.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F

from simone.model.attention import CausalSelfAttention, StreamingKVCache
from simone.model.base import CachedDecoder, LanguageModel
from simone.model.governance_heads import AttentionRecorder, trace_layers, uses_trace
from simone.model.sampling import GREEDY_BELOW, sample_next_token


@dataclass
class Step:
    """One new token and what was asked about it."""

    token: int
    logprob: float = 0.0  # n_top: the model's log-probability of it (before temperature and filtering)
    top: list[tuple[int, float]] = field(default_factory=list)  # n_top: the likeliest [(id, logprob)]
    offset: int = 0  # where its text starts in the completion (serve sets it)
    # streaming decoding (governance)
    prob: float = 0.0  # the model's probability of the token (temperature 1, before filtering)
    entropy: float = 0.0  # of that distribution, in nats
    sources: list[tuple[int, float]] | None = None  # trace: (text position, attention weight), best first
    memory_weight: float | None = None  # trace: attention mass on the memory slots
    policy: list[float] | None = None  # domain distribution of the text including this token


@dataclass
class Guidance:
    """Policy guidance: the next token is drawn from the `top_k` (K) likeliest candidates c by
    softmax((log p_lm(c) + weight · log p_policy(domain | text + c)) / temperature)."""

    domain: int
    weight: float
    top_k: int = 8


@torch.inference_mode()
def sample_tokens(
    model: LanguageModel,
    prompt_ids: list[int],
    max_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    eos_id: int | None = None,
    n_top: int | None = None,
    streaming: bool = False,
    guidance: Guidance | None = None,
    trace: bool = False,
    trace_top: int = 5,
    keep_first: int = 0,
) -> Iterator[Step]:
    """Continue `prompt_ids` by up to `max_tokens` tokens, one `Step` at a time (the last one
    `eos_id`, if it comes). Sampling: temperature (below `GREEDY_BELOW` greedy), top-k, top-p,
    `generator`. n_top (None: none): each token's log-probability and the n_top likeliest.
    Without `streaming` a KV cache holds the text (past the context, the last max_seq_len
    tokens are recomputed each step). With it (implied by `guidance` and `trace`) a
    `StreamingKVCache` reads any length (`keep_first` tokens never evicted) and each step has
    prob, entropy and policy; `guidance` draws by the policy, `trace` adds `trace_top` sources.
    """
    if not prompt_ids:
        raise ValueError("decoding needs at least one prompt token (e.g. the eod token)")
    streaming = streaming or guidance is not None or trace
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=model.tok_embeddings.weight.device)
    decoder = (
        StreamingDecoder(model, 1, guidance, trace, keep_first) if streaming else CachedDecoder(model, idx, max_tokens)
    )
    # generate() runs any decoder with feed/pick/logits; base.py annotates only CachedDecoder
    for token in model.generate(idx, max_tokens, temperature, top_k, top_p, generator, eos_id=eos_id, decoder=decoder):  # type: ignore[arg-type]
        step = Step(int(token[0, 0]))
        if n_top is not None and decoder.logits is not None:  # feed() set them before this token
            logprobs = torch.log_softmax(decoder.logits[0].float(), dim=-1)
            step.logprob = float(logprobs[step.token])
            if n_top > 0:
                values, top_ids = logprobs.topk(n_top)
                step.top = list(zip(top_ids.tolist(), values.tolist()))
        if isinstance(decoder, StreamingDecoder):
            decoder.describe(step, trace_top)
        yield step


def new_streaming_cache(
    model: LanguageModel,
    batch_size: int,
    capacity: int | None = None,
    keep_first: int = 0,
    evict_chunk: int | None = None,
    device: torch.device | None = None,
) -> StreamingKVCache:
    """A `StreamingKVCache` shaped for `model` (capacity defaults to max_seq_len)."""
    cfg = model.cfg
    if cfg.arch != "llama":
        raise ValueError("streaming needs RoPE (model.arch=llama); the GPT-2 baseline has absolute positions")
    attn = cast(CausalSelfAttention, model.layers[0].attention)  # every block has one (ModuleList cannot say so)
    param = model.tok_embeddings.weight
    capacity = min(capacity or cfg.max_seq_len, cfg.max_seq_len)
    return StreamingKVCache(
        len(model.layers),
        batch_size,
        attn.n_kv_heads,
        attn.head_dim,
        capacity,
        keep_first=keep_first,
        evict_chunk=evict_chunk,
        rope_theta=cfg.rope_theta,
        device=device or param.device,
        dtype=param.dtype,
    )


def _guided_pick(
    cand_logp: torch.Tensor,
    domain_prob: torch.Tensor | None,
    weight: float,
    temperature: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Which of the candidates (last dim) to take: by log p_lm(c) + weight · log p_policy(d | text + c),
    greedy below `GREEDY_BELOW` (as `sample_next_token`: a tinier one would overflow the
    softmax), else drawn from the softmax at `temperature`."""
    # domain_prob is None only without a policy head, which StreamingDecoder refuses for weight > 0
    score = cand_logp if weight <= 0 or domain_prob is None else cand_logp + weight * domain_prob.clamp_min(1e-12).log()
    if not temperature >= GREEDY_BELOW:  # NaN too
        return score.argmax(-1)
    return torch.multinomial((score / temperature).softmax(-1), 1, generator=generator)[..., 0]


class StreamingDecoder:
    """A decoder for `generate` (see `CachedDecoder`) over a `StreamingKVCache`, for `n` samples
    of one prompt, read once (row 0, in chunks that fit the evictable room) and copied to every
    row. A picked token is fed at once: the reading it was drawn from (`before`) and the one of
    the text including it (`after`: next logits, policy, attention) are both known when it is
    yielded. With `guidance` the K likeliest tokens of every sample are fed as n·K rows, each
    sample draws one (`_guided_pick`) and its rows continue from it (keys, values, policy
    state). `trace` records each query's attention (blocks `model.trace_layers`)."""

    def __init__(
        self,
        model: LanguageModel,
        n: int = 1,
        guidance: Guidance | None = None,
        trace: bool = False,
        keep_first: int = 0,
    ):
        if guidance is not None and guidance.weight > 0 and model.policy_head is None:
            raise ValueError(
                "policy guidance needs a model trained with the policy head (model.governance=true, model.policy=true)"
            )
        if trace and not uses_trace(model.cfg):
            raise ValueError("this model was configured with model.trace=false")
        self.model, self.n, self.guidance = model, n, guidance
        self.k = max(1, guidance.top_k) if guidance is not None else 1  # rows per sample
        self.cache = new_streaming_cache(model, n * self.k, keep_first=keep_first)
        self.recorder = AttentionRecorder(model, trace_layers(model.cfg)) if trace else None
        # (logits [n, V], policy [n, D] | None, attention [n, n_memory + S] | None, positions [S])
        self.before: tuple[Any, ...] | None = None
        self.after: tuple[Any, ...] | None = None
        self.logits: torch.Tensor | None = None  # what the last token was drawn from
        self.log_probs: torch.Tensor | None = None

    def _run(self, ids: torch.Tensor) -> tuple[Any, ...]:
        """Feed ids [R, n] at the cache's next slots; the model's reading after them (rows R)."""
        start = self.cache.reserve(ids.size(1))
        with self.recorder or contextlib.nullcontext():
            logits, _, policy = self.model(
                ids, kv_cache=self.cache, start_pos=start, last_logits_only=True, return_policy=True
            )
        policy = None if policy is None else policy[:, -1].float().softmax(-1)
        attn = self.recorder.weights() if self.recorder is not None else None
        return logits[:, -1].float(), policy, attn, self.cache.positions[: self.cache.length].clone()

    def feed(self, new: torch.Tensor) -> torch.Tensor:
        """Logits [n, V] of the next token: after the prompt, read here; after a picked token, by `pick`."""
        if self.after is None:
            chunk, cache = self.cache.capacity - self.cache.keep_first, self.cache
            for lo in range(0, new.size(1), chunk):
                logits, *rest = self._run(new[:1, lo : lo + chunk])
            for k, v in zip(cache.k, cache.v):
                k[1:, : cache.length] = k[:1, : cache.length]
                v[1:, : cache.length] = v[:1, : cache.length]
            self.after = (logits.expand(self.n, -1), *rest)
        self.before, self.logits = self.after, self.after[0]
        return self.logits

    def pick(
        self,
        logits: torch.Tensor,
        temperature: float,
        top_k: int | None,
        top_p: float | None,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """The next token of every sample [n, 1], sampled or guided, and fed."""
        self.log_probs = F.log_softmax(logits, dim=-1)
        if self.guidance is None:
            token = sample_next_token(logits, temperature, top_k, top_p, generator)
            self.after = self._run(token)
            return token
        n, k, cache = self.n, self.k, self.cache
        cand_logp, cand = torch.topk(self.log_probs, k, dim=-1)  # [n, K]
        c_logits, c_policy, c_attn, positions = self._run(cand.reshape(n * k, 1))
        domain_prob = None if c_policy is None else c_policy[:, self.guidance.domain].view(n, k)
        pick = _guided_pick(cand_logp, domain_prob, self.guidance.weight, temperature, generator)
        samples = torch.arange(n, device=cand.device)
        winner, slot = samples * k + pick, cache.length - 1
        for kk, vv in zip(cache.k, cache.v):  # every row of a sample continues from its winner
            kk[:, slot] = kk[winner, slot].repeat_interleave(k, dim=0)
            vv[:, slot] = vv[winner, slot].repeat_interleave(k, dim=0)
        if cache.policy_state is not None:
            running, count = cache.policy_state
            cache.policy_state = (running[winner].repeat_interleave(k, dim=0), count)
        self.after = (
            c_logits[winner],
            None if c_policy is None else c_policy[winner],
            None if c_attn is None else c_attn[winner],
            positions,
        )
        return cand[samples, pick][:, None]

    def describe(self, step: Step, top: int) -> None:
        """What governance knows about the token just picked (of sample 0)."""
        if self.log_probs is None or self.before is None or self.after is None:
            raise RuntimeError("describe() follows pick()")
        lp = self.log_probs[0]
        step.prob, step.entropy = float(lp[step.token].exp()), float(-(lp.exp() * lp).nan_to_num().sum())
        policy, (_, _, attn, positions) = self.after[1], self.before
        step.policy = None if policy is None else policy[0].tolist()
        if attn is not None:
            n_memory = cast(CausalSelfAttention, self.model.layers[0].attention).n_memory
            w, slot = torch.topk(attn[0, n_memory:], min(top, attn.size(1) - n_memory))
            step.sources = [(int(positions[s]), float(x)) for s, x in zip(slot.tolist(), w.tolist())]
            step.memory_weight = float(attn[0, :n_memory].sum())


class StopText:
    """The text of a growing completion, released only as far as it is final: never half a
    character (a character split across tokens waits for the rest), never the start of a
    possible stop string, and with `strip` (chat) without leading or trailing whitespace.
    `stop_at` is where a stop string was found."""

    def __init__(self, tokenizer: Any, stop: list[str], strip: bool = False):
        self.tokenizer, self.stop, self.strip = tokenizer, stop, strip
        self.ids: list[int] = []
        self.text = ""  # the decoded completion
        self.complete = 0  # length of the text up to the last whole character
        self.released = 0  # raw text before this index has been handed out
        self.stop_at: int | None = None

    def add(self, token: int) -> tuple[int, str]:
        """Append a token; return where its text starts and the newly released text."""
        offset = self.complete
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids)
        if self.text.endswith("\ufffd"):  # a character split across tokens: wait for the rest
            return offset, ""
        self.complete = len(self.text)
        found = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
        if found:
            self.stop_at = min(found)
            return offset, self._release(self.stop_at)
        return offset, self._release(len(self.text) - self._held_for_stop())

    def finish(self) -> str:
        """The rest of the text (up to a stop string, if one was found)."""
        return self._release(len(self.text) if self.stop_at is None else self.stop_at)

    def _held_for_stop(self) -> int:
        """Length of the longest end of the text that a stop string begins with."""
        held = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), held, -1):
                if self.text.endswith(s[:k]):
                    held = k
                    break
        return held

    def _release(self, end: int) -> str:
        start = 0
        if self.strip:  # trailing whitespace waits for more text; at the end it is dropped
            kept = self.text[:end]
            end = len(kept.rstrip())
            start = len(kept) - len(kept.lstrip())
        begin = max(self.released, start)
        if end <= begin:
            return ""
        self.released = end
        return self.text[begin:end]
