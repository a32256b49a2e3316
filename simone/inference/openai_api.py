"""The OpenAI API of `simone serve` without the HTTP: the request models, what a request may ask
(each refusal an `APIError` naming the field), the job it becomes, and a response's logprobs.

Sampling: `temperature` (0 = greedy, as is anything below 1e-5: `sampling.GREEDY_BELOW`),
`top_p`, and `top_k` (an extension, off by default), as `simone generate` samples. `seed`
makes a request repeatable: the same request with the same seed gives the same text (on the
same device); without one a fresh seed is drawn. With a list of prompts and `n` > 1, choice
`i * n + j` is prompt i's j-th sample, all drawn from the request's one generator in that
order. `logprobs` are the model's own distribution (log softmax of the logits, before
temperature and filtering).

Fields as OpenAI's, with their defaults (completions: `max_tokens` 16, `temperature` 1,
`top_p` 1, `n` 1); `stream_options.include_usage` adds a last chunk with the usage. Refused
with a 400 naming the field unless neutral: `echo`, `best_of` other than `n`, `suffix`,
`logit_bias`, `presence_penalty`, `frequency_penalty`, `tools`/`functions`, and a
`response_format` other than text. A prompt may also be token ids (a list of ints).

Context: a prompt and its `max_tokens` must fit the model's context window (max_seq_len);
otherwise the request is rejected with 400 `context_length_exceeded` (nothing is silently
cut). Chat without `max_tokens` may use whatever the prompt leaves (within `max_request_tokens`).

Chat: a model whose tokenizer has the chat tokens and that came with simone's chat template
(`chat_template.jinja`, see simone/inference/load.py) chats in it: the prompt is `chat_ids`
(simone/data/chat_template.py: message text stays text, so no message can open a turn; a
`developer` message is a system one), and the reply ends at `<|endofturn|>` (or any other chat
token: a reply never holds one), with finish_reason "stop". Other models (`chat_format`
"plain-text", shown in `/v1/models`) keep the plain-text convention, as a base model can
continue it:

    System: {system or developer message}

    User: {user message}

    Assistant: {assistant message}

    User: {user message}

    Assistant:

Messages are joined with a blank line, each as `Role: content` (content stripped of
surrounding whitespace), and `Assistant:` is appended. The reply stops at the end-of-
document token or where the model starts a new turn ("\\nUser:", "\\nSystem:",
"\\nAssistant:"), and comes back without surrounding whitespace.
"""

from __future__ import annotations

import secrets
from typing import Any, NamedTuple

from pydantic import BaseModel, Field
from pydantic.json_schema import JsonDict

from simone.data.chat_template import chat_ids
from simone.data.chat_template import render_chat as render_template
from simone.inference.decoding import Step
from simone.inference.load import LoadedModel
from simone.inference.model_worker import Job, Sampling

MAX_N = 16  # choices per prompt
MAX_STOP = 4  # stop strings per request (as OpenAI)
MAX_PROMPTS = 64  # prompts in one completions request
MAX_COMPLETION_LOGPROBS = 5  # `logprobs` of /v1/completions (as OpenAI)
MAX_TOP_LOGPROBS = 20  # `top_logprobs` of /v1/chat/completions (as OpenAI)
CHAT_ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
CHAT_STOP = ["\nUser:", "\nSystem:", "\nAssistant:"]


