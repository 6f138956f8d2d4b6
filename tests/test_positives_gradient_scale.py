"""How the gradient on live rows scales with the queue's fill level under positives="pool"
and positives="live" (C=1000, batch 64, quantile 0.05, queue 8192).

Under "pool" every queued positive counts in its class's recall and "mean" counts every class
with a pooled positive, so a full queue dilutes the live rows' share of the loss: their
gradient shrinks by about (queued positives per class) x (classes with a pooled positive /
classes with a live positive), here ~100x. Under "live" the queue only sets the threshold, so
the scale stays that of an empty queue. Temperature 0.5 keeps the sigmoid smooth, so the norm
is not decided by the one or two positives that sit within 0.01 of a threshold.
"""

from __future__ import annotations

import pytest
import torch

from imbalanced_losses import RecallAtQuantileLoss

C, BATCH, QUEUE, QUANTILE = 1000, 64, 8192, 0.05


def live_gradient_norm(positives, queued, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(BATCH, C, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, C, (BATCH,), generator=gen)
    loss_fn = RecallAtQuantileLoss(
        C, quantile=QUANTILE, queue_size=QUEUE, temperature=0.5, positives=positives
    ).double()
    if queued:
        loss_fn.queue.push(
            torch.randn(queued, C, generator=gen, dtype=torch.float64),
            torch.randint(0, C, (queued,), generator=gen),
        )
    loss_fn(logits, targets).backward()
    return logits.grad.norm().item()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pool_positives_shrink_the_live_gradient_as_the_queue_fills(seed):
    empty = live_gradient_norm("pool", 0, seed)
    full = live_gradient_norm("pool", QUEUE, seed)
    assert empty > 0 and full < empty / 20, (empty, full)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_live_positives_keep_the_gradient_scale_of_an_empty_queue(seed):
    empty = live_gradient_norm("live", 0, seed)
    full = live_gradient_norm("live", QUEUE, seed)
    assert empty > 0 and 0.5 < full / empty < 2.0, (empty, full)


def test_both_options_agree_while_the_queue_is_empty():
    # With nothing queued the pooled positives are the live ones.
    assert live_gradient_norm("pool", 0, 0) == live_gradient_norm("live", 0, 0)
