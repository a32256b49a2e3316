"""Fault injection for tests: the one place that reads the `SIMONE_FAULT_*` variables.

Fault-tolerance code paths (non-finite losses, a full disk, a process killed half-way through
a checkpoint) are rare in real runs, so tests switch them on from outside through environment
variables. Nothing here has any effect unless a variable is set.

    SIMONE_FAULT_NAN_AT_STEP   steps whose loss is made NaN: "7", "7,9", "12-14", "12+" (12 on)
    SIMONE_FAULT_NAN_ONCE      "1": each listed step fires only the first time it is reached,
                               so a rollback to an earlier checkpoint can recover
    SIMONE_FAULT_ENOSPC_ON_SAVE "1": every checkpoint save fails with ENOSPC after writing part
                               of the weights; "N": only saves of step >= N fail
    SIMONE_FAULT_SLOW_SAVE     seconds to sleep between the files of a checkpoint save (widens
                               the window in which a test can kill the process mid-save)
    SIMONE_FAULT_STEP_DELAY    seconds to sleep after every optimizer step (keeps a test's run
                               alive long enough to be signalled or raced)
    SIMONE_FAULT_OOM_AT_STEP   "N": step N raises torch.OutOfMemoryError, as a full GPU would
    SIMONE_FAULT_KILL_BETWEEN_RENAMES "N": a re-save of step N kills the process (SIGKILL) after
                               the old copy is renamed aside and before the new one is in place
    SIMONE_FAULT_SIGTERM_AT_STEP  "N": behave as if SIGTERM arrived once step N is done
                               (a deterministic stand-in for a scheduler's signal)
"""

from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass, field


def _parse_steps(spec: str) -> tuple[set[int], int | None]:
    """'7,9,12-14,20+' -> ({7, 9, 12, 13, 14}, 20). Empty -> (set(), None)."""
    steps: set[int] = set()
    open_from: int | None = None
    for part in spec.replace(" ", "").split(","):
        if not part:
            continue
        if part.endswith("+"):
            start = int(part[:-1])
            open_from = start if open_from is None else min(open_from, start)
        elif "-" in part:
            a, b = part.split("-", 1)
            steps.update(range(int(a), int(b) + 1))
        else:
            steps.add(int(part))
    return steps, open_from


def _int_or_none(value: str | None) -> int | None:
    return int(value) if value and value.strip() else None


@dataclass
class Faults:
    """Which faults to inject; `Faults()` injects none."""

    nan_steps: set[int] = field(default_factory=set)
    nan_from: int | None = None
    nan_once: bool = False
    enospc_from_step: int | None = None
    slow_save_s: float = 0.0
    sigterm_at_step: int | None = None
    oom_at_step: int | None = None
    step_delay_s: float = 0.0
    kill_between_renames_step: int | None = None
    _fired: set[int] = field(default_factory=set)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Faults:
        env = os.environ if env is None else env
        nan_steps, nan_from = _parse_steps(env.get("SIMONE_FAULT_NAN_AT_STEP", ""))
        enospc = env.get("SIMONE_FAULT_ENOSPC_ON_SAVE", "").strip()
        return cls(
            nan_steps=nan_steps,
            nan_from=nan_from,
            nan_once=env.get("SIMONE_FAULT_NAN_ONCE", "") == "1",
            enospc_from_step=(int(enospc) if enospc else None),
            slow_save_s=float(env.get("SIMONE_FAULT_SLOW_SAVE", "0") or 0),
            sigterm_at_step=_int_or_none(env.get("SIMONE_FAULT_SIGTERM_AT_STEP")),
            oom_at_step=_int_or_none(env.get("SIMONE_FAULT_OOM_AT_STEP")),
            step_delay_s=float(env.get("SIMONE_FAULT_STEP_DELAY", "0") or 0),
            kill_between_renames_step=_int_or_none(env.get("SIMONE_FAULT_KILL_BETWEEN_RENAMES")),
        )

    @property
    def active(self) -> bool:
        return bool(
            self.nan_steps
            or self.nan_from is not None
            or self.enospc_from_step is not None
            or self.slow_save_s
            or self.sigterm_at_step is not None
            or self.oom_at_step is not None
            or self.step_delay_s
            or self.kill_between_renames_step is not None
        )

    def nan_at(self, step: int) -> bool:
        """True if the loss of optimizer step `step` should be replaced by NaN."""
        hit = step in self.nan_steps or (self.nan_from is not None and step >= self.nan_from)
        if not hit:
            return False
        if self.nan_once:
            if step in self._fired:
                return False
            self._fired.add(step)
        return True

    def sigterm_at(self, step: int) -> bool:
        """True if a simulated SIGTERM should be seen after step `step`."""
        return self.sigterm_at_step is not None and step == self.sigterm_at_step

    def oom_at(self, step: int) -> bool:
        """True if optimizer step `step` should fail as if the GPU ran out of memory."""
        return self.oom_at_step is not None and step == self.oom_at_step

    def check_save(self, step: int) -> None:
        """Raise ENOSPC if a save of `step` should fail (called after part of a file is written)."""
        if self.enospc_from_step is not None and step >= self.enospc_from_step:
            raise OSError(errno.ENOSPC, "No space left on device (injected by SIMONE_FAULT_ENOSPC_ON_SAVE)")

    def between_renames(self, step: int) -> None:
        """Die like a `kill -9` in the middle of swapping a re-saved checkpoint into place."""
        if self.kill_between_renames_step is not None and step == self.kill_between_renames_step:
            os.kill(os.getpid(), signal.SIGKILL)

    def step_delay(self) -> None:
        if self.step_delay_s > 0:
            time.sleep(self.step_delay_s)

    def slow_save(self) -> None:
        if self.slow_save_s > 0:
            time.sleep(self.slow_save_s)
