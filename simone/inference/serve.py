"""`simone serve`: an OpenAI-compatible HTTP API over one loaded model.

    simone serve --model PATH [--host 127.0.0.1] [--port 8000] [--api-key KEY]
                 [--max-queue 16] [--max-request-tokens 16384] [--max-body-bytes 1048576]

Endpoints: `GET /v1/models` (and `/v1/models/{id}`), `POST /v1/completions`,
`POST /v1/chat/completions`, `GET /health` (open without a key: it says only that the
server is up and how many requests wait). Any OpenAI client works against
`http://HOST:PORT/v1`; the model id is the model's name (`GET /v1/models`).

Requests run one at a time. One thread owns the model and takes jobs from a FIFO queue; a
job is one request (all of its prompts and choices), with its own KV cache and its own
`torch.Generator`, so outputs never mix and the global RNG is never touched. There is no
batching across requests: 8 clients wait their turn (bench/bench_serve.py measures what
that costs). A request whose client goes away, streaming or not, stops at its next token
(or leaves the queue unrun). The event loop only moves bytes: tokenizing, validating
messages and building a whole (non-streamed) response run in a worker thread, so `/health`
answers while a large request is read; and `simone serve` freezes what it loaded out of the
garbage collector's sight (a full collection over torch and the model stalled every client).

Limits (`ServeLimits`, each a `simone serve` flag): at most `max_queue` requests wait behind
the running one (a full queue answers 429 with `Retry-After`); one request's work, every
prompt times `n` times (prompt + max_tokens) tokens, is at most `max_request_tokens` (400
`request_too_large`); a body is at most `max_body_bytes` (413). A text prompt is measured
before it is tokenized: one with more characters than the context window could hold tokens
(a token is at most as long as the vocabulary's longest) is refused without tokenizing it.

Sampling: `temperature` (0 = greedy, as is anything below 1e-5: `sampling.GREEDY_BELOW`),
`top_p`, and `top_k` (an extension, off by default), as `simone generate` samples. `seed`
makes a request repeatable: the same request with the same seed gives the same text (on the
same device); without one a fresh seed is drawn. With a list of prompts and `n` > 1, choice
`i * n + j` is prompt i's j-th sample, all drawn from the request's one generator in that
order. `logprobs` are the model's own distribution (log
softmax of the logits, before temperature and filtering).

Fields as OpenAI's, with their defaults (completions: `max_tokens` 16, `temperature` 1,
`top_p` 1, `n` 1); `stream_options.include_usage` adds a last chunk with the usage. Refused
with a 400 naming the field unless neutral: `echo`, `best_of` other than `n`, `suffix`,
`logit_bias`, `presence_penalty`, `frequency_penalty`, `tools`/`functions`, and a
`response_format` other than text. A prompt may also be token ids (a list of ints).

Context: a prompt and its `max_tokens` must fit the model's context window (max_seq_len);
otherwise the request is rejected with 400 `context_length_exceeded` (nothing is silently
cut). Chat without `max_tokens` may use whatever the prompt leaves (within `max_request_tokens`).

Chat template (the model is a base model, so chat is plain text it can continue):

    System: {system or developer message}

    User: {user message}

    Assistant: {assistant message}

    User: {user message}

    Assistant:

Messages are joined with a blank line, each as `Role: content` (content stripped of
surrounding whitespace), and `Assistant:` is appended. The reply stops at the end-of-
document token or where the model starts a new turn ("\\nUser:", "\\nSystem:",
"\\nAssistant:"), and comes back without surrounding whitespace.

Errors are OpenAI-style JSON, `{"error": {"message", "type", "param", "code"}}`: 400 for
a bad request (naming the field), 401 for a missing or wrong key, 404 for an unknown model
or path, 413 for a body over `max_body_bytes`, 421 for a Host header that names another
server (the guard against DNS rebinding: only localhost, 127.0.0.1, [::1] and the bound
host are answered, see `simone.local_server.HostCheck`), 429 when the queue is full, 500
(`server_error`, with no detail: the exception goes to the server's log) for a fault of
the server's own. Off loopback the server refuses to start without an API key, and a key
must be printable ASCII (HTTP headers carry bytes: any other character could never match).
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import json
import logging
import queue
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from simone.errors import SimoneError
from simone.inference.decoding import Step, StopText, sample_tokens
from simone.inference.load import LoadedModel, load_model
from simone.local_server import HostCheck, ThreadedServer, is_loopback, start_in_thread

MAX_N = 16  # choices per prompt
MAX_STOP = 4  # stop strings per request (as OpenAI)
MAX_PROMPTS = 64  # prompts in one completions request
MAX_COMPLETION_LOGPROBS = 5  # `logprobs` of /v1/completions (as OpenAI)
MAX_TOP_LOGPROBS = 20  # `top_logprobs` of /v1/chat/completions (as OpenAI)
CHAT_ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
CHAT_STOP = ["\nUser:", "\nSystem:", "\nAssistant:"]
RETRY_AFTER_S = 1  # what a 429 asks a client to wait: about one request's time on a small model

log = logging.getLogger("simone.serve")


class ServeError(SimoneError, RuntimeError):
    """The server cannot start as asked (an address without a key, a port in use)."""


@dataclass(frozen=True)
class ServeLimits:
    """How much one client can ask of the server (each a `simone serve` flag)."""

    max_queue: int = 16  # requests waiting behind the running one; one more gets 429
    max_request_tokens: int = 16_384  # prompts × n × (prompt + max_tokens) tokens in one request
    max_body_bytes: int = 1 << 20  # a request body; a larger one gets 413

    def __post_init__(self) -> None:
        for flag, value in [("--max-queue", self.max_queue), ("--max-request-tokens", self.max_request_tokens),
                            ("--max-body-bytes", self.max_body_bytes)]:
            if value < 1:
                raise ServeError(f"{flag} must be at least 1, got {value}")


class APIError(Exception):
    """A request the server refuses; becomes an OpenAI-style JSON error."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type_: str = "invalid_request_error",
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_
        self.headers = headers


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# ----------------------------------------------------------------------------- chat template


