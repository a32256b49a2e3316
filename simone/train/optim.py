"""The optimizers, over the parameter kinds the model names (`LanguageModel.param_kinds`).

`train.optimizer` picks one: "adamw" (weight decay on matrices and embeddings, none on biases
and norms) or "muon" (`MuonWithAdamW`: `torch.optim.Muon` for the matrices inside the
transformer blocks, AdamW for embeddings, output head, norms and biases, as the fastest public
GPT training runs do). `new_optimizer(model, train_cfg, device)` builds the one the config
names; the learning rate of each step comes from simone/train/schedule.py.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, TypeAlias

import torch
from torch import nn

from simone.config import TrainConfig
from simone.errors import SimoneError
from simone.model import LanguageModel
from simone.train.precision import cpu_has_fast_bf16

OPTIMIZERS = ("adamw", "muon")


class OptimizerConfigError(SimoneError, ValueError):
    """`train.optimizer` names an optimizer we do not have, or one that cannot run here."""


def set_lr(optimizer: TrainingOptimizer, lr: float) -> None:
    """Set the learning rate of every parameter group (as a float: keeps fused kernels happy),
    times the group's own `lr_scale` where it has one (Muon's groups: `train.muon_lr_scale`)."""
    for group in optimizer.param_groups:
        group["lr"] = float(lr * group.get("lr_scale", 1.0))


def optimizer_skips_on_device(optimizer: TrainingOptimizer) -> bool:
    """True if `optimizer.step()` honours a `found_inf` tensor (fused Adam/AdamW do).

    Such an optimizer can skip a step whose gradients are not finite entirely on the device:
    no host synchronisation, parameters, moments and step count left untouched.
    """
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


# ----------------------------------------------------------------------------- Muon + AdamW


class MuonWithAdamW:
    """Two optimizers stepped as one: Muon for the hidden matrices, AdamW for the rest.

    Exposes what the trainer uses of an optimizer: `param_groups` (Muon's groups first, so
    `set_lr` reaches both), `step`, `zero_grad`, `state_dict` / `load_state_dict` (one dict
    holding both, so a checkpoint round-trips). It does not take `found_inf`, so the trainer
    checks a step's finiteness on the host (one sync a step, as for any non-fused optimizer).
    """

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer):
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.muon.param_groups + self.adamw.param_groups

    def step(self) -> None:
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"muon", "adamw"}:
            raise OptimizerConfigError(
                "optimizer state is not Muon+AdamW (was the checkpoint saved with "
                "train.optimizer=adamw? resume it with the same optimizer)"
            )
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


TrainingOptimizer: TypeAlias = torch.optim.Optimizer | MuonWithAdamW  # what `new_optimizer` builds


def newton_schulz_float32(
    g: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float
) -> torch.Tensor:
    """The Newton-Schulz iteration Muon uses to push `g` towards the nearest (semi-)orthogonal
    matrix (the quintic with coefficients a, b, c), in float32 instead of bfloat16."""
    a, b, c = coefficients
    x = g.float()
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / (x.norm() + eps)
    for _ in range(steps):
        xx = x @ x.T
        x = a * x + (b * xx + c * xx @ xx) @ x
    return (x.T if tall else x).to(g.dtype)


class Float32Muon(torch.optim.Muon):
    """`torch.optim.Muon` with its Newton-Schulz iteration in float32, for CPUs without native
    bf16 (no AMX, no AVX512-BF16): there a bf16 matmul is emulated, ~8x slower than a float32 one
    (704x256 by 256x704: 87.5 against 11.2 ms on a 2-core AMD EPYC), and the stock optimizer's
    step took three times the `cpu` preset's forward and backward. Same hyperparameters, the
    same state (`momentum_buffer`), so checkpoints move between the two, and the same per-shape
    learning-rate adjustment (`adjust_lr_fn`)."""

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            lr, wd, momentum = group["lr"], group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                update = newton_schulz_float32(update, group["ns_coefficients"], group["ns_steps"], group["eps"])
                p.mul_(1 - lr * wd)
                p.add_(update, alpha=-lr * muon_lr_ratio(p.shape, group["adjust_lr_fn"]))


def muon_lr_ratio(shape: torch.Size, adjust_lr_fn: str | None) -> float:
    """Muon's learning-rate factor for a [rows, cols] matrix, as torch.optim.Muon reckons it:
    "match_rms_adamw" 0.2·sqrt(max(rows, cols)) (updates of AdamW's size), "original" (nanochat's
    per-shape scaling) sqrt(max(1, rows/cols))."""
    rows, cols = shape[:2]
    return 0.2 * math.sqrt(max(rows, cols)) if adjust_lr_fn == "match_rms_adamw" else math.sqrt(max(1, rows / cols))


def hidden_matrices(model: LanguageModel) -> list[nn.Parameter]:
    """The weights of the linear layers inside the transformer blocks: what Muon orthogonalises.
    Embeddings, the output head (tied or not), norms, biases, memory slots and the governance
    heads stay with AdamW."""
    return [p for kind, p in model.param_kinds() if kind == "block_matrix"]


def new_adamw(
    kinds: list[tuple[str, nn.Parameter]],
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    device_type: str,
    fused: bool | None = None,
    embed_lr_scale: float = 1.0,
    head_lr_scale: float = 1.0,
) -> torch.optim.AdamW:
    """AdamW over (kind, parameter) pairs: matrices and embeddings decayed, vectors (biases,
    norms) not. With `embed_lr_scale` ≠ 1 the embeddings (and with `head_lr_scale` ≠ 1 an untied
    output head) get a decayed group of their own whose `lr_scale` `set_lr` multiplies; two groups
    otherwise, so checkpoints written before these options load. fused=None: the fused kernel on
    CUDA and on CPU (PyTorch ≥ 2.4 has a fused CPU AdamW: 3.3 ms against 17.5 ms for the for-each
    one, one step of the `cpu` preset's 4.3M parameters on one thread); False switches it off."""
    scales = {"embedding": embed_lr_scale, "head": head_lr_scale}
    apart = [name for name, scale in scales.items() if scale != 1.0 and any(kind == name for kind, _ in kinds)]
    groups = [
        {"params": [p for kind, p in kinds if kind != "vector" and kind not in apart], "weight_decay": weight_decay},
        {"params": [p for kind, p in kinds if kind == "vector"], "weight_decay": 0.0},
    ]
    for name in apart:
        own = [p for kind, p in kinds if kind == name]
        groups.append({"params": own, "weight_decay": weight_decay, "lr_scale": scales[name], "lr": lr * scales[name]})
    fused_supported = "fused" in inspect.signature(torch.optim.AdamW).parameters
    if fused is None:
        fused = fused_supported and device_type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, **({"fused": True} if fused and fused_supported else {}))


