"""The learning-rate schedule: linear warmup, cosine decay to the floor, flat after."""

from __future__ import annotations

import math

import pytest

from simone.train.optim import lr_at


def test_warmup_is_linear_and_reaches_the_peak():
    lrs = [lr_at(s, 1.0, 10, 100, 0.1) for s in range(10)]
    assert lrs[0] == pytest.approx(1 / 11)
    assert all(b > a for a, b in zip(lrs, lrs[1:]))
    assert lrs[9] == pytest.approx(10 / 11)
    assert lr_at(10, 1.0, 10, 100, 0.1) == pytest.approx(1.0)


def test_cosine_decays_to_the_floor_and_stays_there():
    total = 100
    lrs = [lr_at(s, 2.0, 10, total, 0.1) for s in range(10, total)]
    assert all(b <= a for a, b in zip(lrs, lrs[1:]))
    mid = lr_at(55, 2.0, 10, total, 0.1)  # half-way through the decay
    assert mid == pytest.approx(0.2 + 0.5 * (2.0 - 0.2))
    assert lr_at(total, 2.0, 10, total, 0.1) == pytest.approx(0.2)
    assert lr_at(total + 50, 2.0, 10, total, 0.1) == pytest.approx(0.2)


def test_no_warmup_starts_at_the_peak():
    assert lr_at(0, 3e-4, 0, 1000, 0.1) == pytest.approx(3e-4)
    assert math.isclose(lr_at(999, 3e-4, 0, 1000, 0.1), 3e-5, rel_tol=1e-3)