def render_chat(messages: list[dict[str, str]]) -> str:
    """The plain-text prompt of a chat: `Role: content` blocks, then `Assistant:`."""
    blocks = [f"{CHAT_ROLES[m['role']]}: {m['content'].strip()}" for m in messages]
    return "\n\n".join(blocks + ["Assistant:"])


# ----------------------------------------------------------------------------- token bytes


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


# ----------------------------------------------------------------------------- jobs and the worker


@dataclass
class Sampling:
    max_tokens: int
    temperature: float
    top_p: float | None
    top_k: int | None
    stop: list[str]
    n_top_logprobs: int | None  # None: no logprobs
    strip: bool = False  # chat: reply without surrounding whitespace


@dataclass
class Piece:
    """New text of choice `index`, and the tokens whose text begins in it."""

    index: int
    text: str
    steps: list[Step]


@dataclass
class Finished:
    index: int
    reason: str  # "stop" (end of document or a stop string) | "length" (max_tokens)
    completion_tokens: int


@dataclass
class Job:
    """One request: every prompt (token ids) times n choices, drawn from one generator."""

    prompts: list[list[int]]
    n: int
    sampling: Sampling
    seed: int
    cancelled: threading.Event = field(default_factory=threading.Event)
    deliver: Any = None  # set by ModelWorker.submit: hands an event to the request's loop


def run_job(loaded: LoadedModel, job: Job) -> Iterator[Piece | Finished]:
    """Generate every choice of a job in order, yielding its text as it is released."""
    s = job.sampling
    generator = torch.Generator(device=loaded.device).manual_seed(job.seed)
    for p, ids in enumerate(job.prompts):
        for j in range(job.n):
            if job.cancelled.is_set():
                return
            yield from generate_choice(loaded, p * job.n + j, ids, s, generator, job.cancelled)