def build_optimizer(
    model: LanguageModel,
    name: str,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    device_type: str,
    fused: bool | None = None,
    muon_lr_scale: float = 4.0,
    embed_lr_scale: float = 1.0,
    head_lr_scale: float = 1.0,
    muon_shape_scaling: bool = False,
) -> TrainingOptimizer:
    """The optimizer `name` ("adamw" or "muon") over `model`'s trainable parameters.

    "muon": Muon (momentum 0.95, Nesterov, 5 Newton-Schulz steps; in float32 on a CPU whose
    bf16 is emulated, `Float32Muon`) with the `match_rms_adamw`
    learning-rate adjustment, so its updates have AdamW's size and it takes the same learning
    rate and weight decay (one schedule drives both; `muon_lr_scale` multiplies Muon's), or with
    `muon_shape_scaling` nanochat's per-shape adjustment instead (`muon_lr_ratio`); AdamW, as for
    "adamw", for everything else. `embed_lr_scale` multiplies the embeddings' learning rate (and
    the tied output head's), `head_lr_scale` an untied head's, in either.
    """
    kinds = model.param_kinds()
    if name == "adamw":
        return new_adamw(kinds, lr, weight_decay, betas, device_type, fused, embed_lr_scale, head_lr_scale)
    if name != "muon":
        raise OptimizerConfigError(f"train.optimizer={name!r}: choose one of {', '.join(OPTIMIZERS)}")
    if not hasattr(torch.optim, "Muon"):
        raise OptimizerConfigError(
            f"train.optimizer=muon needs torch.optim.Muon (PyTorch >= 2.9; this is {torch.__version__})"
        )
    matrices = [p for kind, p in kinds if kind == "block_matrix"]
    if any(type(p).__name__ == "DTensor" for p in matrices):
        raise OptimizerConfigError(
            "train.optimizer=muon needs whole matrices: it does not run with train.parallel=fsdp; use ddp"
        )
    muon_class = Float32Muon if device_type == "cpu" and not cpu_has_fast_bf16() else torch.optim.Muon
    muon = muon_class(
        [{"params": matrices, "lr_scale": muon_lr_scale}],
        lr=lr * muon_lr_scale,
        weight_decay=weight_decay / muon_lr_scale,  # decay is lr x wd: keep AdamW's
        momentum=0.95,
        nesterov=True,
        adjust_lr_fn="original" if muon_shape_scaling else "match_rms_adamw",
    )
    rest = [(kind, p) for kind, p in kinds if kind != "block_matrix"]
    adamw = new_adamw(rest, lr, weight_decay, betas, device_type, fused, embed_lr_scale, head_lr_scale)
    return MuonWithAdamW(muon, adamw)


def new_optimizer(model: LanguageModel, tc: TrainConfig, device: torch.device) -> TrainingOptimizer:
    """The optimizer `tc` asks for over the (unwrapped) training model: every caller that trains
    or times training builds it here."""
    return build_optimizer(
        model,
        tc.optimizer,
        lr=tc.lr,
        weight_decay=tc.weight_decay,
        betas=(tc.beta1, tc.beta2),
        device_type=device.type,
        fused=None if tc.fused_adamw else False,
        muon_lr_scale=tc.muon_lr_scale,
        embed_lr_scale=tc.embed_lr_scale,
        head_lr_scale=tc.head_lr_scale,
        muon_shape_scaling=tc.muon_shape_scaling,
    )
