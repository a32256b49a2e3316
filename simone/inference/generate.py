"""Generate text from a loaded model: `simone generate`, samples, validation.

Prompts (with a domain's control token), the governance options, text streamed as it is
made (whole characters only) and traces. The decoding itself is the decode engine's
(simone/inference/decoding.py); loading is simone/inference/load.py.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from simone.inference.decoding import Guidance, StopText, sample_tokens
from simone.inference.load import LoadedModel, ModelLoadError, load_model


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
        return [tok.eod_id, control] + ids
    return ids or [tok.eod_id]


def stream_tokens(loaded: LoadedModel, prompt: str | list[int], max_tokens: int = 100, temperature: float = 0.8,
                  top_k: int | None = 50, top_p: float | None = 0.95, seed: int = 0,
                  governance: GovernanceOptions | None = None, trace_records: list[dict] | None = None,
                  last_policy: dict | None = None, token_ids: list[int] | None = None):
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
    governed = governance is not None and governance.active
    ids = prompt if isinstance(prompt, list) else prompt_ids(loaded, prompt, governance.domain if governed else None)
    guidance = None
    if governed:
        if cfg.arch != "llama":
            raise ModelLoadError(f"{loaded.source}: governance features need a Llama-style model "
                                 f"(this one is {cfg.arch})")
        if governance.policy_guidance > 0:
            if governance.domain is None:
                raise ValueError("--policy-guidance needs --domain NAME (the domain to steer toward)")
            guidance = Guidance(tok.domains.index(governance.domain), governance.policy_guidance,
                                governance.guidance_top_k)
    else:
        ids = ids[-(cfg.max_seq_len - 1):]  # leave room for at least one new token
        max_tokens = min(max_tokens, cfg.max_seq_len - len(ids))
        if max_tokens <= 0:
            return
    gen = torch.Generator(device=loaded.device).manual_seed(seed)
    all_ids, new_ids, text = list(ids), token_ids if token_ids is not None else [], StopText(tok, [])
    for step in sample_tokens(loaded.model, ids, max_tokens, temperature, top_k, top_p, gen, tok.eod_id,
                              streaming=governed, guidance=guidance, trace=governed and governance.trace):
        if step.token == tok.eod_id:
            break
        all_ids.append(step.token)
        if last_policy is not None and step.policy is not None:
            last_policy.update(zip(tok.domains, step.policy))
        if trace_records is not None and governed:
            record = {"token": step.token, "text": tok.decode([step.token]), "prob": round(step.prob, 6),
                      "entropy": round(step.entropy, 6),
                      "top_sources": [[p, tok.decode([all_ids[p]]), round(w, 6)] for p, w in step.sources or []],
                      "policy": {} if step.policy is None else
                      {d: round(p, 6) for d, p in zip(tok.domains, step.policy)}}
            if step.memory_weight is not None:
                record["memory"] = round(step.memory_weight, 6)
            trace_records.append(record)
        new_ids.append(step.token)
        piece = text.add(step.token)[1]  # the whole continuation decoded: split characters come out whole
        if piece:
            yield piece


def sample_with_domain(loaded: LoadedModel, options: GovernanceOptions, prompt: str = "", max_tokens: int = 48,
                       temperature: float = 0.8, top_k: int | None = 50, seed: int = 0) -> str:
    """The continuation (without the prompt) generated from `<|domain:NAME|>` + prompt:
    governed for a Llama-style model (policy guidance possible); the GPT-2 baseline, which has
    no governance, generates plainly from the same ids."""
    governance = options if loaded.config.model.arch == "llama" else None
    return "".join(stream_tokens(loaded, prompt_ids(loaded, prompt, options.domain), max_tokens, temperature,
                                 top_k, None, seed, governance))


def sample_text(loaded: LoadedModel, prompt: str, max_tokens: int = 100, **kw) -> str:
    return prompt + "".join(stream_tokens(loaded, prompt, max_tokens=max_tokens, **kw))


def generate_cli(model_path: Path, prompt: str, max_tokens: int, temperature: float, top_k: int | None,
                 top_p: float | None, seed: int, stream: bool = True, device: str = "auto",
                 domain: str | None = None, policy_guidance: float = 0.0, guidance_top_k: int = 8,
                 trace: Path | None = None, trace_html: Path | None = None,
                 stream_past_context: bool = False) -> int:
    loaded = load_model(model_path, device=device)
    options = GovernanceOptions(domain=domain, policy_guidance=policy_guidance, guidance_top_k=guidance_top_k,
                                trace=trace is not None or trace_html is not None, stream=stream_past_context)
    records: list[dict] | None = [] if options.trace else None
    policy: dict[str, float] = {}
    t0 = time.perf_counter()
    token_ids: list[int] = []
    out = sys.stdout
    if stream:
        out.write(prompt)
        out.flush()
    pieces = []
    for piece in stream_tokens(loaded, prompt, max_tokens=max_tokens, temperature=temperature,
                               top_k=top_k if top_k and top_k > 0 else None,
                               top_p=top_p if top_p and top_p < 1 else None, seed=seed,
                               governance=options, trace_records=records, last_policy=policy,
                               token_ids=token_ids):
        pieces.append(piece)
        if stream:
            out.write(piece)
            out.flush()
    if not stream:
        out.write(prompt + "".join(pieces))
    out.write("\n")
    dt = time.perf_counter() - t0
    n = len(token_ids)
    print(f"[{n} tokens in {dt:.2f}s, {n / max(dt, 1e-9):.1f} tok/s]", file=sys.stderr)
    if policy:  # the policy head's reading of the whole text
        ranked = sorted(policy.items(), key=lambda kv: -kv[1])
        print("[policy: " + ", ".join(f"{d} {p:.2f}" for d, p in ranked) + "]", file=sys.stderr)
    if records is not None:
        write_trace(loaded, prompt, domain, records, trace, trace_html)
    loaded.close()
    return 0


def write_trace(loaded: LoadedModel, prompt: str, domain: str | None, records: list[dict],
                jsonl_path: Path | None, html_path: Path | None) -> None:
    """Write the trace records as JSONL (one object per generated token) and/or HTML."""
    if jsonl_path is not None:
        jsonl_path = Path(jsonl_path)
        jsonl_path.parent.mkdir(parents=True, exist_ok=True)
        with open(jsonl_path, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        print(f"[trace: {jsonl_path}]", file=sys.stderr)
    if html_path is not None:
        from simone.inference.trace_html import write_trace_html

        tok = loaded.tokenizer
        prompt_tokens = [tok.decode([i]) for i in prompt_ids(loaded, prompt, domain)]
        write_trace_html(Path(html_path), prompt_tokens, records, title=f"SIM-ONE trace: {loaded.source}")
        print(f"[trace html: {html_path}]", file=sys.stderr)
