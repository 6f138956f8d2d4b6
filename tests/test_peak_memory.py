"""Peak memory of a binary forward+backward stays a small multiple of the logits.

Binary alert problems are the ones with tens of millions of rows and ~1% positives, so every
per-positive temporary (own score, class id, weight, sigmoid terms and their gradients) must be
positive-sized, not row-sized. The peak is counted from the allocator events the profiler
records (``profile_memory=True``): bytes, not wall-clock, so it does not depend on machine load.
``scripts/bench.py`` measures the same thing as process RSS at 20M rows.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from imbalanced_losses import RecallAtQuantileLoss

ROWS = 1_000_000
MAX_EXTRA_OVER_LOGITS = 4.0


def _peak_extra_bytes(step) -> int:
    """Highest net bytes allocated (allocations minus frees) at any point while ``step`` ran."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    assert events, "the profiler recorded no allocation: it cannot measure memory here"
    current = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        current += event.nbytes()
        peak = max(peak, current)
    return peak


@pytest.mark.parametrize("queue_size", [0, 4096])
def test_binary_forward_backward_peak_memory_is_within_4x_the_logits(queue_size):
    gen = torch.Generator().manual_seed(0)
    loss_fn = RecallAtQuantileLoss(1, quantile=0.02, queue_size=queue_size)
    logits = torch.randn(ROWS, 1, generator=gen, requires_grad=True)
    targets = (torch.rand(ROWS, generator=gen) < 0.01).long()

    def step() -> None:
        logits.grad = None
        loss_fn(logits, targets).backward()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # this test is about bytes, not advice
        step()  # fills the queue when there is one: the steady state is measured
        peak = _peak_extra_bytes(step)
    ratio = peak / (logits.numel() * logits.element_size())
    assert ratio <= MAX_EXTRA_OVER_LOGITS, (
        f"forward+backward allocated up to {ratio:.2f}x the logits (limit "
        f"{MAX_EXTRA_OVER_LOGITS}x): a row-sized temporary where a positive-sized one will do?"
    )