def generate_choice(loaded: LoadedModel, index: int, ids: list[int], s: Sampling,
                    generator: torch.Generator, cancelled: threading.Event) -> Iterator[Piece | Finished]:
    """One choice: its text as it is released (with the tokens behind it), then how it ended.
    Stops early, without a Finished event, once `cancelled` is set."""
    tok = loaded.tokenizer
    text = StopText(tok, s.stop, s.strip)
    pending: list[Step] = []  # steps whose text has not been released yet
    reason, n_tokens = "length", 0
    for step in sample_tokens(loaded.model, ids, s.max_tokens, s.temperature, s.top_k, s.top_p,
                              generator, n_top=s.n_top_logprobs):
        if cancelled.is_set():
            return
        n_tokens += 1
        if step.token == tok.eod_id:
            reason = "stop"
            break
        step.offset, delta = text.add(step.token)
        pending.append(step)
        if text.stop_at is not None:
            reason = "stop"
            break
        if delta:
            ready = [st for st in pending if st.offset < text.released]
            pending = pending[len(ready):]
            yield Piece(index, delta, ready)
    delta = text.finish()
    end = len(text.text) if text.stop_at is None else text.stop_at
    ready = [st for st in pending if st.offset < end]  # a stop string's own tokens are left out
    if delta or ready:
        yield Piece(index, delta, ready)
    yield Finished(index, reason, n_tokens)


_DONE = object()


class ModelWorker:
    """The one thread that runs the model: jobs wait in a FIFO queue and run one at a time;
    at most `max_waiting` wait (jobs whose clients left do not count)."""

    def __init__(self, loaded: LoadedModel, max_waiting: int = ServeLimits.max_queue):
        self.loaded, self.max_waiting = loaded, max_waiting
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, daemon=True, name="simone-serve-model")
        self.thread.start()

    def submit(self, job: Job) -> asyncio.Queue:
        """Queue a job (or refuse it with 429 when the queue is full); its events (then
        _DONE, or the exception that ended it) arrive on the returned asyncio queue of the
        calling event loop. Called only from that loop, so the count and the put are one step."""
        if self.waiting() >= self.max_waiting:
            raise APIError(429, f"the server is busy: {self.max_waiting} requests are already waiting; "
                                f"retry in {RETRY_AFTER_S} s", code="queue_full", type_="server_busy",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def deliver(item: object) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, item)
            except RuntimeError:  # the loop is gone (server shutting down)
                job.cancelled.set()

        job.deliver = deliver
        self.jobs.put(job)
        return events

    def waiting(self) -> int:
        """Jobs in the queue whose clients are still there."""
        with self.jobs.mutex:  # the queue's own lock: the model thread takes jobs meanwhile
            return sum(1 for job in self.jobs.queue if job is not None and not job.cancelled.is_set())

    def stop(self) -> None:
        self.jobs.put(None)

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            if job.cancelled.is_set():  # the client left while it waited
                continue
            try:
                for event in run_job(self.loaded, job):
                    if job.cancelled.is_set():
                        break
                    job.deliver(event)
                job.deliver(_DONE)
            except Exception as e:  # noqa: BLE001 — the request fails, the server carries on
                job.deliver(e)


# ----------------------------------------------------------------------------- requests


# What the fields checked by hand accept, for the OpenAPI schema only (validation stays by
# hand, for errors that name the field): the schema then describes the real API, and a fuzzer
# reading it reaches the model instead of stopping at the first 400.
STRINGS = {"type": "array", "items": {"type": "string"}}
TOKEN_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
PROMPT_SCHEMA = {"anyOf": [{"type": "string"}, {**STRINGS, "minItems": 1}, TOKEN_IDS,
                           {"type": "array", "items": TOKEN_IDS, "minItems": 1}]}
