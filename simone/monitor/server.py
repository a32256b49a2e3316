"""Serving the dashboard with uvicorn: in the foreground (`simone monitor`) or beside
training in a background thread (`simone run --monitor`).

Binding rules: loopback (127.0.0.1, ::1, localhost) by default; any other address only
with a token, and `run_monitor` generates one (and says the URL with it) if none is given.
"""

from __future__ import annotations

import contextlib
import secrets
import socket
from collections.abc import Callable
from pathlib import Path

import uvicorn

from simone.errors import SimoneError
from simone.local_server import ThreadedServer, is_loopback, start_in_thread
from simone.monitor.app import create_dashboard_app


class MonitorError(SimoneError, RuntimeError):
    """The dashboard cannot start as asked (e.g. a public address without a token)."""


def check_bind(host: str, token: str | None) -> None:
    if not is_loopback(host) and not token:
        raise MonitorError(
            f"binding the monitor to {host} exposes training runs to the network: pass --token "
            f"(or let `simone monitor` generate one), or use --host 127.0.0.1"
        )


def dashboard_url(host: str, port: int, token: str | None) -> str:
    shown = host
    # bandit B104: this reads the address the server was given, to show a name; it binds nothing
    if host in ("0.0.0.0", "::", ""):  # nosec B104
        shown = socket.gethostname()
    elif ":" in host and not host.startswith("["):
        shown = f"[{host}]"
    url = f"http://{shown}:{port}/"
    return f"{url}?token={token}" if token else url


def _config(app_kwargs: dict, host: str, port: int, log_level: str) -> uvicorn.Config:
    app = create_dashboard_app(**app_kwargs, host=host)  # the bound host: other Host headers get 421
    return uvicorn.Config(
        app, host=host, port=port, log_level=log_level, access_log=False, timeout_graceful_shutdown=2, lifespan="on"
    )


def serve(
    runs_root: Path | None = None,
    run_dir: Path | None = None,
    token: str | None = None,
    host: str = "127.0.0.1",
    port: int = 5001,
    stall_after_s: float = 60.0,
    log_level: str = "warning",
) -> None:
    """Serve the dashboard until interrupted. Refuses a non-loopback host without a token."""
    check_bind(host, token)
    kwargs = {"runs_root": runs_root, "run_dir": run_dir, "token": token, "stall_after_s": stall_after_s}
    uvicorn.Server(_config(kwargs, host, port, log_level)).run()


def run_monitor(
    runs_root: Path | None,
    run_dir: Path | None,
    host: str = "127.0.0.1",
    port: int = 5001,
    token: str | None = None,
    *,
    say: Callable[[str], None],
) -> None:
    """`simone monitor`: apply the token rules, `say` the URL, serve until Ctrl-C."""
    if not is_loopback(host) and not token:
        token = secrets.token_urlsafe(18)
        say(f"simone monitor: {host} is not loopback, so access needs a token (generated).")
    what = f"run {run_dir}" if run_dir else f"runs under {Path(runs_root or 'runs').resolve()}"
    say(f"simone monitor: serving {what}")
    say(f"simone monitor: open {dashboard_url(host, port, token)}")
    with contextlib.suppress(KeyboardInterrupt):
        serve(runs_root=runs_root, run_dir=run_dir, token=token, host=host, port=port)


class BackgroundMonitor(ThreadedServer):
    """A dashboard served from a daemon thread. `str()` is its URL."""


def start_background_monitor(
    runs_root: Path | None = None,
    run_dir: Path | None = None,
    host: str = "127.0.0.1",
    port: int = 5001,
    token: str | None = None,
    stall_after_s: float = 60.0,
    tries: int = 10,
) -> BackgroundMonitor:
    """Start the dashboard in a daemon thread (for `simone run --monitor`) and return once
    it accepts connections. If `port` is taken, the next free one of `tries` is used;
    `port=0` picks any free port. A non-loopback host without a token gets a generated one."""
    if not is_loopback(host) and not token:
        token = secrets.token_urlsafe(18)
    kwargs = {"runs_root": runs_root, "run_dir": run_dir, "token": token, "stall_after_s": stall_after_s}
    last_error: Exception | None = None
    for candidate in [0] if port == 0 else range(port, port + tries):
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, candidate))
        except OSError as e:
            sock.close()
            last_error = e
            continue
        bound_port = sock.getsockname()[1]
        server = uvicorn.Server(_config(kwargs, host, bound_port, "warning"))
        thread = start_in_thread(server, sock, "simone-monitor")
        if thread is None:
            raise MonitorError(f"the monitor did not start on {host}:{bound_port}")
        return BackgroundMonitor(dashboard_url(host, bound_port, token), server, thread)
    raise MonitorError(f"no free port in {port}..{port + tries - 1} on {host}: {last_error}")
