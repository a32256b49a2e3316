"""The dashboard's web app (FastAPI): JSON API, server-sent events and the static page.

Read-only: it opens run files for reading and never writes into a run directory.

    GET /                               the page (static/index.html)
    GET /static/plotly.min.js           plotly.js from the installed `plotly` package (offline)
    GET /api/runs                       run list with state, progress, last numbers
    GET /api/runs/{run}                 one run: summary, downsampled series, log, samples, ...
    GET /api/runs/{run}/files/{path}    a file inside the run directory (reports, logs)
    GET /api/compare?runs=a,b&keys=...  series of several runs (loss overlay)
    GET /api/stream/runs                SSE: run list changes
    GET /api/stream/run/{run}?since=N   SSE: new metrics, log lines, samples, state

One background task tails the runs that have live clients (`poll_interval_s`) and
publishes each new piece once into a bounded per-run `Channel`; every SSE client sends
the same encoded bytes from there, so 50 clients cost little more than one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from http.cookies import SimpleCookie
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, parse_qsl, quote, urlencode

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse

from simone.local_server import HostCheck
from simone.monitor.metrics_tail import clean_json
from simone.monitor.runs import SummaryCache, list_run_dirs, safe_file, unreadable_summary
from simone.monitor.watch import RunWatch

STATIC_DIR = Path(__file__).parent / "static"
STATIC_FILES = {"app.js": "text/javascript", "style.css": "text/css", "favicon.svg": "image/svg+xml"}
PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; connect-src 'self'; font-src 'self' data:; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
# Run files are served with a sandbox: an HTML report renders, but in an opaque origin
# that cannot reach the dashboard's cookie or API.
FILE_CSP = "sandbox allow-popups; default-src 'none'; img-src data:; style-src 'unsafe-inline'"
TEXT_TYPES = {".md", ".log", ".txt", ".jsonl", ".csv", ".yaml", ".yml", ".toml"}
KEEPALIVE_S = 15.0
SUMMARY_VOLATILE = ("heartbeat_age_s", "server_time", "updated")


def plotly_js_path() -> Path:
    """plotly.min.js as shipped inside the `plotly` Python package."""
    return Path(str(resources.files("plotly") / "package_data" / "plotly.min.js"))


def _encode_json(obj: Any) -> str:
    return json.dumps(clean_json(obj), separators=(",", ":"), allow_nan=False)


class Channel:
    """An ordered, bounded stream of encoded SSE messages with sequence numbers.

    `publish` may be called from any thread; waiting clients are woken on the event loop."""

    def __init__(self, maxlen: int = 512):
        self._items: deque[tuple[int, bytes]] = deque(maxlen=maxlen)
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event = asyncio.Event()
        self.seq = 0
        self.subscribers = 0

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def publish(self, msg: dict[str, Any]) -> None:
        with self._lock:
            self.seq += 1
            msg = {**msg, "seq": self.seq}
            data = f"id: {self.seq}\ndata: {_encode_json(msg)}\n\n".encode()
            self._items.append((self.seq, data))
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        event, self._event = self._event, asyncio.Event()
        event.set()

    @property
    def event(self) -> asyncio.Event:
        return self._event

    def since(self, seq: int) -> tuple[list[tuple[int, bytes]], bool]:
        """Messages after `seq`, and whether some were already dropped (client too slow)."""
        with self._lock:
            if not self._items or seq >= self.seq:
                return [], False
            first = self._items[0][0]
            gap = seq < first - 1
            return [(s, d) for s, d in self._items if s > seq], gap


class Monitor:
    """The server's state: where runs live, one `RunWatch` + `Channel` per watched run."""

    def __init__(self, runs_root: Path | None, run_dir: Path | None, stall_after_s: float, poll_interval_s: float):
        if run_dir is not None:
            self.single: Path | None = Path(run_dir).resolve()
            self.runs_root = self.single.parent
        else:
            self.single = None
            self.runs_root = Path(runs_root if runs_root is not None else "runs").resolve()
        self.stall_after_s = stall_after_s
        self.poll_interval_s = poll_interval_s
        self.watches: dict[str, RunWatch] = {}
        self.channels: dict[str, Channel] = {}
        self.runs_channel = Channel(maxlen=16)
        self.summaries = SummaryCache()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._last_runs_key: Any = None

    def run_paths(self) -> list[Path]:
        if self.single is not None:
            return [self.single] if self.single.is_dir() else []
        return list_run_dirs(self.runs_root)

    def find(self, name: str) -> Path | None:
        """The run directory called `name`, only if it is one of the listed runs."""
        if not name or "/" in name or "\\" in name or name in (".", ".."):
            return None
        return next((p for p in self.run_paths() if p.name == name), None)

    def watch(self, name: str) -> tuple[RunWatch, Channel] | None:
        with self._lock:
            if name in self.watches:
                return self.watches[name], self.channels[name]
        path = self.find(name)
        if path is None:
            return None
        with self._lock:
            if name not in self.watches:
                channel = Channel()
                if self.loop is not None:
                    channel.bind(self.loop)
                self.channels[name] = channel
                self.watches[name] = RunWatch(path, self.stall_after_s, publish=channel.publish)
            return self.watches[name], self.channels[name]

    def run_list(self) -> list[dict[str, Any]]:
        now = time.time()
        paths = self.run_paths()
        self.summaries.forget_except(paths)
        out = []
        for p in paths:
            w, ch = self.watches.get(p.name), self.channels.get(p.name)
            try:
                if w is not None and ch is not None and ch.subscribers and w.exact:
                    with w.lock:  # followed live, so its summary is current (and exact)
                        out.append(w.summary(now))
                else:
                    out.append(self.summaries.summary(p, now, self.stall_after_s))
            except Exception as e:  # one run's odd files must not take the whole list down
                out.append(unreadable_summary(p, f"cannot summarise this run: {e!r}"[:300], now))
        return out

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.runs_channel.bind(loop)
        for c in self.channels.values():
            c.bind(loop)

    async def tick_forever(self) -> None:
        """Tail the runs that have live clients; publish run-list changes."""
        last_list = 0.0
        while True:
            try:
                await self._tick()
                if self.runs_channel.subscribers and time.monotonic() - last_list > 1.0:
                    last_list = time.monotonic()
                    runs = await asyncio.to_thread(self.run_list)
                    key = [{k: v for k, v in r.items() if k not in SUMMARY_VOLATILE} for r in runs]
                    if key != self._last_runs_key:
                        self._last_runs_key = key
                        self.runs_channel.publish({"type": "runs", "runs": runs})
            except Exception as e:  # keep serving; the next tick retries
                print(f"simone monitor: refresh failed: {e!r}")
            await asyncio.sleep(self.poll_interval_s)

    async def _tick(self) -> None:
        now = time.time()
        for name in list(self.watches):
            watch, channel = self.watches[name], self.channels[name]
            if channel.subscribers:
                await asyncio.to_thread(watch.refresh_and_publish)
            elif now - watch.last_used > 300:
                with self._lock:  # idle and unwatched: free its memory
                    self.watches.pop(name, None)
                    self.channels.pop(name, None)