STOP_SCHEMA = {"anyOf": [{"type": "string"}, {**STRINGS, "maxItems": MAX_STOP}, {"type": "null"}]}
MESSAGES_SCHEMA = {"type": "array", "minItems": 1, "items": {
    "type": "object", "required": ["role", "content"],
    "properties": {"role": {"enum": list(CHAT_ROLES)}, "content": {"type": "string"}}}}


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
        raise APIError(400, f"{param}: {len(text)} characters are at least {-(-len(text) // longest_token)} "
                            f"tokens, but the model's context window is {limit} tokens",
                       param=param, code="context_length_exceeded")


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
        content = m.get("content")
        if content is None:
            content = ""
        if isinstance(content, list):  # content parts: only text
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise _bad(f"{where}.content[{j}]", "only text parts ({\"type\": \"text\", \"text\": ...}) "
                                                        "are supported")
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise _bad(f"{where}.content", "expected a string or a list of text parts")
        out.append({"role": role, "content": content})
    return out


def _check_context(loaded: LoadedModel, prompts: list[list[int]], max_tokens: int | None,
                   prompt_param: str, max_tokens_param: str = "max_tokens") -> int:
    """max_tokens if every prompt leaves room for it (None: what the longest leaves)."""
    limit = loaded.config.model.max_seq_len
    longest = max(len(p) for p in prompts)
    if longest >= limit:
        raise APIError(400, f"{prompt_param}: {longest} tokens, but the model's context window is {limit} "
                            f"tokens and at least one must be left for the completion",
                       param=prompt_param, code="context_length_exceeded")
    if max_tokens is None:
        return limit - longest
    if longest + max_tokens > limit:
        raise APIError(400, f"{max_tokens_param}: {longest} prompt tokens + {max_tokens} completion tokens "
                            f"exceed the model's context window of {limit} tokens; ask for at most "
                            f"{limit - longest}", param=max_tokens_param, code="context_length_exceeded")
    return max_tokens


def _check_work(prompts: list[list[int]], n: int, max_tokens: int, param: str, asked: bool,
                limit: int) -> int:
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
        raise APIError(400, f"{param}: {len(prompts)} prompt(s) × n={n} × (prompt + {max_tokens} completion "
                            f"tokens) come to {work} tokens, over this server's limit of {limit} a request "
                            f"(--max-request-tokens); ask for fewer", param=param, code="request_too_large")
    return max_tokens


def _sampling(req: SamplingRequest, max_tokens: int, stop: list[str], n_top: int | None,
              strip: bool = False) -> Sampling:
    temperature = 1.0 if req.temperature is None else req.temperature
    top_p = 1.0 if req.top_p is None else req.top_p
    if top_p == 0.0:  # only the most likely token is left
        temperature = 0.0
    return Sampling(max_tokens=max_tokens, temperature=temperature,
                    top_p=top_p if top_p < 1.0 else None, top_k=req.top_k or None,
                    stop=stop, n_top_logprobs=n_top, strip=strip)


# ----------------------------------------------------------------------------- the app


