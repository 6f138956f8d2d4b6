"""Warnings fire once per condition, point at the caller's line, and reset_queue() re-arms them."""

from __future__ import annotations

import warnings

import pytest
import torch

from imbalanced_losses import RecallAtQuantileLoss


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
