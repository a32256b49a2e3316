"""One live process per run directory: an `fcntl.flock` on `RUN/.lock`.

The kernel holds the lock for the process and drops it when the process dies (a `kill -9`,
a crash, a reboot), so there is no stale-lock takeover to get wrong: whoever gets the flock
owns the run. The file also holds `{pid, host, started}`, written after the lock is taken,
only so that a refused process can say who owns the run.

The lock is re-entrant within one process: `simone run` holds it for the whole pipeline and
each stage, and `train()`, takes it again without deadlocking itself (a second flock on a
new file description would block even in the same process, so one is shared).

The file is removed on release. To make that safe, a process that gets the flock checks
that the path still names the file it locked (another owner may have removed it meanwhile);
if not, it tries again on the new file.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from simone.errors import SimoneError

LOCK_NAME = ".lock"

# path -> [fd, depth, pid]: the locks this process holds (a forked child's copy is not its own)
_HELD: dict[str, list[int]] = {}
_HELD_GUARD = threading.Lock()


class RunLockedError(SimoneError, RuntimeError):
    """Another live process is working in this run directory."""


def read_lock(run_root: Path) -> dict[str, Any] | None:
    """The owner info in a lock file: None without one, {} when empty or unreadable."""
    try:
        info = json.loads((Path(run_root) / LOCK_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _alive(pid: Any) -> bool:
    return isinstance(pid, int) and pid > 0 and psutil.pid_exists(pid)


class RunLock:
    """Context manager: `with RunLock(run.root): ...` holds the run directory for this process."""

    def __init__(self, run_root: str | Path, warn: Callable[[str], None] | None = None):
        self.path = Path(run_root) / LOCK_NAME
        self._warn = warn or (lambda msg: warnings.warn(msg, stacklevel=3))
        self._key = ""
        self._held = False

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._key = os.path.realpath(self.path)
        with _HELD_GUARD:
            held = _HELD.get(self._key)
            if held is not None and held[2] == os.getpid():
                held[1] += 1  # re-entrant: this process already holds it
                self._held = True
                return self
            for _ in range(10):
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    info = read_lock(self.path.parent) or {}
                    raise RunLockedError(
                        f"{self.path.parent}: run directory is in use by pid {info.get('pid', '?')} "
                        f"on {info.get('host', '?')} (lock file {self.path}); stop that process first, "
                        f"or choose another run directory"
                    ) from None
                try:
                    same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same_file = False
                if not same_file:  # the previous owner removed it as we opened it: again
                    os.close(fd)
                    continue
                self._record_owner(fd)
                _HELD[self._key] = [fd, 1, os.getpid()]
                self._held = True
                return self
        raise RunLockedError(f"{self.path}: could not take the lock (other processes keep racing for it)")

    def _record_owner(self, fd: int) -> None:
        """Write who holds the lock (for other processes' messages)."""
        previous = read_lock(self.path.parent)
        if previous and previous.get("pid") not in (None, os.getpid()) and not _alive(previous.get("pid")):
            self._warn(
                f"{self.path}: taking over a stale lock from pid {previous.get('pid')}, which is no longer running"
            )
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode("utf-8"), 0)

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        with _HELD_GUARD:
            held = _HELD.get(self._key)
            if held is None or held[2] != os.getpid():
                return
            held[1] -= 1
            if held[1] > 0:
                return
            del _HELD[self._key]
            fd = held[0]
            self.path.unlink(missing_ok=True)  # removed while the lock is still held (module docstring)
            os.close(fd)  # closing the last descriptor releases the flock

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
