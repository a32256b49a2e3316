"""Batch loader: epoch coverage, seeded order, exact resume, rank sharding, eval windows."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from simone.data.loader import BatchLoader, bits_per_byte, eval_windows
from simone.data.shards import TokenShard

T = 8  # seq_len


def make_shard(data_dir: Path, n_tokens: int, domains: dict[str, int] | None = None) -> TokenShard:
    """A shard whose token at position p is p (uint32), so a batch tells where it came from."""
    data_dir.mkdir(parents=True, exist_ok=True)
    np.arange(n_tokens, dtype=np.uint32).tofile(data_dir / "train.bin")
    domains = domains or {"all": n_tokens}
    assert sum(domains.values()) == n_tokens
    dom_index, start = {}, 0
    for name, size in domains.items():
        dom_index[name] = {"start": start, "end": start + size, "n_tokens": size, "n_bytes": 3 * size,
                           "n_docs": 1, "ranges": [[start, start + size]]}
        start += size
    split = {"file": "train.bin", "n_tokens": n_tokens, "n_bytes": 3 * n_tokens, "n_docs": len(domains),
             "docs": [], "domains": dom_index}
    index = {"schema": 1, "dtype": "uint32", "vocab_size": 2**32 - 1, "eod_id": 0, "tokenizer_sha256": "",
             "splits": {"train": split}}
    (data_dir / "index.json").write_text(json.dumps(index), encoding="utf-8")
    return TokenShard(data_dir, "train")


def window_ids(x: torch.Tensor) -> list[int]:
    return (x[:, 0] // T).tolist()


def take(loader: BatchLoader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [loader.next_batch() for _ in range(n)]


@pytest.fixture
def shard(tmp_path):
    return make_shard(tmp_path / "data", 48 * T + 1)  # exactly 48 windows


def test_epoch_covers_every_window_exactly_once(shard):
    loader = BatchLoader(shard, batch_size=4, seq_len=T, seed=1)
    assert loader.batches_per_epoch == 12
    seen = []
    for i in range(12):
        assert not loader.epoch_done and loader.epoch == 0
        x, y = loader.next_batch()
        assert x.shape == y.shape == (4, T) and x.dtype == y.dtype == torch.int64
        assert torch.equal(y, x + 1)  # targets are the inputs shifted by one token
        assert torch.equal(x[:, 0] % T, torch.zeros(4, dtype=torch.int64))
        seen += window_ids(x)
        assert loader.epoch_progress == pytest.approx((i + 1) / 12)
    assert loader.epoch_done and loader.epoch == 0
    assert sorted(seen) == list(range(48))
    # the next call starts epoch 1, in a new order, again covering everything
    second = []
    for _ in range(12):
        second += window_ids(loader.next_batch()[0])
        assert loader.epoch == 1
    assert loader.epoch_done
    assert sorted(second) == list(range(48)) and second != seen


def test_partial_tail_is_skipped_without_repeats(tmp_path):
    shard = make_shard(tmp_path / "d", 50 * T + 5)  # 50 windows, batches of 4*3 per step
    loader = BatchLoader(shard, batch_size=4, seq_len=T, seed=2, grad_accum=3)
    assert loader.batches_per_epoch == 12  # floor(50 / 12) steps * 3 micro-batches
    seen = [w for x, _ in take(loader, 12) for w in window_ids(x)]
    assert len(seen) == len(set(seen)) == 48 and max(seen) < 50
    with pytest.raises(ValueError, match="fewer than one optimizer step"):
        BatchLoader(shard, batch_size=64, seq_len=T, seed=0)


def test_seed_determines_order(shard):
    def order(seed):
        return [w for x, _ in take(BatchLoader(shard, 4, T, seed=seed), 12) for w in window_ids(x)]

    assert order(5) == order(5)
    assert order(5) != order(6)


@pytest.mark.parametrize("prefetch", [False, True])
def test_resume_reproduces_remaining_batches(shard, prefetch):
    reference = BatchLoader(shard, 4, T, seed=3, prefetch=prefetch)
    expected = take(reference, 30)  # crosses two epoch boundaries (12 per epoch)
    for cut in (0, 5, 12, 13, 24):
        first = BatchLoader(shard, 4, T, seed=3, prefetch=prefetch)
        take(first, cut)
        state = json.loads(json.dumps(first.state_dict()))  # plain data, survives JSON
        resumed = BatchLoader(shard, 4, T, seed=3, prefetch=prefetch)
        resumed.load_state_dict(state)
        assert resumed.epoch == first.epoch and resumed.epoch_done == first.epoch_done
        for (x, y), (ex, ey) in zip(take(resumed, 30 - cut), expected[cut:]):
            assert torch.equal(x, ex) and torch.equal(y, ey)
        first.close()
        resumed.close()
    with pytest.raises(ValueError, match="seed"):
        BatchLoader(shard, 4, T, seed=4).load_state_dict(reference.state_dict())
    reference.close()


def test_ranks_split_the_global_batch(shard):
    single = BatchLoader(shard, batch_size=6, seq_len=T, seed=9)
    ranks = [BatchLoader(shard, batch_size=2, seq_len=T, seed=9, rank=r, world_size=3) for r in range(3)]
    assert single.batches_per_epoch == ranks[0].batches_per_epoch == 8
    for _ in range(10):
        gx, gy = single.next_batch()
        parts = [r.next_batch() for r in ranks]
        for r, (x, y) in enumerate(parts):
            assert torch.equal(x, gx[r::3]) and torch.equal(y, gy[r::3])  # strided slice
        assert len({w for x, _ in parts for w in window_ids(x)}) == 6  # disjoint


def test_two_processes_with_accum_match_one_process_with_double_accum(tmp_path):
    shard = make_shard(tmp_path / "d", 101 * T + 1)  # 101 windows: the tail must match too
    one = BatchLoader(shard, batch_size=2, seq_len=T, seed=11, grad_accum=4)
    two = [BatchLoader(shard, batch_size=2, seq_len=T, seed=11, rank=r, world_size=2, grad_accum=2)
           for r in range(2)]
    steps = one.batches_per_epoch // 4
    assert steps == two[0].batches_per_epoch // 2  # same optimizer steps per epoch
    assert steps == 12  # floor(101 / 8)
    for _ in range(steps * 2):  # two epochs of optimizer steps
        step_one = sorted(w for x, _ in take(one, 4) for w in window_ids(x))
        step_two = sorted(w for r in two for x, _ in take(r, 2) for w in window_ids(x))
        assert step_one == step_two
        assert one.epoch == two[0].epoch == two[1].epoch


def test_eval_windows_are_deterministic_and_inside_the_domain(tmp_path):
    shard = make_shard(tmp_path / "d", 1000, {"a": 300, "b": 650, "tiny": 5, "c": 45})
    for domain, (lo, hi) in [(d, shard.domain_range(d)) for d in shard.domains] + [(None, (0, 1000))]:
        batches = list(eval_windows(shard, domain, seq_len=T, max_batches=3, batch_size=4))
        again = list(eval_windows(shard, domain, seq_len=T, max_batches=3, batch_size=4))
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))
        assert len(batches) <= 3
        xs = torch.cat([x for x, _ in batches])
        ys = torch.cat([y for _, y in batches])
        assert torch.equal(ys, xs + 1)
        assert int(xs.min()) >= lo and int(ys.max()) < hi  # inputs and targets inside the range
        starts = xs[:, 0].tolist()
        assert starts == sorted(set(starts)) and starts[0] == lo
        available = (hi - lo - 1) // T
        if available:
            assert len(starts) == min(12, available)
            assert all((s - lo) % T == 0 for s in starts)
            if available > 12:  # spread over the range, not just its head
                assert starts[-1] >= lo + (hi - lo) * 0.8 - T
    tiny = list(eval_windows(shard, "tiny", seq_len=T, max_batches=3, batch_size=4))
    assert len(tiny) == 1 and tiny[0][0].shape == (1, 4)  # a short range: one short window


def test_bits_per_byte(tmp_path):
    shard = make_shard(tmp_path / "d", 100)  # 3 bytes per token
    assert bits_per_byte(math.log(2) * 3, shard) == pytest.approx(1.0)
    assert bits_per_byte(math.log(2), shard, "all") == pytest.approx(1 / 3)


def test_window_control_tokens_replace_the_first_input_of_chosen_windows(tmp_path):
    from simone.data.loader import window_uniform

    shard = make_shard(tmp_path / "data", 96 * T + 1, {"a": 40 * T + 3, "b": 56 * T - 2})
    ids = {"a": 10_000, "b": 20_000}
    plain = BatchLoader(shard, 4, T, seed=5)
    marked = BatchLoader(shard, 4, T, seed=5, control_ids=ids, control_window_prob=0.5)
    prefetched = BatchLoader(shard, 4, T, seed=5, control_ids=ids, control_window_prob=0.5, prefetch=True)
    replaced = 0
    for _ in range(plain.batches_per_epoch):
        x, y = plain.next_batch()
        xm, ym = marked.next_batch()
        xp, _ = prefetched.next_batch()
        assert torch.equal(xm, xp)  # a pure function of the window: prefetch changes nothing
        assert torch.equal(y, ym) and torch.equal(x[:, 1:], xm[:, 1:])  # only the first input token
        for row in range(4):
            start = int(x[row, 0])  # the shard's token at p is p: the window's start
            chosen = window_uniform(5, np.array([start // T]))[0] < 0.5
            if chosen:
                text_start = start + 1  # the control token names the domain the text starts in
                assert int(xm[row, 0]) == (ids["a"] if text_start < 40 * T + 3 else ids["b"])
                replaced += 1
            else:
                assert int(xm[row, 0]) == start
    assert 0.3 < replaced / (4 * plain.batches_per_epoch) < 0.7  # about half the windows
    # every window at 1.0, none without control ids
    everything = BatchLoader(shard, 4, T, seed=5, control_ids=ids, control_window_prob=1.0)
    assert set(everything.next_batch()[0][:, 0].tolist()) <= set(ids.values())
    unmarked = BatchLoader(shard, 4, T, seed=5, control_ids=None, control_window_prob=1.0)
    assert torch.equal(unmarked.next_batch()[0], BatchLoader(shard, 4, T, seed=5).next_batch()[0])
    with pytest.raises(ValueError, match="control_window_prob"):
        BatchLoader(shard, 4, T, seed=5, control_ids=ids, control_window_prob=1.5)
