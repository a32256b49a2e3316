"""What is applied to the model from outside before training, torchtitan's way: activation
checkpointing, FSDP2 sharding, `torch.compile` and DDP. The model itself stays plain PyTorch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
from torch.utils.checkpoint import checkpoint

from simone.config import TrainConfig
from simone.model import LanguageModel
from simone.train.distributed import DistEnv, wrap_model
from simone.train.precision import compiler_missing


def apply_activation_checkpointing(model: LanguageModel) -> None:
    """Recompute each transformer block's activations in the backward pass instead of storing
    them (less memory, ~1/3 more compute). Applied from outside, like compile and DDP: the
    block's `forward` is wrapped in place, so parameter names (and checkpoints) are unchanged."""
    for block in model.layers:

        def forward(*args: Any, _forward: Any = block.forward, **kwargs: Any) -> Any:
            if torch.is_grad_enabled():
                return checkpoint(_forward, *args, use_reentrant=False, **kwargs)
            return _forward(*args, **kwargs)

        block.forward = forward


def parallelize(
    raw_model: LanguageModel,
    tc: TrainConfig,
    parallel: str,
    env: DistEnv,
    device: torch.device,
    log: Callable[[str], None],
) -> torch.nn.Module:
    """The module to train: `raw_model` with, in this order, activation checkpointing,
    sharding (FSDP2 shards `raw_model` in place), compile and DDP applied as `tc` and
    `parallel` ("ddp" | "fsdp", from distributed.check_parallel) ask. Build the optimizer
    after this: FSDP2 replaces the parameters. `log` gets one line when compile is skipped."""
    if tc.activation_checkpointing:
        apply_activation_checkpointing(raw_model)
    model: torch.nn.Module = raw_model
    if parallel == "fsdp":
        model = wrap_model(raw_model, env, device, "fsdp")
    if tc.compile:
        missing = compiler_missing()
        if missing:
            log(f"train.compile=true but {missing}; training runs eager")
        else:
            model = cast(torch.nn.Module, torch.compile(model))  # an OptimizedModule, typed as a callable
    if parallel == "ddp":
        model = wrap_model(model, env, device, "ddp")
    return model
