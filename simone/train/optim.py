"""Learning-rate schedule: linear warmup, then cosine decay to a floor.

The schedule is a pure function of the step, so resuming a run only needs the step number
(and the rollback scale, stored with the training state) to land on the same learning rate.
"""

from __future__ import annotations

import math

import torch


def lr_at(step: int, base_lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Learning rate for the optimizer step with 0-based index `step`.

    Warmup rises linearly from base_lr/(warmup+1) to base_lr over `warmup_steps` steps; then a
    half cosine falls to `base_lr * min_lr_ratio` at `total_steps`, and stays there after.
    """
    min_lr = base_lr * min_lr_ratio
    if step < warmup_steps:
        return base_lr * (step + 1) / (warmup_steps + 1)
    if step >= total_steps or total_steps <= warmup_steps:
        return min_lr
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (base_lr - min_lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group (as a float: keeps fused kernels happy)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def optimizer_skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """True if `optimizer.step()` honours a `found_inf` tensor (fused Adam/AdamW do).

    Such an optimizer can skip a step whose gradients are not finite entirely on the device:
    no host synchronisation, parameters, moments and step count left untouched.
    """
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))
