"""What the dashboard (`simone monitor`) and the model server (`simone serve`) share: whether an
address is loopback, and a uvicorn server run from a daemon thread (tests, `simone run --monitor`)."""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

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


@dataclass
class ThreadedServer:
    """A uvicorn server running in a daemon thread. `str()` is its URL."""

    url: str
    server: "uvicorn.Server"
    thread: threading.Thread = field(repr=False)

    def stop(self, timeout: float = 5.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __str__(self) -> str:
        return self.url


def start_in_thread(server: "uvicorn.Server", sock: socket.socket, name: str) -> threading.Thread | None:
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
