"""Generate text from a loaded model: `simone generate`, samples, validation.

Prompts (with a domain's control token), the governance options, text streamed as it is
made (whole characters only) and traces. The decoding itself is the decode engine's
(simone/inference/decoding.py); loading is simone/inference/load.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from simone.inference.decoding import Guidance, StopText, sample_tokens
from simone.inference.load import LoadedModel, ModelLoadError, load_model
from simone.inference.trace_html import write_trace_html


@dataclass
class GovernanceOptions:
    """What `simone generate` asks of the governance features (all off by default).

    domain: start from `<|domain:NAME|>` (steering by the control token the model saw in
    training); policy_guidance W > 0: also rerank the top `guidance_top_k` candidates by
    W · log p_policy(domain | text + candidate); trace: collect one record per token
    (`trace_records`); stream: allow more tokens than the context holds (streaming cache).
    """

    domain: str | None = None
    policy_guidance: float = 0.0
    guidance_top_k: int = 8
    trace: bool = False
    stream: bool = False

    @property
    def active(self) -> bool:
        return bool(self.domain or self.policy_guidance > 0 or self.trace or self.stream)


def prompt_ids(loaded: LoadedModel, prompt: str, domain: str | None = None) -> list[int]:
    """Token ids to start from: `[eod, <|domain:NAME|>] + prompt` with a domain (a document
    start, as in training), else the prompt (or `[eod]` for an empty one)."""
    tok = loaded.tokenizer
    ids = tok.encode(prompt) if prompt else []
    if domain is not None:
        try:
            control = tok.domain_token_id(domain)
        except KeyError as e:
            raise ModelLoadError(f"{loaded.files.get('tokenizer', 'tokenizer')}: {e.args[0]}") from None
        return [tok.eod_id, control, *ids]
    return ids or [tok.eod_id]


def stream_tokens(
    loaded: LoadedModel,
    prompt: str | list[int],
    max_tokens: int = 100,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float | None = 0.95,
    seed: int = 0,
    governance: GovernanceOptions | None = None,
    trace_records: list[dict] | None = None,
    last_policy: dict | None = None,
    token_ids: list[int] | None = None,
) -> Iterator[str]:
    """Yield the text of each new token after `prompt` (text, or the token ids to start from)
    as it is generated, in whole characters.

    With `governance` options that ask for something, generation is governed (a streaming
    cache: past the context, steering, trace; Llama-style models): `trace_records` (a list)
    then receives one dict per generated token: {token, text, prob, entropy, top_sources:
    [[position, token_text, weight], ...], memory, policy: {domain: p}} (positions index
    `prompt_ids(...)` + generated tokens), and `last_policy` (a dict) the policy head's domain
    distribution of the whole text. Otherwise it is the plain cached generation, limited to
    the context. `token_ids` (a list) receives each generated token id: a yielded piece of
    text may hold several tokens, or none yet (a character split across tokens).
    """
    tok, cfg = loaded.tokenizer, loaded.config.model
    governed = governance if governance is not None and governance.active else None
    ids = prompt if isinstance(prompt, list) else prompt_ids(loaded, prompt, governed.domain if governed else None)
    guidance = None
    if governed:
        if cfg.arch != "llama":
            raise ModelLoadError(
                f"{loaded.source}: governance features need a Llama-style model (this one is {cfg.arch})"
            )
        if governed.policy_guidance > 0:
            if governed.domain is None:
                raise ValueError("--policy-guidance needs --domain NAME (the domain to steer toward)")
            guidance = Guidance(tok.domains.index(governed.domain), governed.policy_guidance, governed.guidance_top_k)
    else:
        ids = ids[-(cfg.max_seq_len - 1) :]  # leave room for at least one new token
        max_tokens = min(max_tokens, cfg.max_seq_len - len(ids))
        if max_tokens <= 0:
            return
    gen = torch.Generator(device=loaded.device).manual_seed(seed)
    all_ids, new_ids, text = list(ids), token_ids if token_ids is not None else [], StopText(tok, [])
    for step in sample_tokens(
        loaded.model,
        ids,
        max_tokens,
        temperature,
        top_k,
        top_p,
        gen,
        tok.eod_id,
        streaming=governed is not None,
        guidance=guidance,
        trace=governed is not None and governed.trace,
    ):
        if step.token == tok.eod_id:
            break
        all_ids.append(step.token)
        if last_policy is not None and step.policy is not None:
            last_policy.update(zip(tok.domains, step.policy))
        if trace_records is not None and governed:
            record = {
                "token": step.token,
                "text": tok.decode([step.token]),
                "prob": round(step.prob, 6),
                "entropy": round(step.entropy, 6),
                "top_sources": [[p, tok.decode([all_ids[p]]), round(w, 6)] for p, w in step.sources or []],
                "policy": {} if step.policy is None else {d: round(p, 6) for d, p in zip(tok.domains, step.policy)},
            }
            if step.memory_weight is not None:
                record["memory"] = round(step.memory_weight, 6)
            trace_records.append(record)
        new_ids.append(step.token)
        piece = text.add(step.token)[1]  # the whole continuation decoded: split characters come out whole
        if piece:
            yield piece


def sample_with_domain(
    loaded: LoadedModel,
    options: GovernanceOptions,
    prompt: str = "",
    max_tokens: int = 48,
    temperature: float = 0.8,
    top_k: int | None = 50,
    seed: int = 0,
) -> str:
    """The continuation (without the prompt) generated from `<|domain:NAME|>` + prompt:
    governed for a Llama-style model (policy guidance possible); the GPT-2 baseline, which has
    no governance, generates plainly from the same ids."""
    governance = options if loaded.config.model.arch == "llama" else None
    return "".join(
        stream_tokens(
            loaded, prompt_ids(loaded, prompt, options.domain), max_tokens, temperature, top_k, None, seed, governance
        )
    )


def sample_text(loaded: LoadedModel, prompt: str, max_tokens: int = 100, **kw) -> str:
    return prompt + "".join(stream_tokens(loaded, prompt, max_tokens=max_tokens, **kw))


class Generation:
    """One `simone generate`: iterate it for the text after the prompt, piece by piece as it
    is made; when the text ends the traces are written and the model is closed, and
    `summary()` gives the closing lines (speed, the policy head's reading, where the traces are)."""

    def __init__(
        self,
        model_path: Path,
        prompt: str,
        max_tokens: int,
        temperature: float,
        top_k: int | None,
        top_p: float | None,
        seed: int,
        device: str = "auto",
        domain: str | None = None,
        policy_guidance: float = 0.0,
        guidance_top_k: int = 8,
        trace: Path | None = None,
        trace_html: Path | None = None,
        stream_past_context: bool = False,
    ):
        self.loaded = load_model(model_path, device=device)
        self.prompt, self.domain, self.trace, self.trace_html = prompt, domain, trace, trace_html
        self.options = GovernanceOptions(
            domain=domain,
            policy_guidance=policy_guidance,
            guidance_top_k=guidance_top_k,
            trace=trace is not None or trace_html is not None,
            stream=stream_past_context,
        )
        self.sampling: dict[str, Any] = {
            "max_tokens": max_tokens,
            "temperature": temperature,
            "seed": seed,
            "top_k": top_k if top_k and top_k > 0 else None,
            "top_p": top_p if top_p and top_p < 1 else None,
        }
        self.records: list[dict] | None = [] if self.options.trace else None
        self.policy: dict[str, float] = {}
        self.token_ids: list[int] = []
        self.seconds = 0.0

    def __iter__(self) -> Iterator[str]:
        t0 = time.perf_counter()
        yield from stream_tokens(
            self.loaded,
            self.prompt,
            governance=self.options,
            trace_records=self.records,
            last_policy=self.policy,
            token_ids=self.token_ids,
            **self.sampling,
        )
        self.seconds = time.perf_counter() - t0
        if self.records is not None:
            write_trace(self.loaded, self.prompt, self.domain, self.records, self.trace, self.trace_html)
        self.loaded.close()

    def summary(self) -> list[str]:
        n, dt = len(self.token_ids), self.seconds
        lines = [f"[{n} tokens in {dt:.2f}s, {n / max(dt, 1e-9):.1f} tok/s]"]
        if self.policy:  # the policy head's reading of the whole text
            ranked = sorted(self.policy.items(), key=lambda kv: -kv[1])
            lines.append("[policy: " + ", ".join(f"{d} {p:.2f}" for d, p in ranked) + "]")
        if self.trace is not None:
            lines.append(f"[trace: {self.trace}]")
        if self.trace_html is not None:
            lines.append(f"[trace html: {self.trace_html}]")
        return lines


def write_trace(
    loaded: LoadedModel,
    prompt: str,
    domain: str | None,
    records: list[dict],
    jsonl_path: Path | None,
    html_path: Path | None,
) -> None:
    """Write the trace records as JSONL (one object per generated token) and/or HTML."""
    if jsonl_path is not None:
        jsonl_path = Path(jsonl_path)
        jsonl_path.parent.mkdir(parents=True, exist_ok=True)
        with open(jsonl_path, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    if html_path is not None:
        tok = loaded.tokenizer
        prompt_tokens = [tok.decode([i]) for i in prompt_ids(loaded, prompt, domain)]
        write_trace_html(Path(html_path), prompt_tokens, records, title=f"SIM-ONE trace: {loaded.source}")
