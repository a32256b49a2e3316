"""What the dashboard (`simone monitor`) and the model server (`simone serve`) share: whether an
address is loopback, the guard against DNS rebinding (`HostCheck`), and a uvicorn server run
from a daemon thread (tests, `simone run --monitor`)."""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.responses import JSONResponse

if TYPE_CHECKING:
    import uvicorn

START_TIMEOUT_S = 15.0


def is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _ip_literal(name: str) -> str | None:
    """`name` as a Host header spells an IP address (IPv6 in brackets), else None."""
    try:
        ip = ipaddress.ip_address(name[1:-1] if name.startswith("[") and name.endswith("]") else name)
    except ValueError:
        return None
    return f"[{ip.compressed}]" if ip.version == 6 else ip.compressed


def host_header_name(value: str) -> str:
    """The name part of a Host header, lower-case, without the port: `[::1]:5001` -> `[::1]`."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        return value[: end + 1] if end > 0 else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class HostCheck:
    """ASGI middleware against DNS rebinding: a page on `evil.example` whose name is made to
    resolve to 127.0.0.1 reaches this server with `Host: evil.example`, so only requests
    naming this server are answered: localhost, 127.0.0.1, [::1] and the bound host (with
    any port); others get 421. Bound to all interfaces (0.0.0.0 or ::, where a token or key
    is required anyway), the machine's host name and any IP address are accepted too: a DNS
    rebinding attack needs a name, never an address.

    `who` names the server in the refusal, and `refusal(message)` is the 421's JSON body
    (each server keeps its own error shape)."""

    def __init__(
        self,
        app: Any,
        bound_host: str = "127.0.0.1",
        who: str = "this server",
        refusal: Callable[[str], dict[str, Any]] = lambda message: {"detail": message},
    ):
        self.app = app
        bound = host_header_name(bound_host) if bound_host else ""
        # bandit B104: this reads the address the server was given; it binds nothing
        self.any_ip = bound in ("", "0.0.0.0", "::", "[::]")  # nosec B104
        self.names = {"localhost", "127.0.0.1", "[::1]"}
        if self.any_ip:
            self.names.add(socket.gethostname().lower())
        elif bound:
            self.names.add(_ip_literal(bound) or bound)
        self.who, self.refusal = who, refusal

    def allowed(self, host: str | None) -> bool:
        if not host:
            return False
        name = host_header_name(host)
        if name.endswith("."):
            name = name[:-1]  # "localhost." is the same name
        ip = _ip_literal(name)
        if ip is not None and (self.any_ip or ip in self.names):
            return True
        return name in self.names

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        host = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k.lower() == b"host"), None)
        if self.allowed(host):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        message = (
            f"misdirected request: {self.who} answers to {', '.join(sorted(self.names))} "
            "(a guard against DNS rebinding); use one of those names"
        )
        await JSONResponse(self.refusal(message), status_code=421)(scope, receive, send)


@dataclass
class ThreadedServer:
    """A uvicorn server running in a daemon thread. `str()` is its URL."""

    url: str
    server: uvicorn.Server
    thread: threading.Thread = field(repr=False)

    def stop(self, timeout: float = 5.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __str__(self) -> str:
        return self.url


def start_in_thread(server: uvicorn.Server, sock: socket.socket, name: str) -> threading.Thread | None:
    """Run `server` on the bound `sock` in a daemon thread; return the thread once it accepts
    connections, or None (the server told to exit) if it did not start in time."""
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name=name)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    if not server.started:
        server.should_exit = True
        return None
    return thread
