"""Early stopping: at least min_epochs, at most num_epochs, patience counted after min_epochs."""

from __future__ import annotations

import math

from simone.train.early_stopping import EarlyStopping


def test_improvements_reset_patience_and_track_best():
    es = EarlyStopping(min_epochs=1, num_epochs=5, patience=2)
    assert es.update(3.0, step=10, epochs_done=1) is True
    assert es.update(3.5, step=20, epochs_done=1) is False
    assert es.bad_evals == 1 and es.should_stop(1) is None
    assert es.update(2.5, step=30, epochs_done=2) is True
    assert es.bad_evals == 0 and es.best_loss == 2.5 and es.best_step == 30
    assert es.should_stop(2) is None


def test_stops_after_patience_non_improving_evaluations():
    es = EarlyStopping(min_epochs=1, num_epochs=10, patience=2)
    es.update(2.0, 10, 1)
    es.update(2.0, 20, 1)  # equal is not an improvement
    assert es.should_stop(1) is None
    es.update(2.1, 30, 2)
    assert es.should_stop(2) == "early_stop"


def test_evaluations_before_min_epochs_never_count_against_patience():
    es = EarlyStopping(min_epochs=3, num_epochs=10, patience=2)
    es.update(2.0, 10, 0)
    for step, epochs in ((20, 1), (30, 1), (40, 2), (50, 2)):
        assert es.update(5.0, step, epochs) is False
        assert es.should_stop(epochs) is None
    assert es.bad_evals == 0
    es.update(5.0, 60, 3)
    assert es.should_stop(3) is None  # one bad evaluation after min_epochs
    es.update(5.0, 70, 3)
    assert es.should_stop(3) == "early_stop"
    assert es.best_loss == 2.0 and es.best_step == 10


def test_num_epochs_is_a_hard_cap_and_patience_zero_disables():
    es = EarlyStopping(min_epochs=1, num_epochs=3, patience=0)
    for i in range(10):
        es.update(1.0 + i, i, 2)
    assert es.should_stop(2) is None
    assert es.should_stop(3) == "num_epochs"


def test_non_finite_loss_is_never_an_improvement():
    es = EarlyStopping(min_epochs=0, num_epochs=3, patience=1)
    assert es.update(math.nan, 1, 0) is False
    assert es.best_loss == math.inf
    assert es.should_stop(0) == "early_stop"


def test_state_round_trip():
    es = EarlyStopping(min_epochs=1, num_epochs=5, patience=3)
    es.update(2.0, 10, 1)
    es.update(2.5, 20, 1)
    other = EarlyStopping(min_epochs=1, num_epochs=5, patience=3)
    other.load_state_dict(es.state_dict())
    assert (other.best_loss, other.best_step, other.bad_evals, other.stopped) == (2.0, 10, 1, False)
    other.update(3.0, 30, 1)
    other.update(3.0, 40, 1)
    assert other.should_stop(1) == "early_stop"