# ----------------------------------------------------------------------------- token gate and headers


def token_cookie_name(token: str) -> str:
    # one name per token, so two monitors on one host (different ports) don't clash
    return "simone_token_" + hashlib.sha256(token.encode()).hexdigest()[:10]


class TokenGate:
    """ASGI middleware: with a token set, every request needs `?token=`, the cookie that a
    first `?token=` request sets, or `Authorization: Bearer TOKEN`; otherwise 401.

    A GET with a right `?token=` is answered by a 303 to the same URL without it (the
    cookie set on the way), so the token does not stay in the address bar or history."""

    def __init__(self, app: Any, token: str | None):
        self.app = app
        self.token = token
        self.cookie = token_cookie_name(token) if token else ""

    def _ok(self, value: str | None) -> bool:
        return value is not None and hmac.compare_digest(value.encode(), self.token.encode())  # type: ignore[union-attr]

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket") or not self.token:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        from_query = (query.get("token") or [None])[0]
        auth = headers.get("authorization", "")
        bearer = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        cookie = None
        if "cookie" in headers:
            jar = SimpleCookie()
            with contextlib.suppress(Exception):
                jar.load(headers["cookie"])
            if self.cookie in jar:
                cookie = jar[self.cookie].value
        if self._ok(from_query):
            # Lax, not Strict: after the redirect, a Strict cookie is withheld when the printed
            # link was clicked on another site (a chat, a web terminal), and the page gets 401.
            # Lax still keeps it off every cross-site fetch, image and form; nothing here writes.
            set_cookie = f"{self.cookie}={self.token}; Path=/; HttpOnly; SameSite=Lax".encode()
            if scope["type"] == "http" and scope.get("method") in ("GET", "HEAD"):
                await self._redirect_without_token(scope, receive, send, set_cookie)
                return

            async def send_with_cookie(message: dict) -> None:
                if message["type"] == "http.response.start":
                    message["headers"] = [*message.get("headers", []), (b"set-cookie", set_cookie)]
                await send(message)

            await self.app(scope, receive, send_with_cookie)
            return
        if self._ok(bearer) or self._ok(cookie):
            await self.app(scope, receive, send)
            return
        response = JSONResponse(
            {"detail": "token required: open the URL printed by `simone monitor` (with ?token=...)"},
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )
        await response(scope, receive, send)

    @staticmethod
    async def _redirect_without_token(scope: dict, receive: Any, send: Any, set_cookie: bytes) -> None:
        query = [
            (k, v)
            for k, v in parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
            if k != "token"
        ]
        # one leading slash: "//evil.example" (or "/\evil.example") would be another site
        path = "/" + quote(scope.get("path", "/")).lstrip("/")
        location = path + ("?" + urlencode(query) if query else "")
        response = Response(status_code=303, headers={"Location": location, "Cache-Control": "no-store"})
        response.raw_headers.append((b"set-cookie", set_cookie))
        await response(scope, receive, send)


