"""Early stopping with the original design's rule.

Train for at least `min_epochs` and at most `num_epochs` epochs. Every evaluation (periodic or
at an epoch end) reports the validation loss; the best one is remembered. Once `min_epochs`
epochs are complete, each evaluation that does not improve on the best counts against
`patience`; when `patience` such evaluations have happened in a row, training stops.
Evaluations before `min_epochs` still set the best loss but never count against patience,
so a slow start cannot end a run before its minimum length. `patience <= 0` switches early
stopping off (the run then lasts `num_epochs`, or until another cap).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class EarlyStopping:
    min_epochs: int
    num_epochs: int
    patience: int
    min_delta: float = 0.0  # an improvement must beat the best by more than this
    best_loss: float = math.inf
    best_step: int = -1
    bad_evals: int = 0  # non-improving evaluations in a row, counted after min_epochs
    stopped: bool = False

    def update(self, val_loss: float, step: int, epochs_done: int) -> bool:
        """Record one evaluation; return True if it is a new best.

        `epochs_done` is the number of completed epochs when the evaluation ran (an
        evaluation at the end of epoch 1 passes 1).
        """
        improved = math.isfinite(val_loss) and val_loss < self.best_loss - self.min_delta
        if improved:
            self.best_loss, self.best_step, self.bad_evals = val_loss, step, 0
        elif epochs_done >= self.min_epochs:
            self.bad_evals += 1
        if self.patience > 0 and epochs_done >= self.min_epochs and self.bad_evals >= self.patience:
            self.stopped = True
        return improved

    def should_stop(self, epochs_done: int) -> str | None:
        """The reason to stop now ("early_stop" or "num_epochs"), or None to keep going."""
        if epochs_done >= self.num_epochs:
            return "num_epochs"
        if self.stopped and epochs_done >= self.min_epochs:
            return "early_stop"
        return None

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("best_loss", "best_step", "bad_evals", "stopped"):
            if key in state:
                setattr(self, key, type(getattr(self, key))(state[key]))
