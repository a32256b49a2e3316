"""Validation loss, perplexity and bits-per-byte, overall and per domain.

One function serves the trainer's periodic evaluation and `simone validate`, so the numbers
in metrics.jsonl and in the validation report mean the same thing. Bits-per-byte divides the
summed loss (in bits) by the UTF-8 bytes of text the evaluated tokens cover, which makes
models with different tokenizers comparable.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch

from simone.data.loader import eval_windows
from simone.data.shards import TokenShard


@torch.no_grad()
def evaluate_per_domain(
    model: torch.nn.Module,
    shard: TokenShard,
    seq_len: int,
    batch_size: int,
    max_batches: int,
    device: torch.device | str = "cpu",
    autocast: Callable[[], AbstractContextManager] = contextlib.nullcontext,
) -> dict[str, Any]:
    """Mean loss over up to `max_batches` batches of each domain's validation windows.

    Returns {val_loss, val_ppl, val_bpb, tokens, per_domain: {DOMAIN: {loss, ppl, bpb, tokens}}};
    the overall numbers weight each domain by its evaluated tokens. The model's train/eval
    mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    per_domain: dict[str, dict[str, float]] = {}
    total_nats = total_tokens = total_bytes = 0.0
    try:
        for domain in sorted(shard.domains):
            nats = torch.zeros((), dtype=torch.float64, device=device)  # summed on device: one sync per domain
            n_tokens = 0
            for x, y in eval_windows(
                shard, domain, seq_len=seq_len, max_batches=max_batches, batch_size=batch_size, device=device
            ):
                # a masked shard (chat data) counts only the targets the loss does (not -1)
                n = y.numel() if shard.mask is None else int((y != -1).sum())
                if n == 0:
                    continue
                with autocast():
                    _, loss = model(x, y)
                nats += loss.double() * n
                n_tokens += n
            if n_tokens == 0:
                continue
            mean = nats.item() / n_tokens
            n_bytes = n_tokens * shard.bytes_per_token(domain)
            per_domain[domain] = {
                "loss": mean,
                "ppl": math.exp(min(mean, 700.0)),
                "bpb": mean * n_tokens / math.log(2) / n_bytes,
                "tokens": n_tokens,
            }
            total_nats += mean * n_tokens
            total_tokens += n_tokens
            total_bytes += n_bytes
    finally:
        model.train(was_training)
    if total_tokens == 0:
        return {"val_loss": None, "val_ppl": None, "val_bpb": None, "tokens": 0, "per_domain": {}}
    loss = total_nats / total_tokens
    return {
        "val_loss": loss,
        "val_ppl": math.exp(min(loss, 700.0)),
        "val_bpb": total_nats / math.log(2) / total_bytes,
        "tokens": int(total_tokens),
        "per_domain": per_domain,
    }