class APIError(Exception):
    """A request the server refuses; becomes an OpenAI-style JSON error."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type_: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_
        self.headers = headers


def error_body(
    message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# ----------------------------------------------------------------------------- requests


# What the fields checked by hand accept, for the OpenAPI schema only (validation stays by
# hand, for errors that name the field): the schema then describes the real API, and a fuzzer
# reading it reaches the model instead of stopping at the first 400.
STRINGS: JsonDict = {"type": "array", "items": {"type": "string"}}
TOKEN_IDS: JsonDict = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
PROMPT_SCHEMA: JsonDict = {
    "anyOf": [
        {"type": "string"},
        {**STRINGS, "minItems": 1},
        TOKEN_IDS,
        {"type": "array", "items": TOKEN_IDS, "minItems": 1},
    ]
}
STOP_SCHEMA: JsonDict = {"anyOf": [{"type": "string"}, {**STRINGS, "maxItems": MAX_STOP}, {"type": "null"}]}
MESSAGES_SCHEMA: JsonDict = {
    "type": "array",
    "minItems": 1,
    "items": {
        "type": "object",
        "required": ["role", "content"],
        "properties": {"role": {"enum": list(CHAT_ROLES)}, "content": {"type": "string"}},
    },
}


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """Fields both endpoints share (unknown fields are ignored, as OpenAI's own are)."""

    model: str
    temperature: float | None = Field(1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(1.0, ge=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)  # an extension: 0 or None is off
    n: int | None = Field(1, ge=1, le=MAX_N)
    stop: Any = Field(None, json_schema_extra=STOP_SCHEMA)  # checked by hand: clearer errors
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None


class CompletionRequest(SamplingRequest):
    prompt: Any = Field(None, json_schema_extra=PROMPT_SCHEMA)  # strings or token ids, checked by hand
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: bool | None = False
    best_of: int | None = None
    suffix: str | None = None


class ChatRequest(SamplingRequest):
    messages: Any = Field(None, json_schema_extra=MESSAGES_SCHEMA)  # checked by hand, named in errors
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None


# ----------------------------------------------------------------------------- a request's job


def _bad(param: str, message: str, code: str | None = None) -> APIError:
    return APIError(400, f"{param}: {message}", param=param, code=code)


def _refuse_unsupported(req: BaseModel, neutral: dict[str, tuple]) -> None:
    """A field this server does not implement is an error unless it has a neutral value."""
    for name, allowed in neutral.items():
        if getattr(req, name) not in allowed:
            raise _bad(name, "not supported by this server", "unsupported_parameter")


def _stop_strings(stop: Any) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _bad("stop", "expected a string or a list of strings")
    if len(stops) > MAX_STOP:
        raise _bad("stop", f"at most {MAX_STOP} stop strings, got {len(stops)}")
    if any(s == "" for s in stops):
        raise _bad("stop", "a stop string must not be empty")
    return stops


def longest_token_chars(tokenizer: Any) -> int:
    """The most characters one token can stand for. A byte-level token is at most as many
    bytes as its piece has characters, and a text has at least as many bytes as characters,
    so a text of C characters is at least C / this many tokens."""
    return max(len(tokenizer.id_to_token(i) or "") for i in range(tokenizer.vocab_size)) or 1


def _check_length_before_tokenizing(loaded: LoadedModel, text: str, longest_token: int, param: str) -> None:
    """Refuse a text too long for the context window without tokenizing it (a large prompt
    would otherwise cost its whole tokenization before the 400)."""
    limit = loaded.config.model.max_seq_len
    if len(text) > (limit - 1) * longest_token:
        message = (
            f"{len(text)} characters are at least {-(-len(text) // longest_token)} "
            f"tokens, but the model's context window is {limit} tokens"
        )
        raise _bad(param, message, "context_length_exceeded")


def _prompt_ids(loaded: LoadedModel, prompt: Any, longest_token: int) -> list[list[int]]:
    """Token ids of each prompt: a string, a list of strings, a list of token ids, or a
    list of such lists. An empty prompt starts from the end-of-document token."""
    tok = loaded.tokenizer

    def is_ids(x: Any) -> bool:
        return isinstance(x, list) and len(x) > 0 and all(isinstance(i, int) and not isinstance(i, bool) for i in x)

    if isinstance(prompt, str):
        prompts: list = [prompt]
    elif is_ids(prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or is_ids(p) for p in prompt):
        prompts = prompt
    else:
        raise _bad("prompt", "expected a string, a list of strings, a list of token ids or a list of those")
    if len(prompts) > MAX_PROMPTS:
        raise _bad("prompt", f"at most {MAX_PROMPTS} prompts in one request, got {len(prompts)}")
    for p in prompts:  # every prompt measured before any is tokenized
        if isinstance(p, str):
            _check_length_before_tokenizing(loaded, p, longest_token, "prompt")
    out = []
    for p in prompts:
        if isinstance(p, str):
            out.append(tok.encode(p) or [tok.eod_id])
        else:
            bad = [i for i in p if not 0 <= i < tok.vocab_size]
            if bad:
                raise _bad("prompt", f"token id {bad[0]} is outside the vocabulary (0..{tok.vocab_size - 1})")
            out.append(list(p))
    return out


def _chat_messages(messages: Any) -> list[dict[str, str]]:
    """Validate messages: a non-empty list of {role, content} with text content."""
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "expected a non-empty list of messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(where, "expected an object with role and content")
        role = m.get("role")
        if not isinstance(role, str) or role not in CHAT_ROLES:  # a list or object is no role (nor hashable)
            raise _bad(f"{where}.role", f"expected one of {', '.join(CHAT_ROLES)}, got {role!r}")
        content = "" if m.get("content") is None else m["content"]
        if isinstance(content, list):  # content parts: only text
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise _bad(f"{where}.content[{j}]", 'only text parts ({"type": "text", "text": ...}) are supported')
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise _bad(f"{where}.content", "expected a string or a list of text parts")
        out.append({"role": role, "content": content})
    return out


def render_chat(messages: list[dict[str, str]]) -> str:
    """The plain-text prompt of a chat: `Role: content` blocks, then `Assistant:`."""
    blocks = [f"{CHAT_ROLES[m['role']]}: {m['content'].strip()}" for m in messages]
    return "\n\n".join([*blocks, "Assistant:"])


def chat_format(loaded: LoadedModel) -> str:
    """How the model chats: "template" (simone's chat template) or "plain-text" (the convention above)."""
    return "template" if loaded.chat_template is not None and loaded.tokenizer.has_chat_tokens else "plain-text"


class ChatPrompt(NamedTuple):
    """A conversation's prompt ids and what ends its reply (besides end-of-document)."""

    ids: list[int]
    stop: list[str]  # stop strings
    end_ids: list[int]  # tokens
    strip: bool  # the reply without surrounding whitespace


def chat_prompt(loaded: LoadedModel, messages: list[dict[str, str]], longest_token: int | None = None) -> ChatPrompt:
    """The prompt of checked `messages`, in the model's `chat_format`, ending with the assistant's
    turn; with `longest_token`, one too long for the context is refused before it is tokenized."""
    tok = loaded.tokenizer
    if chat_format(loaded) == "plain-text":
        text = render_chat(messages)
        if longest_token:
            _check_length_before_tokenizing(loaded, text, longest_token, "messages")
        return ChatPrompt(tok.encode(text), CHAT_STOP, [], True)
    turns = [{"role": "system" if m["role"] == "developer" else m["role"], "content": m["content"]} for m in messages]
    if longest_token:  # the special tokens spelled out: a token is at most `longest_token` characters either way
        _check_length_before_tokenizing(loaded, render_template(turns, True, tok.eod_token), longest_token, "messages")
    return ChatPrompt(chat_ids(tok, turns, add_generation_prompt=True), [], list(tok.chat_ids.values()), False)


def _check_context(
    loaded: LoadedModel,
    prompts: list[list[int]],
    max_tokens: int | None,
    prompt_param: str,
    max_tokens_param: str = "max_tokens",
) -> int:
    """max_tokens if every prompt leaves room for it (None: what the longest leaves)."""
    limit = loaded.config.model.max_seq_len
    longest = max(len(p) for p in prompts)
    if longest >= limit:
        message = (
            f"{longest} tokens, but the model's context window is {limit} "
            f"tokens and at least one must be left for the completion"
        )
        raise _bad(prompt_param, message, "context_length_exceeded")
    if max_tokens is None:
        return limit - longest
    if longest + max_tokens > limit:
        message = (
            f"{longest} prompt tokens + {max_tokens} completion tokens exceed the model's "
            f"context window of {limit} tokens; ask for at most {limit - longest}"
        )
        raise _bad(max_tokens_param, message, "context_length_exceeded")
    return max_tokens


def _check_work(prompts: list[list[int]], n: int, max_tokens: int, param: str, asked: bool, limit: int) -> int:
    """max_tokens if the request's work, every prompt's n choices each of (prompt +
    max_tokens) tokens, stays within `limit`; without an asked max_tokens (chat), as many
    as the limit leaves."""
    prompt_tokens = n * sum(len(p) for p in prompts)
    choices = n * len(prompts)
    if not asked:
        max_tokens = min(max_tokens, (limit - prompt_tokens) // choices)
    max_tokens = max(max_tokens, 1)
    work = prompt_tokens + choices * max_tokens
    if work > limit:
        message = (
            f"{len(prompts)} prompt(s) × n={n} × (prompt + {max_tokens} completion tokens) come to {work} tokens, "
            f"over this server's limit of {limit} a request (--max-request-tokens); ask for fewer"
        )
        raise _bad(param, message, "request_too_large")
    return max_tokens


def _job(
    req: SamplingRequest,
    prompts: list[list[int]],
    max_tokens: int,
    stop: list[str],
    n_top: int | None,
    strip: bool = False,
    end_ids: list[int] | None = None,
) -> Job:
    """The request's job: its prompts, how to sample them, and its seed (drawn when not given)."""
    temperature = 1.0 if req.temperature is None else req.temperature
    top_p = 1.0 if req.top_p is None else req.top_p
    if top_p == 0.0:  # only the most likely token is left
        temperature = 0.0
    sampling = Sampling(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p if top_p < 1.0 else None,
        top_k=req.top_k or None,
        stop=stop,
        n_top_logprobs=n_top,
        strip=strip,
        end_ids=end_ids or [],
    )
    seed = req.seed if req.seed is not None else secrets.randbits(63)
    return Job(prompts=prompts, n=req.n or 1, sampling=sampling, seed=seed)


def completion_job(loaded: LoadedModel, req: CompletionRequest, longest_token: int, max_request_tokens: int) -> Job:
    """The job of a /v1/completions request, or the APIError that refuses it (it tokenizes: off the event loop)."""
    _refuse_unsupported(
        req,
        {
            "echo": (False, None),
            "best_of": (None, req.n or 1),
            "suffix": (None, ""),
            "logit_bias": (None, {}),
            "presence_penalty": (None, 0.0),
            "frequency_penalty": (None, 0.0),
        },
    )
    stop = _stop_strings(req.stop)
    prompts = _prompt_ids(loaded, req.prompt, longest_token)
    asked = req.max_tokens if req.max_tokens is not None else 16
    max_tokens = _check_context(loaded, prompts, asked, "prompt")
    max_tokens = _check_work(prompts, req.n or 1, max_tokens, "max_tokens", True, max_request_tokens)
    return _job(req, prompts, max_tokens, stop, req.logprobs)


def chat_job(loaded: LoadedModel, req: ChatRequest, longest_token: int, max_request_tokens: int) -> Job:
    """The job of a /v1/chat/completions request, or the APIError that refuses it (as `completion_job`)."""
    _refuse_unsupported(
        req,
        {
            "tools": (None, []),
            "tool_choice": (None, "none"),
            "functions": (None, []),
            "function_call": (None, "none"),
            "logit_bias": (None, {}),
            "presence_penalty": (None, 0.0),
            "frequency_penalty": (None, 0.0),
            "response_format": (None, {"type": "text"}),
        },
    )
    stop = _stop_strings(req.stop)
    if req.top_logprobs and not req.logprobs:
        raise _bad("top_logprobs", "needs logprobs: true")
    prompt = chat_prompt(loaded, _chat_messages(req.messages), longest_token)
    prompts = [prompt.ids]
    asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = _check_context(loaded, prompts, asked, "messages", param)
    max_tokens = _check_work(prompts, req.n or 1, max_tokens, param, asked is not None, max_request_tokens)
    n_top = (req.top_logprobs or 0) if req.logprobs else None
    return _job(req, prompts, max_tokens, stop + prompt.stop, n_top, prompt.strip, prompt.end_ids)


# ----------------------------------------------------------------------------- responses


def _byte_level_chars() -> dict[str, int]:
    """Character → byte of the byte-level BPE alphabet: printable Latin-1 bytes stand for
    themselves, the other 68 bytes for U+0100, U+0101, … in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {chr(b): b for b in printable}
    stand_in = 256
    for b in range(256):
        if b not in chars.values():
            chars[chr(stand_in)] = b
            stand_in += 1
    return chars


BYTE_LEVEL_CHARS = _byte_level_chars()


def token_bytes(tokenizer: Any, token_id: int) -> bytes:
    """The bytes one token stands for (a token may hold part of a UTF-8 character, which
    its decoded text shows only as U+FFFD); a special token gives its own text's bytes."""
    piece = tokenizer.id_to_token(token_id) or ""
    if all(c in BYTE_LEVEL_CHARS for c in piece) and piece != tokenizer.decode([token_id]):
        return bytes(BYTE_LEVEL_CHARS[c] for c in piece)
    return tokenizer.decode([token_id]).encode("utf-8")


def completion_logprobs(tokenizer: Any, steps: list[Step]) -> dict[str, Any]:
    """The `logprobs` of a /v1/completions choice."""

    def text(t: int) -> str:
        return tokenizer.decode([t])

    return {
        "tokens": [text(s.token) for s in steps],
        "token_logprobs": [s.logprob for s in steps],
        # keyed by text, as OpenAI's: tokens with the same text (e.g. U+FFFD) share a
        # key, and the sampled token's own entry is the one kept
        "top_logprobs": [{**{text(t): lp for t, lp in s.top}, text(s.token): s.logprob} for s in steps],
        "text_offset": [s.offset for s in steps],
    }


def chat_logprobs(tokenizer: Any, steps: list[Step]) -> dict[str, Any]:
    """The `logprobs` of a /v1/chat/completions choice."""

    def entry(t: int, lp: float) -> dict[str, Any]:
        return {"token": tokenizer.decode([t]), "logprob": lp, "bytes": list(token_bytes(tokenizer, t))}

    return {
        "content": [{**entry(s.token, s.logprob), "top_logprobs": [entry(t, lp) for t, lp in s.top]} for s in steps]
    }


def usage(prompts: list[list[int]], completion_tokens: int) -> dict[str, int]:
    n = sum(len(p) for p in prompts)
    return {"prompt_tokens": n, "completion_tokens": completion_tokens, "total_tokens": n + completion_tokens}
