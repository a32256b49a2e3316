"""A model shape for a time budget: one dial (minutes), as nanochat's depth is one dial.

`shape_for_budget(minutes, tokens_per_s_probe, probe_flops_per_token, vocab_size, ...)` picks
depth, width, context and batch so that the tokens the run will see stay at about
`tokens_per_param` per parameter (Chinchilla's compute-optimal 20, the ratio nanochat uses):

- the shapes are a family with one free number, the depth: width = 64 x depth, heads of 64,
  the SwiGLU rule for the MLP, context growing with depth (128 .. 1024);
- the probe (a few optimizer steps of a known model on this machine) gives the FLOP/s the
  machine reaches; each candidate's tokens/s is that divided by its FLOPs per token
  (6 x matmul parameters + attention, `LanguageModel.flops_per_token`);
- tokens seen = tokens/s x the usable share of the budget, capped at `max_epochs` passes over
  the corpus when its size is known (repeating data beyond a few epochs buys little);
- the deepest shape whose tokens seen / parameters is still >= `tokens_per_param` wins
  (deeper means more parameters and fewer tokens, so the ratio only falls with depth);
- the batch gives about `target_steps` optimizer steps, in whole sequences, but never fewer than
  `min_batch_tokens` tokens a step, with micro-batches of at most `max_micro_batch` sequences and
  the rest as gradient accumulation. Both numbers are measured at 10 CPU minutes (README,
  quality per minute): steps of ~2k tokens beat steps of 4k and 6k tokens at the same minutes
  (more updates while the loss falls fast), for 2 x 128 and for 4 x 256 alike.

`probe_tokens_per_s(cfg)` measures the probe on random tokens. The FLOP/s of small matmuls is
lower than of large ones, so shapes far from the probe's are estimated less well; probing the
preset's own model keeps the guess near the shapes that get picked.

`probe_step_seconds` is the one step-timing probe: this budget, `simone ablate`'s step budget and
bench/run_ablation.py all time optimizer steps through it, so each times what training runs (the
configured optimizer, accumulation and autocast dtype), eager (no compile).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from simone.config import Config, ModelConfig, analytic_param_count
from simone.model import LanguageModel, build_model
from simone.train.distributed import DistEnv, resolve_device
from simone.train.optim import new_optimizer
from simone.train.precision import autocast, autocast_dtype

ASPECT_RATIO = 64  # width per layer, as nanochat
HEAD_DIM = 64


@dataclass
class BudgetShape:
    n_layers: int
    dim: int
    n_heads: int
    max_seq_len: int
    batch_size: int  # sequences per micro-batch
    grad_accum: int
    params: int
    tokens_per_s: float  # expected, from the probe
    tokens: int  # expected tokens seen in the budget
    tokens_per_param: float
    steps: int  # expected optimizer steps

    def describe(self) -> str:
        return (
            f"{self.n_layers} layers x {self.dim} ({self.n_heads} heads), context {self.max_seq_len}, "
            f"batch {self.batch_size} x {self.grad_accum}; {self.params / 1e6:.2f}M parameters, "
            f"~{self.tokens / 1e6:.1f}M tokens at ~{self.tokens_per_s:,.0f} tokens/s "
            f"({self.tokens_per_param:.1f} tokens per parameter, ~{self.steps:,} steps)"
        )


def context_for_depth(depth: int) -> int:
    """Longer contexts for deeper models: 128 up to 2 layers, 256 up to 6, 512 up to 10, then 1024."""
    for max_depth, context in ((2, 128), (6, 256), (10, 512)):
        if depth <= max_depth:
            return context
    return 1024


def model_for_depth(depth: int, vocab_size: int, base: ModelConfig | None = None) -> ModelConfig:
    """The shape family: `depth` layers of width 64 x depth, heads of 64, context by depth.
    Everything else (architecture, governance, tying, norms) comes from `base`."""
    m = ModelConfig(**vars(base)) if base is not None else ModelConfig()
    m.n_layers, m.dim = depth, ASPECT_RATIO * depth
    m.n_heads, m.n_kv_heads, m.ffn_hidden = m.dim // HEAD_DIM, None, None
    m.max_seq_len, m.vocab_size = context_for_depth(depth), vocab_size
    return m


def training_flops_per_token(m: ModelConfig) -> float:
    """6 x matmul parameters + 12 x layers x dim x context (as `LanguageModel.flops_per_token`),
    from the config alone: the lookup tables (GPT-2's positions, an untied input embedding)
    do no matmul work."""
    matmul_params = (
        analytic_param_count(m)
        - (m.max_seq_len * m.dim if m.arch == "gpt2" else 0)
        - (0 if m.tie_embeddings else m.vocab_size * m.dim)
    )
    return 6.0 * matmul_params + 12.0 * m.n_layers * m.dim * m.max_seq_len


def shape_for_budget(
    minutes: float,
    tokens_per_s_probe: float,
    probe_flops_per_token: float,
    vocab_size: int,
    corpus_tokens: int | None = None,
    tokens_per_param: float = 20.0,
    max_epochs: float = 4.0,
    usable_fraction: float = 0.85,
    min_depth: int = 2,
    max_depth: int = 24,
    target_steps: int = 4000,
    min_batch_tokens: int = 2048,
    max_micro_batch: int = 16,
    base: ModelConfig | None = None,
) -> BudgetShape:
    """The deepest shape of the family that still sees >= `tokens_per_param` tokens per parameter
    in `minutes` (at least `min_depth` layers), with its batch. See the module docstring."""
    if minutes <= 0 or tokens_per_s_probe <= 0 or probe_flops_per_token <= 0:
        raise ValueError("shape_for_budget: minutes, the probe's tokens/s and its FLOPs per token must be > 0")
    flops_per_s = tokens_per_s_probe * probe_flops_per_token
    seconds = minutes * 60.0 * usable_fraction
    chosen = None
    for depth in range(min_depth, max_depth + 1):
        m = model_for_depth(depth, vocab_size, base)
        tokens_per_s = flops_per_s / training_flops_per_token(m)
        tokens = tokens_per_s * seconds
        if corpus_tokens:
            tokens = min(tokens, max_epochs * corpus_tokens)
        params = analytic_param_count(m)
        if chosen is not None and tokens / params < tokens_per_param:
            break
        chosen = (m, tokens_per_s, tokens, params)
    if chosen is None:
        raise ValueError(f"shape_for_budget: min_depth {min_depth} > max_depth {max_depth}")
    m, tokens_per_s, tokens, params = chosen
    sequences_per_step = max(
        math.ceil(min_batch_tokens / m.max_seq_len), 1, int(tokens // (target_steps * m.max_seq_len))
    )
    micro = min(sequences_per_step, max_micro_batch)
    accum = max(1, math.ceil(sequences_per_step / micro))
    steps = max(1, int(tokens // (micro * accum * m.max_seq_len)))
    return BudgetShape(
        n_layers=m.n_layers,
        dim=m.dim,
        n_heads=m.n_heads,
        max_seq_len=m.max_seq_len,
        batch_size=micro,
        grad_accum=accum,
        params=params,
        tokens_per_s=tokens_per_s,
        tokens=int(tokens),
        tokens_per_param=tokens / params,
        steps=steps,
    )


def apply_budget(cfg: Config, minutes: float, shape: BudgetShape, max_epochs: float = 4.0) -> Config:
    """Write `shape` into `cfg` and make `minutes` the training time cap (the schedule is then
    planned by time and ends at the cap)."""
    m, t = cfg.model, cfg.train
    m.n_layers, m.dim, m.n_heads, m.max_seq_len = shape.n_layers, shape.dim, shape.n_heads, shape.max_seq_len
    m.n_kv_heads = m.ffn_hidden = None
    t.batch_size, t.grad_accum = shape.batch_size, shape.grad_accum
    t.max_minutes = minutes
    t.num_epochs = max(1, math.ceil(max_epochs))
    t.min_epochs = min(t.min_epochs, t.num_epochs)
    return cfg


def probe_step_seconds(
    model: LanguageModel, cfg: Config, device: torch.device, next_batch: Callable[[], tuple], steps: int = 3
) -> float:
    """Seconds per optimizer step of `model` (on `device`) trained as `cfg.train` says:
    `grad_accum` micro-batches of `next_batch()` -> (x, y, domain_ids or None) under the training
    autocast, then a step of the configured optimizer. Eager; after one warm-up step."""
    tc = cfg.train
    model.train()
    opt = new_optimizer(model, tc, device)
    amp = autocast_dtype(tc.dtype, device)
    with_domains = getattr(model, "policy_head", None) is not None  # the policy head trains on them

    def step() -> None:
        for _ in range(tc.grad_accum):
            x, y, domains = next_batch()
            with autocast(amp, device):
                _, loss = model(x, y, **({"domain_ids": domains} if with_domains else {}))
            (loss / tc.grad_accum).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - t0) / steps


def probe_tokens_per_s(cfg: Config, steps: int = 3, device: str | None = None) -> tuple[float, float]:
    """(tokens/s, FLOPs per token) of a few optimizer steps (`probe_step_seconds`) of `cfg`'s
    model, governance off, on random tokens, on the training device."""
    m, t = cfg.model, cfg.train
    dev = resolve_device(device or t.device, DistEnv())
    probe_model = ModelConfig(**vars(m))
    probe_model.vocab_size = min(m.vocab_size, cfg.tokenizer.vocab_size)
    probe_model.governance = False
    torch.manual_seed(0)
    model = build_model(probe_model).to(dev)
    x = torch.randint(0, probe_model.vocab_size, (t.batch_size, m.max_seq_len), device=dev)
    seconds = probe_step_seconds(model, cfg, dev, lambda: (x, x, None), steps)
    return t.grad_accum * x.numel() / seconds, float(model.flops_per_token(m.max_seq_len))
