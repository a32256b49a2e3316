"""`simone serve`: the HTTP layer of an OpenAI-compatible API over one loaded model (app, routes,
guards, streams, listening); what a request may ask is `openai_api`, the model's thread `model_worker`.

    simone serve --model PATH [--host 127.0.0.1] [--port 8000] [--api-key KEY]
                 [--max-queue 16] [--max-request-tokens 16384] [--max-body-bytes 1048576]

Endpoints: `GET /v1/models` (and `/v1/models/{id}`), `POST /v1/completions`,
`POST /v1/chat/completions`, `GET /health` (open without a key: it says only that the
server is up and how many requests wait). Any OpenAI client works against
`http://HOST:PORT/v1`; the model id is the model's name (`GET /v1/models`). `GET /` is a chat
page (static/chat.html and chat.js: no other host is named, model text is shown as text); it
and its script are open without a key, as they hold nothing: the page sends the key it is
given with its API calls.

Requests run one at a time on the model's thread: there is no batching across requests, 8
clients wait their turn (bench/bench_serve.py measures what that costs). A request whose
client goes away, streaming or not, stops at its next token (or leaves the queue unrun). The
event loop only moves bytes: tokenizing, validating messages and building a whole
(non-streamed) response run in a worker thread, so `/health` answers while a large request is
read; and `simone serve` freezes what it loaded out of the garbage collector's sight (a full
collection over torch and the model stalled every client).

Limits (`ServeLimits`, each a `simone serve` flag): at most `max_queue` requests wait behind
the running one (a full queue answers 429 with `Retry-After`); one request's work, every
prompt times `n` times (prompt + max_tokens) tokens, is at most `max_request_tokens` (400
`request_too_large`); a body is at most `max_body_bytes` (413). A text prompt is measured
before it is tokenized: one with more characters than the context window could hold tokens
(a token is at most as long as the vocabulary's longest) is refused without tokenizing it.

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
import contextlib
import gc
import hmac
import json
import logging
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from simone.errors import SimoneError
from simone.inference.decoding import Step
from simone.inference.load import LoadedModel, load_model
from simone.inference.model_worker import MAX_WAITING, Job, ModelWorker, Piece, QueueFull, job_events
from simone.inference.openai_api import (
    APIError,
    ChatRequest,
    CompletionRequest,
    chat_format,
    chat_job,
    chat_logprobs,
    completion_job,
    completion_logprobs,
    error_body,
    longest_token_chars,
    usage,
)
from simone.local_server import HostCheck, ThreadedServer, is_loopback, start_in_thread

RETRY_AFTER_S = 1  # what a 429 asks a client to wait: about one request's time on a small model
STATIC_DIR = Path(__file__).parent / "static"
OPEN_PATHS = {"/health", "/", "/chat.js"}  # answered without the API key
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

log = logging.getLogger("simone.serve")


class ServeError(SimoneError, RuntimeError):
    """The server cannot start as asked (an address without a key, a port in use)."""


@dataclass(frozen=True)
class ServeLimits:
    """How much one client can ask of the server (each a `simone serve` flag)."""

    max_queue: int = MAX_WAITING  # requests waiting behind the running one; one more gets 429
    max_request_tokens: int = 16_384  # prompts × n × (prompt + max_tokens) tokens in one request
    max_body_bytes: int = 1 << 20  # a request body; a larger one gets 413

    def __post_init__(self) -> None:
        for name in (f.name for f in fields(self)):
            if getattr(self, name) < 1:
                raise ServeError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")


# ----------------------------------------------------------------------------- the app


def model_name(path: Path) -> str:
    """The id clients use: the package's or folder's name (RUN-step_N for a checkpoint)."""
    path = Path(path).resolve()
    if path.parent.name == "checkpoints":
        return f"{path.parent.parent.name}-{path.name}"
    return path.name.removesuffix(".tar.gz") if path.name.endswith(".tar.gz") else path.name.removesuffix(".tgz")


def check_api_key(api_key: str | None) -> None:
    """A key must be printable ASCII without spaces: the Authorization header arrives as
    bytes (read as Latin-1, its ends stripped) and is compared with the key's UTF-8 bytes,
    so a key with any other character could never match."""
    if api_key and not all("!" <= c <= "~" for c in api_key):
        raise ServeError(
            "the API key (--api-key or SIMONE_API_KEY): use printable ASCII without spaces "
            "(letters, digits, punctuation); a key with other characters could never match"
        )


class APIKeyGate:
    """Every path but `OPEN_PATHS` needs `Authorization: Bearer KEY` when a key is set."""

    def __init__(self, app: Any, api_key: str | None):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or self.api_key is None or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        if hmac.compare_digest(given.encode(), self.api_key.encode()):
            await self.app(scope, receive, send)
            return
        message = "missing API key (send Authorization: Bearer KEY)" if not given else "incorrect API key"
        response = JSONResponse(
            error_body(message, code="invalid_api_key"), status_code=401, headers={"WWW-Authenticate": "Bearer"}
        )
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


@dataclass
class Outcome:
    """A whole request's result: each choice's text, tokens and finish reason."""

    texts: dict[int, str]
    steps: dict[int, list[Step]]
    reasons: dict[int, str]
    completion_tokens: int


async def collect(events: asyncio.Queue, job: Job) -> Outcome:
    out = Outcome({}, {}, {}, 0)
    async for ev in job_events(events, job):
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
        super().__init__(
            chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        self.job = job

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
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


def create_api_app(
    loaded: LoadedModel,
    api_key: str | None = None,
    name: str | None = None,
    host: str = "127.0.0.1",
    limits: ServeLimits | None = None,
) -> FastAPI:
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
    app.add_middleware(
        HostCheck,
        bound_host=host,
        who="this API",
        refusal=lambda message: error_body(message, code="misdirected_request"),
    )

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status, headers=e.headers)

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, e: QueueFull) -> JSONResponse:
        return await api_error(
            request,
            APIError(
                429,
                f"the server is busy: {worker.max_waiting} requests are already waiting; retry in {RETRY_AFTER_S} s",
                code="queue_full",
                type_="server_busy",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            ),
        )

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
        return JSONResponse(
            error_body(message, code=str(e.status_code)), status_code=e.status_code, headers=getattr(e, "headers", None)
        )

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception) -> JSONResponse:
        # No exception text for the client (it may name files, paths or internals). Starlette
        # raises the exception again after this answer, and uvicorn logs it with its traceback.
        return JSONResponse(error_body(INTERNAL_ERROR, "server_error"), status_code=500)

    def model_card() -> dict[str, Any]:
        return {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "simone",
            "context_window": loaded.config.model.max_seq_len,
            "chat_format": chat_format(loaded),  # "template", or "plain-text" (see openai_api)
        }

    def check_model(requested: str) -> None:
        if requested != name:
            raise APIError(
                404,
                f"model: {requested!r} is not served here (this server serves {name!r})",
                param="model",
                code="model_not_found",
            )

    @app.get("/", include_in_schema=False)
    async def chat_page() -> Response:
        return FileResponse(
            STATIC_DIR / "chat.html", headers={"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-cache"}
        )

    @app.get("/chat.js", include_in_schema=False)
    async def chat_script() -> Response:
        return FileResponse(STATIC_DIR / "chat.js", media_type="text/javascript", headers={"Cache-Control": "no-cache"})

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

    def stream(
        job: Job,
        events: asyncio.Queue,
        head: dict[str, Any],
        include_usage: bool,
        piece_choice: Any,
        finish_choice: Any,
        opening: list[dict[str, Any]] | None = None,
    ) -> JobStream:
        """Server-sent events: `opening` choices, then one chunk per piece of text or finished
        choice, then (include_usage) a chunk with the usage, then [DONE]. Once streaming has
        begun, an error can only be reported as an event (its detail goes to the log)."""
        extra = {"usage": None} if include_usage else {}

        async def chunks() -> AsyncIterator[bytes]:
            try:
                for choice in opening or []:
                    yield _sse({**head, "choices": [choice], **extra})
                completion_tokens = 0
                async for ev in job_events(events, job):
                    if isinstance(ev, Piece):
                        choice = piece_choice(ev)
                    else:
                        completion_tokens += ev.completion_tokens
                        choice = finish_choice(ev)
                    yield _sse({**head, "choices": [choice], **extra})
                if include_usage:
                    yield _sse({**head, "choices": [], "usage": usage(job.prompts, completion_tokens)})
            except Exception:
                log.exception("%s failed while streaming", head["id"])
                yield _sse(error_body(INTERNAL_ERROR, "server_error"))
            yield b"data: [DONE]\n\n"

        return JobStream(job, chunks())

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Response:
        check_model(req.model)
        job = await asyncio.to_thread(completion_job, loaded, req, longest_token, limits.max_request_tokens)
        want_logprobs = job.sampling.n_top_logprobs is not None
        events = worker.submit(job)  # a full queue answers 429 here, before any byte of a stream
        rid, now = f"cmpl-{secrets.token_hex(12)}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": now, "model": name}
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        if req.stream:
            return stream(
                job,
                events,
                head,
                include_usage,
                lambda ev: {
                    "index": ev.index,
                    "text": ev.text,
                    "finish_reason": None,
                    "logprobs": completion_logprobs(tok, ev.steps) if want_logprobs else None,
                },
                lambda ev: {"index": ev.index, "text": "", "logprobs": None, "finish_reason": ev.reason},
            )
        out = await collect_while_connected(events, job, request.receive)
        if out is None:
            return Response(status_code=499)  # the client left: nobody reads this
        return await json_in_thread(
            lambda: {
                **head,
                "usage": usage(job.prompts, out.completion_tokens),
                "choices": [
                    {
                        "index": i,
                        "text": out.texts.get(i, ""),
                        "finish_reason": reason,
                        "logprobs": completion_logprobs(tok, out.steps.get(i, [])) if want_logprobs else None,
                    }
                    for i, reason in sorted(out.reasons.items())
                ],
            }
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request) -> Response:
        check_model(req.model)
        job = await asyncio.to_thread(chat_job, loaded, req, longest_token, limits.max_request_tokens)
        want_logprobs = job.sampling.n_top_logprobs is not None
        events = worker.submit(job)  # a full queue answers 429 here, before any byte of a stream
        rid, now = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        if req.stream:
            head = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": name}
            opening = [
                {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                for i in range(job.n)
            ]
            return stream(
                job,
                events,
                head,
                include_usage,
                lambda ev: {
                    "index": ev.index,
                    "delta": {"content": ev.text},
                    "finish_reason": None,
                    "logprobs": chat_logprobs(tok, ev.steps) if want_logprobs else None,
                },
                lambda ev: {"index": ev.index, "delta": {}, "logprobs": None, "finish_reason": ev.reason},
                opening,
            )
        out = await collect_while_connected(events, job, request.receive)
        if out is None:
            return Response(status_code=499)  # the client left: nobody reads this
        return await json_in_thread(
            lambda: {
                "id": rid,
                "object": "chat.completion",
                "created": now,
                "model": name,
                "usage": usage(job.prompts, out.completion_tokens),
                "choices": [
                    {
                        "index": i,
                        "message": {"role": "assistant", "content": out.texts.get(i, "")},
                        "finish_reason": reason,
                        "logprobs": chat_logprobs(tok, out.steps.get(i, [])) if want_logprobs else None,
                    }
                    for i, reason in sorted(out.reasons.items())
                ],
            }
        )

    return app


# ----------------------------------------------------------------------------- running it


def check_bind(host: str, api_key: str | None) -> None:
    """Refuse, before anything is loaded, a key that cannot work or a public address without one."""
    check_api_key(api_key)
    if not is_loopback(host) and not api_key:
        raise ServeError(
            f"serving on {host} exposes the model to the network: pass --api-key KEY "
            f"(or set SIMONE_API_KEY), or use --host 127.0.0.1"
        )


def _listen(host: str, port: int, api_key: str | None) -> socket.socket:
    """A socket bound to host:port, once `check_bind` allows it."""
    check_bind(host, api_key)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as e:
        sock.close()
        raise ServeError(f"{host}:{port}: cannot listen ({e.strerror or e}); pick another --port") from e
    return sock


def _server(app: FastAPI, host: str, port: int, log_level: str) -> uvicorn.Server:
    return uvicorn.Server(
        uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=2, lifespan="on")
    )


def run_server(
    model_path: Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    device: str = "auto",
    log_level: str = "info",
    limits: ServeLimits | None = None,
    say: Callable[[str], None] | None = None,
) -> None:
    """`simone serve`: check the address, load the model, serve until Ctrl-C; `say` gets the
    line that says where it listens."""
    sock = _listen(host, port, api_key)
    loaded = load_model(Path(model_path), device=device)
    app = create_api_app(loaded, api_key=api_key, host=host, limits=limits)
    # What is loaded by now lives as long as the server: frozen out of the garbage collector's
    # sight, a full collection no longer walks its ~300k objects (0.2 s on 2 EPYC cores, a
    # stall of every client and of /health every half minute under load)
    gc.collect()
    gc.freeze()
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    if say is not None:
        say(
            f"simone serve: {model_name(loaded.source)} (context {loaded.config.model.max_seq_len} tokens, "
            f"{loaded.device}, chat: {chat_format(loaded)}) at http://{shown}:{bound}/v1"
            + (" (API key required)" if api_key else "")
            + f"; chat page at http://{shown}:{bound}/"
        )
    with contextlib.suppress(KeyboardInterrupt):
        _server(app, host, bound, log_level).run(sockets=[sock])


class BackgroundServer(ThreadedServer):
    """A model server in a daemon thread (tests, benchmarks). `url` ends in /v1."""


def start_background_server(
    loaded: LoadedModel,
    host: str = "127.0.0.1",
    port: int = 0,
    api_key: str | None = None,
    name: str | None = None,
    limits: ServeLimits | None = None,
) -> BackgroundServer:
    """Serve `loaded` from a daemon thread; returns once it accepts connections
    (port 0: any free port)."""
    sock = _listen(host, port, api_key)
    bound = sock.getsockname()[1]
    server = _server(
        create_api_app(loaded, api_key=api_key, name=name, host=host, limits=limits), host, bound, "warning"
    )
    thread = start_in_thread(server, sock, "simone-serve")
    if thread is None:
        raise ServeError(f"the server did not start on {host}:{bound}")
    return BackgroundServer(f"http://{host}:{bound}/v1", server, thread)
