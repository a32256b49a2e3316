"""One live process per run directory: a lock file holding the owner's pid.

`RUN/.lock` is created exclusively (O_EXCL) and holds `{pid, host, started, create_time}`.
A second process that finds the lock checks whether the owner is still alive: a live owner
means the run is refused (`RunLockedError`); a dead one (a `kill -9`, a crash, a reboot) means
the lock is stale and is taken over with a warning. The owner's process start time is stored
too, so a recycled pid belonging to some unrelated process is not mistaken for the owner.

The lock is re-entrant within one process: the CLI may hold it for a whole pipeline run and
`train()` may take it again without deadlocking itself.
"""

from __future__ import annotations

import json
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import psutil

from simone.errors import SimoneError

LOCK_NAME = ".lock"


class RunLockedError(SimoneError, RuntimeError):
    """Another live process is working in this run directory."""


def _process_start_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
        return None


def _owner_alive(info: dict[str, Any]) -> bool:
    """Is the process recorded in a lock file still running (on this host)?"""
    pid = info.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    if info.get("host") not in (None, socket.gethostname()):
        # another machine's lock (shared filesystem): we cannot check, so trust it
        return True
    if not psutil.pid_exists(pid):
        return False
    try:
        if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return False
    except psutil.Error:
        return False
    recorded = info.get("create_time")
    actual = _process_start_time(pid)
    if isinstance(recorded, (int, float)) and actual is not None and abs(actual - recorded) > 1.0:
        return False  # the pid was recycled by an unrelated process
    return True


def read_lock(run_root: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(run_root) / LOCK_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}  # half-written or garbage: treated as stale


class RunLock:
    """Context manager: `with RunLock(run.root): ...` holds the run directory for this process."""

    def __init__(self, run_root: str | Path, warn: Callable[[str], None] | None = None):
        self.path = Path(run_root) / LOCK_NAME
        self._warn = warn or (lambda msg: warnings.warn(msg, stacklevel=3))
        self._owned = False  # True if this object created the lock (and must remove it)

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.time(),
            "create_time": _process_start_time(os.getpid()),
        }
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                info = read_lock(self.path.parent)
                if info is None:
                    continue  # removed between our open and our read: try again
                if info.get("pid") == os.getpid() and info.get("host") == me["host"]:
                    return self  # re-entrant: this process already holds it
                if _owner_alive(info):
                    raise RunLockedError(
                        f"{self.path.parent}: run directory is in use by pid {info.get('pid')} "
                        f"on {info.get('host')} (lock file {self.path}); stop that process first, "
                        f"or choose another run directory"
                    )
                self._warn(
                    f"{self.path}: taking over a stale lock from pid {info.get('pid')}, "
                    f"which is no longer running"
                )
                try:
                    self.path.unlink()
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(me, f)
                f.flush()
                os.fsync(f.fileno())
            self._owned = True
            return self
        raise RunLockedError(f"{self.path}: could not take the lock (another process raced for it)")

    def release(self) -> None:
        if not self._owned:
            return
        info = read_lock(self.path.parent)
        if info and info.get("pid") == os.getpid():
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
        self._owned = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
