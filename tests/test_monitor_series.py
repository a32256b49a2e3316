"""Downsampled series and file tailing: bounded memory, spikes kept, partial lines held back."""

from __future__ import annotations

import numpy as np
import pytest

from simone.monitor.downsample import MinMaxSeries
from simone.monitor.metrics_tail import FileTail, flatten_row, read_tail_lines


def test_series_stays_bounded_and_keeps_extremes() -> None:
    s = MinMaxSeries(max_buckets=100)
    rng = np.random.default_rng(0)
    ys = rng.normal(3.0, 0.1, 200_000)
    ys[123_457] = 50.0  # a loss spike
    ys[7] = -4.0
    xs = np.arange(len(ys), dtype=float)
    s.add_many(xs, ys)
    px, py = s.points()
    assert len(px) <= 4 * 100 + 4
    assert max(py) == 50.0 and px[py.index(50.0)] == 123_457
    assert min(py) == -4.0
    assert px == sorted(px) and px[0] == 0 and px[-1] == len(ys) - 1
    assert s.count == len(ys)


def test_add_many_equals_adding_one_by_one() -> None:
    rng = np.random.default_rng(1)
    xs, ys = np.arange(5003, dtype=float), rng.normal(size=5003)
    ys[100] = np.nan  # skipped
    a, b = MinMaxSeries(max_buckets=50), MinMaxSeries(max_buckets=50)
    a.add_many(xs[:1234], ys[:1234])
    a.add_many(xs[1234:], ys[1234:])
    for x, y in zip(xs, ys):
        b.add(float(x), float(y))
    assert a.points() == b.points() and a.count == b.count == 5002


def test_tail_holds_back_a_partial_line_and_survives_truncation(tmp_path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": 2')
    tail = FileTail(path)
    assert [ln for ch in tail.read_chunks() for ln in ch] == [b'{"a": 1}']
    assert tail.has_partial_line
    with open(path, "ab") as f:
        f.write(b'}\n{"a": 3}\n')
    assert [ln for ch in tail.read_chunks() for ln in ch] == [b'{"a": 2}', b'{"a": 3}']
    assert not tail.has_partial_line
    assert list(tail.read_chunks()) == []  # nothing new: nothing re-read
    path.write_bytes(b'{"a": 9}\n')  # replaced by a shorter file
    assert tail.changed()
    tail.reset()
    assert [ln for ch in tail.read_chunks() for ln in ch] == [b'{"a": 9}']


def test_tail_reads_big_files_in_bounded_chunks(tmp_path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_bytes(b"".join(b'{"i": %d}\n' % i for i in range(10_000)))
    tail = FileTail(path)
    chunks = list(tail.read_chunks(chunk_bytes=4096))
    assert len(chunks) > 10 and max(sum(len(x) for x in c) for c in chunks) <= 4096 + 20
    assert [int(ln[6:-1]) for c in chunks for ln in c] == list(range(10_000))
    assert read_tail_lines(path, 100)[-1] == b'{"i": 9999}'
    assert all(ln.startswith(b'{"i"') for ln in read_tail_lines(path, 100))


def test_an_overlong_line_is_dropped_whole_not_read_from_its_middle(tmp_path, monkeypatch) -> None:
    from simone.monitor import metrics_tail as runs_mod

    monkeypatch.setattr(runs_mod, "MAX_PENDING_BYTES", 1000)
    path = tmp_path / "m.jsonl"
    # one broken line, longer than the limit, whose end alone would be a valid row
    path.write_bytes(b'{"i": 0}\n' + b"x" * 3000 + b'{"kind": "train", "step": 9, "loss": 0.1}\n{"i": 1}\n')
    tail = FileTail(path)
    lines = [ln for ch in tail.read_chunks(chunk_bytes=500) for ln in ch]
    assert lines == [b'{"i": 0}', b'{"i": 1}'] and tail.dropped_lines == 1
    with open(path, "ab") as f:  # an overlong line still being written: dropped up to its newline
        f.write(b"y" * 1500)
    assert list(tail.read_chunks(chunk_bytes=500)) == []
    with open(path, "ab") as f:
        f.write(b'{"kind": "train"}\n{"i": 2}\n')
    assert [ln for ch in tail.read_chunks(chunk_bytes=500) for ln in ch] == [b'{"i": 2}'] and tail.dropped_lines == 2


def test_flatten_row_maps_each_kind_to_series() -> None:
    assert flatten_row({"kind": "train", "step": 5, "loss": 2.0, "lr": 1e-3, "mfu": True}) == [
        ("train/loss", 5.0, 2.0), ("train/lr", 5.0, 1e-3)]
    ev = flatten_row({"kind": "eval", "step": 9, "val_loss": 3.0, "per_domain": {"poetry": {"loss": 3.1, "bpb": 1.0}}})
    assert ("domain/poetry/bpb", 9.0, 1.0) in ev and ("eval/val_loss", 9.0, 3.0) in ev
    sysrow = flatten_row({"kind": "system", "t": 100.0, "cpu_percent": 10.0,
                          "gpus": [{"index": 1, "util": 99.0, "temp_c": None}]})
    assert sysrow == [("system/cpu_percent", 100.0, 10.0), ("gpu1/util", 100.0, 99.0)]
    assert flatten_row({"kind": "event", "event": "start"}) == []
    assert flatten_row({"kind": "train", "loss": 1.0}) == []  # no step: nowhere to plot it


@pytest.mark.parametrize("n", [1, 2, 3])
def test_tiny_series_return_every_point(n: int) -> None:
    s = MinMaxSeries(max_buckets=10)
    for i in range(n):
        s.add(i, i * 2.0)
    assert s.points() == ([float(i) for i in range(n)], [i * 2.0 for i in range(n)])


def test_bulk_column_path_matches_row_by_row_path() -> None:
    from simone.monitor.metrics_tail import MetricsIndex as _MetricsIndex

    rng = np.random.default_rng(2)
    rows = []
    for s in range(3000):
        rows.append({"t": float(s), "kind": "train", "step": s, "loss": float(rng.normal()), "lr": 1e-3,
                     "grad_norm": None if s % 7 == 0 else 1.0, "mfu": "n/a"})
        if s % 5 == 0:
            rows.append({"t": float(s), "kind": "system", "cpu_percent": float(s % 100),
                         "gpus": [{"index": 0, "util": 50.0}, {"index": 1, "util": 60.0}]})
        if s % 300 == 0:
            rows.append({"t": float(s), "kind": "eval", "step": s, "val_loss": 3.0 - s / 3000,
                         "per_domain": {"d": {"loss": 1.0, "bpb": 0.5}}})
    bulk, rowwise = _MetricsIndex(40, 10), _MetricsIndex(40, 10)
    bulk.ingest(rows, want_points=False)
    for i in range(0, len(rows), 100):
        rowwise.ingest(rows[i : i + 100], want_points=False)
    assert set(bulk.series) == set(rowwise.series) and "train/mfu" not in bulk.series
    for key in bulk.series:
        assert bulk.series[key].points() == rowwise.series[key].points(), key
    assert bulk.best_val == rowwise.best_val and list(bulk.rate) == list(rowwise.rate)