class SecurityHeaders:
    """ASGI middleware adding headers to every response (plain ASGI, so SSE streams and
    client disconnects pass straight through)."""

    HEADERS = ((b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"))

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *self.HEADERS]
            await send(message)

        await self.app(scope, receive, send_with_headers)


# ----------------------------------------------------------------------------- the app


def create_dashboard_app(
    runs_root: Path | None = None,
    run_dir: Path | None = None,
    token: str | None = None,
    stall_after_s: float = 60,
    poll_interval_s: float = 0.25,
    host: str = "127.0.0.1",
) -> FastAPI:
    """The dashboard for every run under `runs_root` (default ./runs), or for one `run_dir`.

    `token`: if set, every request must carry it (see `TokenGate`). `stall_after_s`: a
    running run whose heartbeat is older than this shows as "stalled". `host`: the address
    the server is bound to; requests naming another host get 421 (see `HostCheck`)."""
    monitor = Monitor(runs_root, run_dir, stall_after_s, poll_interval_s)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        monitor.bind(asyncio.get_running_loop())
        task = asyncio.create_task(monitor.tick_forever())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    app = FastAPI(title="SIM-ONE monitor", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.monitor = monitor

    def _need_watch(run: str) -> tuple[RunWatch, Channel]:
        found = monitor.watch(run)
        if found is None:
            raise HTTPException(404, f"no run called {run!r}")
        return found

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        return FileResponse(
            STATIC_DIR / "index.html",
            media_type="text/html",
            headers={"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-cache"},
        )

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:
        return FileResponse(STATIC_DIR / "favicon.svg", media_type="image/svg+xml")

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        if name == "plotly.min.js":
            return FileResponse(
                plotly_js_path(), media_type="text/javascript", headers={"Cache-Control": "public, max-age=86400"}
            )
        if name not in STATIC_FILES:
            raise HTTPException(404, "not found")
        return FileResponse(STATIC_DIR / name, media_type=STATIC_FILES[name], headers={"Cache-Control": "no-cache"})

    @app.get("/api/runs")
    async def runs() -> Response:
        runs = await asyncio.to_thread(monitor.run_list)
        return JSONResponse(
            clean_json(
                {
                    "runs": runs,
                    "server_time": time.time(),
                    "runs_root": str(monitor.runs_root),
                    "single": monitor.single is not None,
                }
            )
        )

    @app.get("/api/runs/{run}")
    async def run_detail(run: str) -> Response:
        watch, channel = _need_watch(run)

        def snap() -> dict[str, Any]:
            with watch.lock:  # the seq read under the same lock: no gap, no overlap
                data = watch.snapshot(base_url=f"/api/runs/{run}/files")
                data["seq"] = channel.seq
            return data

        data = await asyncio.to_thread(snap)
        return Response(_encode_json(data), media_type="application/json")

    @app.get("/api/runs/{run}/files/{path:path}")
    async def run_file(run: str, path: str) -> Response:
        root = monitor.find(run)
        target = safe_file(root, path) if root is not None else None
        if target is None:
            raise HTTPException(404, "not found")
        suffix = target.suffix.lower()
        fallback = "text/plain; charset=utf-8" if suffix in TEXT_TYPES else "application/octet-stream"
        media = {".html": "text/html; charset=utf-8", ".json": "application/json"}.get(suffix, fallback)
        return FileResponse(
            target, media_type=media, headers={"Content-Security-Policy": FILE_CSP, "Cache-Control": "no-cache"}
        )

    @app.get("/api/compare")
    async def compare(runs: str = Query(...), keys: str = "train/loss,eval/val_loss") -> Response:
        names = [r for r in runs.split(",") if r][:12]
        wanted = [k for k in keys.split(",") if k][:8]
        out: dict[str, Any] = {}
        for name in names:
            found = monitor.watch(name)
            if found is not None:
                out[name] = await asyncio.to_thread(found[0].series_points, wanted)
        return Response(_encode_json({"runs": out}), media_type="application/json")

    async def _sse(
        request: Request, channel: Channel, since: int, on_start: dict[str, Any] | None = None
    ) -> AsyncIterator[bytes]:
        channel.subscribers += 1
        try:
            yield b"retry: 2000\n\n"
            if on_start is not None:
                yield f"data: {_encode_json(on_start)}\n\n".encode()
            seq = since
            while True:
                event = channel.event  # taken before looking, so no wake-up is missed
                items, gap = channel.since(seq)
                if gap:
                    yield f"data: {_encode_json({'type': 'resync', 'reason': 'fell behind'})}\n\n".encode()
                for s, data in items:
                    yield data
                    seq = s
                if not items:
                    try:
                        await asyncio.wait_for(event.wait(), KEEPALIVE_S)
                    except asyncio.TimeoutError:
                        if await request.is_disconnected():
                            return
                        yield b": keepalive\n\n"
        finally:
            channel.subscribers -= 1

    sse_headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

    @app.get("/api/stream/runs")
    async def stream_runs(request: Request) -> Response:
        runs = await asyncio.to_thread(monitor.run_list)
        start = {"type": "runs", "runs": runs}
        return StreamingResponse(
            _sse(request, monitor.runs_channel, monitor.runs_channel.seq, start),
            media_type="text/event-stream",
            headers=sse_headers,
        )

    @app.get("/api/stream/run/{run}")
    async def stream_run(request: Request, run: str, since: int | None = None) -> Response:
        _, channel = _need_watch(run)
        last_id = request.headers.get("last-event-id")
        if last_id and last_id.isdigit():  # a reconnect: newer than the URL's `since`
            since = int(last_id)
        start = None
        if since is not None and since > channel.seq:  # the server restarted: reload
            start = {"type": "resync", "reason": "server restarted"}
        if since is None or since > channel.seq:
            since = channel.seq
        return StreamingResponse(
            _sse(request, channel, since, start), media_type="text/event-stream", headers=sse_headers
        )

    # the last added runs first: headers on every answer, then the host check, then the token
    if token:
        app.add_middleware(TokenGate, token=token)
    app.add_middleware(HostCheck, bound_host=host, who="this dashboard")
    app.add_middleware(SecurityHeaders)
    return app
