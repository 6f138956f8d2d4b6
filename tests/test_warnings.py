"""Warnings fire once per condition, point at the caller's line, and reset_queue() re-arms them."""

from __future__ import annotations

import warnings

import pytest
import torch

from imbalanced_losses import RecallAtQuantileLoss, SmoothAPLoss


def _step(loss_fn, n=4):
    return loss_fn(torch.randn(n, 2), torch.tensor([0, 1] * (n // 2)))


def _messages(record):
    return [str(w.message) for w in record]


def test_warn_once_per_condition_and_reset_queue_rearms_it():
    loss_fn = RecallAtQuantileLoss(2, quantile=0.01, queue_size=0)  # pool * q < 1
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(3):
            _step(loss_fn)
        assert sum("too few for quantile" in m for m in _messages(record)) == 1
        loss_fn.reset_queue()
        _step(loss_fn)
        assert sum("too few for quantile" in m for m in _messages(record)) == 2
    assert all(w.filename == __file__ for w in record), [w.filename for w in record]


def test_world_size_in_the_environment_without_a_process_group_warns_once(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    loss_fn = RecallAtQuantileLoss(2, quantile=0.3)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(3):
            _step(loss_fn)
    alone = [m for m in _messages(record) if "WORLD_SIZE=2" in m]
    assert len(alone) == 1, _messages(record)
    assert "not initialised" in alone[0] and "ACCELERATE_USE_CPU=1" in alone[0]


@pytest.mark.parametrize("world_size", [None, "1", "not-a-number"])
def test_no_world_size_warning_for_a_single_process(monkeypatch, world_size):
    if world_size is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world_size)
    loss_fn = RecallAtQuantileLoss(2, quantile=0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _step(loss_fn)


@pytest.mark.parametrize("cls", [RecallAtQuantileLoss, SmoothAPLoss])
def test_max_pool_size_subsampling_warns_once_per_instance_and_reset_queue_rearms_it(cls):
    """As the reference: one warning per instance when ``max_pool_size`` subsamples."""
    loss_fn = cls(2, queue_size=6, max_pool_size=8)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _step(loss_fn, n=6)  # a pool of 6 rows: no sample, no warning
        assert not any("max_pool_size" in m for m in _messages(record))
        for _ in range(3):  # pools of 12 rows: sampled every step, one warning
            _step(loss_fn, n=6)
        subsampled = [m for m in _messages(record) if "max_pool_size" in m]
        assert subsampled == [
            f"{cls.__name__}: pool size 12 exceeds max_pool_size=8; the loss now estimates "
            "over a uniform sample of 8 pooled rows, redrawn at each training step, so it is "
            "a stochastic approximation. (This warning is shown once per instance; "
            "reset_queue() re-arms it.)"
        ]
        cls(2, queue_size=6, max_pool_size=8)(torch.randn(10, 2), torch.tensor([0, 1] * 5))
        assert sum("max_pool_size" in m for m in _messages(record)) == 2  # another instance
        loss_fn.reset_queue()
        _step(loss_fn, n=10)
        assert sum("max_pool_size" in m for m in _messages(record)) == 3
    assert all(w.filename == __file__ for w in record), [w.filename for w in record]
