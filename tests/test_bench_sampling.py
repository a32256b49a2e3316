"""The fast top-k sampling path (simone/model/sampling.py, made for generation speed) draws
from the same distribution as filtering the whole vocabulary with `filter_logits`."""

from __future__ import annotations

import torch

from simone.model import filter_logits, sample_next_token


def test_top_k_fast_path_matches_filter_logits_distribution():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 40, generator=g) * 2
    for top_k, top_p in ((8, None), (8, 0.7), (30, 0.5)):
        expected = torch.softmax(filter_logits(logits / 0.9, top_k, top_p), dim=-1)[0]
        draws = sample_next_token(logits.expand(20000, -1), 0.9, top_k, top_p,
                                  torch.Generator().manual_seed(1)).flatten()
        assert draws.shape == (20000,)
        freq = torch.bincount(draws, minlength=40).float() / draws.numel()
        assert set(draws.unique().tolist()) <= set(torch.nonzero(expected).flatten().tolist())
        assert (freq - expected).abs().max() < 0.015, (top_k, top_p)


def test_top_k_sampling_is_seeded_per_row():
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(2))
    a = sample_next_token(logits, 1.0, 10, 0.9, torch.Generator().manual_seed(3))
    b = sample_next_token(logits, 1.0, 10, 0.9, torch.Generator().manual_seed(3))
    assert a.shape == (4, 1) and a.dtype == torch.long and torch.equal(a, b)
    top10 = torch.topk(logits, 10, dim=-1).indices
    assert all(int(a[i]) in top10[i].tolist() for i in range(4))