def model_name(path: Path) -> str:
    """The id clients use: the package's or folder's name (RUN-step_N for a checkpoint)."""
    path = Path(path).resolve()
    name = path.name
    if path.parent.name == "checkpoints":
        return f"{path.parent.parent.name}-{name}"
    for suffix in (".tar.gz", ".tgz"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def check_api_key(api_key: str | None) -> None:
    """A key must be printable ASCII without spaces: the Authorization header arrives as
    bytes (read as Latin-1, its ends stripped) and is compared with the key's UTF-8 bytes,
    so a key with any other character could never match."""
    if api_key and not all("!" <= c <= "~" for c in api_key):
        raise ServeError("the API key (--api-key or SIMONE_API_KEY): use printable ASCII without spaces "
                         "(letters, digits, punctuation); a key with other characters could never match")


class APIKeyGate:
    """Every path but /health needs `Authorization: Bearer KEY` when a key is set."""

    def __init__(self, app: Any, api_key: str | None):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or self.api_key is None or scope["path"] == "/health":
            await self.app(scope, receive, send)
            return
        auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        if hmac.compare_digest(given.encode(), self.api_key.encode()):
            await self.app(scope, receive, send)
            return
        message = "missing API key (send Authorization: Bearer KEY)" if not given else "incorrect API key"
        response = JSONResponse(error_body(message, code="invalid_api_key"), status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


class BodyLimit:
    """ASGI middleware: reads a request's body before the app does and answers 413 to one
    over `max_bytes` as soon as its Content-Length or its bytes so far show it, so a huge
    body is neither kept nor parsed. After the body, the app's `receive` is the server's
    again (it reports the client's disconnect)."""

    def __init__(self, app: Any, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before its body ended
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def receive_after_body() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, receive_after_body, send)

    async def _refuse(self, scope: dict, receive: Any, send: Any) -> None:
        message = f"request body: larger than this server's limit of {self.max_bytes} bytes (--max-body-bytes)"
        await JSONResponse(error_body(message, code="request_too_large"), status_code=413)(scope, receive, send)


def _param_of(loc: tuple) -> str | None:
    parts = list(loc[1:] if loc and loc[0] == "body" else loc)
    if not parts or isinstance(parts[0], int):  # the body as a whole (e.g. not JSON)
        return None
    name = str(parts[0])
    for p in parts[1:]:
        name += f"[{p}]" if isinstance(p, int) else f".{p}"
    return name


async def _events(events: asyncio.Queue, job: Job) -> AsyncIterator[Piece | Finished]:
    """A submitted job's events, as they come; leaving early cancels the job."""
    try:
        while (item := await events.get()) is not _DONE:
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        job.cancelled.set()  # a client that went away stops the job at its next token


@dataclass
class Outcome:
    """A whole request's result: each choice's text, tokens and finish reason."""

    texts: dict[int, str]
    steps: dict[int, list[Step]]
    reasons: dict[int, str]
    completion_tokens: int


async def collect(events: asyncio.Queue, job: Job) -> Outcome:
    out = Outcome({}, {}, {}, 0)
    async for ev in _events(events, job):
        if isinstance(ev, Piece):
            out.texts[ev.index] = out.texts.get(ev.index, "") + ev.text
            out.steps.setdefault(ev.index, []).extend(ev.steps)
        else:
            out.reasons[ev.index] = ev.reason
            out.completion_tokens += ev.completion_tokens
    return out


async def until_disconnected(receive: Any) -> None:
    """Return once the client has gone away. Its body is read by then, so the server's next
    message is http.disconnect, sent as soon as the connection closes."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def collect_while_connected(events: asyncio.Queue, job: Job, receive: Any) -> Outcome | None:
    """The job's whole outcome, or None if its client leaves first (the job is cancelled
    then: a non-streaming client sends nothing more, so only its disconnect says it left)."""
    work = asyncio.ensure_future(collect(events, job))
    gone = asyncio.ensure_future(until_disconnected(receive))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        return work.result() if work.done() else None
    finally:
        job.cancelled.set()
        work.cancel()
        gone.cancel()


class JobStream(StreamingResponse):
    """A job's events as server-sent events. However the response ends (finished, client
    gone, server stopping), its job is cancelled then: a job never outlives its response,
    not even one whose body never began."""

    def __init__(self, job: Job, chunks: AsyncIterator[bytes]):
        super().__init__(chunks, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.job = job

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancelled.set()


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n\n"


async def json_in_thread(build: Any) -> Response:
    """The JSON response of `build()`, built and encoded in a worker thread: a response of
    16 choices with logprobs takes long enough to stall every other client if done on the
    event loop."""
    def encode() -> bytes:
        return json.dumps(build(), ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")

    return Response(await asyncio.to_thread(encode), media_type="application/json")


INTERNAL_ERROR = "internal error (the server's log has the details)"


def create_app(loaded: LoadedModel, api_key: str | None = None, name: str | None = None,
               host: str = "127.0.0.1", limits: ServeLimits | None = None) -> FastAPI:
    """The OpenAI-compatible app over a loaded model (see the module docstring). `host` is
    the address the server is bound to (other Host headers get 421); `limits` default to
    `ServeLimits()`."""
    check_api_key(api_key)
    api_key = api_key or None
    limits = limits or ServeLimits()
    name = name or model_name(loaded.source)
    tok = loaded.tokenizer
    longest_token = longest_token_chars(tok)
    created = int(loaded.weights.stat().st_mtime) if loaded.weights.exists() else int(time.time())
    worker = ModelWorker(loaded, max_waiting=limits.max_queue)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        worker.stop()

    app = FastAPI(title="simone serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker = worker
    # the last added runs first: the host check, then the key, then the body's size
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    app.add_middleware(APIKeyGate, api_key=api_key)
    app.add_middleware(HostCheck, bound_host=host, who="this API",
                       refusal=lambda message: error_body(message, code="misdirected_request"))

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        err = e.errors()[0]
        param = _param_of(tuple(err.get("loc", ())))
        if err.get("type") == "json_invalid":
            message = f"request body is not valid JSON ({err.get('ctx', {}).get('error', 'parse error')})"
        elif param is None:
            message = "request body must be a JSON object"
        else:
            message = f"{param}: {err.get('msg', 'invalid value')}"
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {e.detail}"
        return JSONResponse(error_body(message, code=str(e.status_code)), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception) -> JSONResponse:
        # No exception text for the client (it may name files, paths or internals). Starlette
        # raises the exception again after this answer, and uvicorn logs it with its traceback.
        return JSONResponse(error_body(INTERNAL_ERROR, "server_error"), status_code=500)

    def model_card() -> dict[str, Any]:
        return {"id": name, "object": "model", "created": created, "owned_by": "simone",
                "context_window": loaded.config.model.max_seq_len}

    def check_model(requested: str) -> None:
        if requested != name:
            raise APIError(404, f"model: {requested!r} is not served here (this server serves {name!r})",
                           param="model", code="model_not_found")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": name, "waiting": worker.waiting()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        check_model(model_id)
        return model_card()

    def token_text(t: int) -> str:
        return tok.decode([t])

    def completion_logprobs(steps: list[Step]) -> dict[str, Any]:
        return {"tokens": [token_text(s.token) for s in steps],
                "token_logprobs": [s.logprob for s in steps],
                # keyed by text, as OpenAI's: tokens with the same text (e.g. U+FFFD) share a
                # key, and the sampled token's own entry is the one kept
                "top_logprobs": [{**{token_text(t): lp for t, lp in s.top}, token_text(s.token): s.logprob}
                                 for s in steps],
                "text_offset": [s.offset for s in steps]}

    def chat_logprobs(steps: list[Step]) -> dict[str, Any]:
        def entry(t: int, lp: float) -> dict[str, Any]:
            return {"token": token_text(t), "logprob": lp, "bytes": list(token_bytes(tok, t))}

        return {"content": [{**entry(s.token, s.logprob), "top_logprobs": [entry(t, lp) for t, lp in s.top]}
                            for s in steps]}

    def usage(prompts: list[list[int]], completion_tokens: int) -> dict[str, int]:
        prompt_tokens = sum(len(p) for p in prompts)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def new_job(req: SamplingRequest, prompts: list[list[int]], sampling: Sampling) -> Job:
        seed = req.seed if req.seed is not None else secrets.randbits(63)
        return Job(prompts=prompts, n=req.n or 1, sampling=sampling, seed=seed)

    def stream(job: Job, events: asyncio.Queue, head: dict[str, Any], include_usage: bool, piece_choice: Any,
               finish_choice: Any, opening: list[dict[str, Any]] | None = None) -> JobStream:
        """Server-sent events: `opening` choices, then one chunk per piece of text or finished
        choice, then (include_usage) a chunk with the usage, then [DONE]. Once streaming has
        begun, an error can only be reported as an event (its detail goes to the log)."""
        extra = {"usage": None} if include_usage else {}

        async def chunks() -> AsyncIterator[bytes]:
            try:
                for choice in opening or []:
                    yield _sse({**head, "choices": [choice], **extra})
                completion_tokens = 0
                async for ev in _events(events, job):
                    if isinstance(ev, Piece):
                        choice = piece_choice(ev)
                    else:
                        completion_tokens += ev.completion_tokens
                        choice = finish_choice(ev)
                    yield _sse({**head, "choices": [choice], **extra})
                if include_usage:
                    yield _sse({**head, "choices": [], "usage": usage(job.prompts, completion_tokens)})
            except Exception:  # noqa: BLE001
                log.exception("%s failed while streaming", head["id"])
                yield _sse(error_body(INTERNAL_ERROR, "server_error"))
            yield b"data: [DONE]\n\n"

        return JobStream(job, chunks())

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Response:
        check_model(req.model)
        _refuse_unsupported(req, {"echo": (False, None), "best_of": (None, req.n or 1), "suffix": (None, ""),
                                  "logit_bias": (None, {}), "presence_penalty": (None, 0.0),
                                  "frequency_penalty": (None, 0.0)})
        stop = _stop_strings(req.stop)

        def prompts_and_max_tokens() -> tuple[list[list[int]], int]:  # in a thread: tokenizing takes time
            prompts = _prompt_ids(loaded, req.prompt, longest_token)
            asked = req.max_tokens if req.max_tokens is not None else 16
            max_tokens = _check_context(loaded, prompts, asked, "prompt")
            return prompts, _check_work(prompts, req.n or 1, max_tokens, "max_tokens", True, limits.max_request_tokens)

        prompts, max_tokens = await asyncio.to_thread(prompts_and_max_tokens)
        job = new_job(req, prompts, _sampling(req, max_tokens, stop, req.logprobs))
        events = worker.submit(job)  # a full queue answers 429 here, before any byte of a stream
        rid, now = f"cmpl-{secrets.token_hex(12)}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": now, "model": name}
        want_logprobs = req.logprobs is not None
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        if req.stream:
            return stream(job, events, head, include_usage,
                          lambda ev: {"index": ev.index, "text": ev.text, "finish_reason": None,
                                      "logprobs": completion_logprobs(ev.steps) if want_logprobs else None},
                          lambda ev: {"index": ev.index, "text": "", "logprobs": None, "finish_reason": ev.reason})
        out = await collect_while_connected(events, job, request.receive)
        if out is None:
            return Response(status_code=499)  # the client left: nobody reads this
        return await json_in_thread(lambda: {
            **head, "usage": usage(prompts, out.completion_tokens),
            "choices": [{"index": i, "text": out.texts.get(i, ""), "finish_reason": reason,
                         "logprobs": completion_logprobs(out.steps.get(i, [])) if want_logprobs else None}
                        for i, reason in sorted(out.reasons.items())]})

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request) -> Response:
        check_model(req.model)
        _refuse_unsupported(req, {"tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
                                  "function_call": (None, "none"), "logit_bias": (None, {}),
                                  "presence_penalty": (None, 0.0), "frequency_penalty": (None, 0.0),
                                  "response_format": (None, {"type": "text"})})
        stop = _stop_strings(req.stop)
        n_top = (req.top_logprobs or 0) if req.logprobs else None
        if req.top_logprobs and not req.logprobs:
            raise _bad("top_logprobs", "needs logprobs: true")

        def prompts_and_max_tokens() -> tuple[list[list[int]], int]:  # in a thread: tokenizing takes time
            text = render_chat(_chat_messages(req.messages))
            _check_length_before_tokenizing(loaded, text, longest_token, "messages")
            prompts = [tok.encode(text)]
            asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
            param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
            max_tokens = _check_context(loaded, prompts, asked, "messages", param)
            return prompts, _check_work(prompts, req.n or 1, max_tokens, param, asked is not None,
                                        limits.max_request_tokens)

        prompts, max_tokens = await asyncio.to_thread(prompts_and_max_tokens)
        job = new_job(req, prompts, _sampling(req, max_tokens, stop + CHAT_STOP, n_top, strip=True))
        events = worker.submit(job)  # a full queue answers 429 here, before any byte of a stream
        rid, now = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        if req.stream:
            head = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": name}
            opening = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                        "finish_reason": None} for i in range(job.n)]
            return stream(job, events, head, include_usage,
                          lambda ev: {"index": ev.index, "delta": {"content": ev.text}, "finish_reason": None,
                                      "logprobs": chat_logprobs(ev.steps) if n_top is not None else None},
                          lambda ev: {"index": ev.index, "delta": {}, "logprobs": None, "finish_reason": ev.reason},
                          opening)
        out = await collect_while_connected(events, job, request.receive)
        if out is None:
            return Response(status_code=499)  # the client left: nobody reads this
        return await json_in_thread(lambda: {
            "id": rid, "object": "chat.completion", "created": now, "model": name,
            "usage": usage(prompts, out.completion_tokens),
            "choices": [{"index": i, "message": {"role": "assistant", "content": out.texts.get(i, "")},
                         "finish_reason": reason,
                         "logprobs": chat_logprobs(out.steps.get(i, [])) if n_top is not None else None}
                        for i, reason in sorted(out.reasons.items())]})

    return app


# ----------------------------------------------------------------------------- running it


def check_bind(host: str, api_key: str | None) -> None:
    """Refuse, before anything is loaded, a key that cannot work or a public address without one."""
    check_api_key(api_key)
    if not is_loopback(host) and not api_key:
        raise ServeError(f"serving on {host} exposes the model to the network: pass --api-key KEY "
                         f"(or set SIMONE_API_KEY), or use --host 127.0.0.1")


def _listen(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as e:
        sock.close()
        raise ServeError(f"{host}:{port}: cannot listen ({e.strerror or e}); pick another --port") from e
    return sock


def _server(app: FastAPI, host: str, port: int, log_level: str) -> uvicorn.Server:
    return uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                         timeout_graceful_shutdown=2, lifespan="on"))


def run_server(model_path: Path, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
               device: str = "auto", log_level: str = "info", limits: ServeLimits | None = None) -> None:
    """`simone serve`: check the address, load the model, serve until Ctrl-C."""
    check_bind(host, api_key)
    sock = _listen(host, port)
    loaded = load_model(Path(model_path), device=device)
    app = create_app(loaded, api_key=api_key, host=host, limits=limits)
    # What is loaded by now lives as long as the server: frozen out of the garbage collector's
    # sight, a full collection no longer walks its ~300k objects (0.2 s on 2 EPYC cores, a
    # stall of every client and of /health every half minute under load)
    gc.collect()
    gc.freeze()
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    print(f"simone serve: {model_name(loaded.source)} (context {loaded.config.model.max_seq_len} tokens, "
          f"{loaded.device}) at http://{shown}:{bound}/v1" + (" (API key required)" if api_key else ""),
          flush=True)
    try:
        _server(app, host, bound, log_level).run(sockets=[sock])
    except KeyboardInterrupt:
        pass


class BackgroundServer(ThreadedServer):
    """A model server in a daemon thread (tests, benchmarks). `url` ends in /v1."""


def start_background_server(loaded: LoadedModel, host: str = "127.0.0.1", port: int = 0,
                            api_key: str | None = None, name: str | None = None,
                            limits: ServeLimits | None = None) -> BackgroundServer:
    """Serve `loaded` from a daemon thread; returns once it accepts connections
    (port 0: any free port)."""
    check_bind(host, api_key)
    sock = _listen(host, port)
    bound = sock.getsockname()[1]
    server = _server(create_app(loaded, api_key=api_key, name=name, host=host, limits=limits), host, bound,
                     "warning")
    thread = start_in_thread(server, sock, "simone-serve")
    if thread is None:
        raise ServeError(f"the server did not start on {host}:{bound}")
    return BackgroundServer(f"http://{host}:{bound}/v1", server, thread)
