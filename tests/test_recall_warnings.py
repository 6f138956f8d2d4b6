"""RecallAtQuantileLoss warns about misuse once per condition, re-armed by reset_queue():
a pool too small for the quantile (judged once the queue is full or disabled) and a class whose
positives make up at least `quantile` of the pool (judged once the pool is large enough)."""

from __future__ import annotations

import warnings

import pytest
import torch

from imbalanced_losses import RecallAtQuantileLoss


def run_steps(loss_fn, steps, batch, positive_rate=None, seed=0):
    """Train-mode calls on random batches; returns the messages of the warnings per step."""
    gen = torch.Generator().manual_seed(seed)
    c = loss_fn.num_classes
    caught = []
    for _ in range(steps):
        logits = torch.randn(batch, c, generator=gen, requires_grad=True)
        if c == 1:
            targets = (torch.rand(batch, generator=gen) < positive_rate).long()
        else:
            targets = torch.randint(0, c, (batch,), generator=gen)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            loss_fn(logits, targets).backward()
        caught.append([str(w.message) for w in seen])
    return caught


def steps_with(caught, text):
    return [i for i, messages in enumerate(caught) if any(text in m for m in messages)]


SMALL = "too few for quantile"
FRACTION = "at or above quantile"


def test_small_pool_warns_once_the_queue_is_full_not_while_it_fills():
    # batch 10 + queue 30 = 40 rows, 40 * 0.01 < 1. The queue is full from the 4th call on.
    loss_fn = RecallAtQuantileLoss(3, quantile=0.01, queue_size=30)
    caught = run_steps(loss_fn, 12, batch=10)
    assert steps_with(caught, SMALL) == [3]
    assert "quantile=0.01" in next(m for m in caught[3] if SMALL in m)


def test_small_pool_warns_at_once_without_a_queue_and_is_rearmed_by_reset_queue():
    loss_fn = RecallAtQuantileLoss(3, quantile=0.01, queue_size=0)
    assert steps_with(run_steps(loss_fn, 5, batch=10), SMALL) == [0]
    loss_fn.reset_queue()
    assert steps_with(run_steps(loss_fn, 5, batch=10, seed=1), SMALL) == [0]


def test_small_pool_after_reset_warns_again_when_the_queue_is_full_again():
    loss_fn = RecallAtQuantileLoss(3, quantile=0.01, queue_size=30)
    assert steps_with(run_steps(loss_fn, 6, batch=10), SMALL) == [3]
    loss_fn.reset_queue()
    assert steps_with(run_steps(loss_fn, 6, batch=10, seed=1), SMALL) == [3]


def test_no_small_pool_warning_when_the_full_pool_is_large_enough():
    # 10 + 100 rows at quantile 0.01: 1.1 rows above the threshold.
    loss_fn = RecallAtQuantileLoss(3, quantile=0.01, queue_size=100)
    assert steps_with(run_steps(loss_fn, 15, batch=10), SMALL) == []


def test_positive_fraction_at_or_above_quantile_warns_once_naming_fraction_and_quantile():
    # Binary, ~10% positives, quantile 0.05 on 1000-row pools (50 rows above the threshold).
    loss_fn = RecallAtQuantileLoss(1, quantile=0.05, queue_size=0)
    caught = run_steps(loss_fn, 6, batch=1000, positive_rate=0.1)
    assert steps_with(caught, FRACTION) == [0]
    message = next(m for m in caught[0] if FRACTION in m)
    assert "positives make up" in message and "quantile=0.05" in message
    assert "perfect model" in message
    loss_fn.reset_queue()
    caught = run_steps(loss_fn, 3, batch=1000, positive_rate=0.1, seed=1)
    assert steps_with(caught, FRACTION) == [0]


def test_positive_fraction_names_the_class():
    # Class 2 holds ~50% of the rows, classes 0 and 1 ~25%; quantile 0.3: only class 2.
    loss_fn = RecallAtQuantileLoss(3, quantile=0.3, queue_size=0)
    gen = torch.Generator().manual_seed(0)
    targets = torch.tensor([0, 1, 2, 2]).repeat(100)[torch.randperm(400, generator=gen)]
    logits = torch.randn(400, 3, generator=gen)
    with pytest.warns(UserWarning, match=FRACTION) as record:
        loss_fn(logits, targets)
    expected_fraction = f"{(targets == 2).double().mean().item():.2%}"
    message = next(str(w.message) for w in record if FRACTION in str(w.message))
    assert "class 2's positives" in message and expected_fraction in message


def test_positive_fraction_counts_the_queue():
    # Live batches have no positive; the queue was filled with 20% positives.
    loss_fn = RecallAtQuantileLoss(1, quantile=0.05, queue_size=2000)
    gen = torch.Generator().manual_seed(0)
    queue_targets = (torch.rand(2000, generator=gen) < 0.2).long()
    loss_fn.queue.push(torch.randn(2000, 1, generator=gen), queue_targets)
    caught = run_steps(loss_fn, 1, batch=100, positive_rate=0.0)
    assert steps_with(caught, FRACTION) == [0]


@pytest.mark.parametrize(
    ("rate", "quantile", "batch"),
    [
        (0.01, 0.05, 1000),  # positives well below the quantile
        (0.1, 0.05, 200),
    ],  # above it, but 200 * 0.05 = 10 rows: too few to tell
)
def test_no_positive_fraction_warning_when_fine_or_pool_too_small_to_tell(rate, quantile, batch):
    loss_fn = RecallAtQuantileLoss(1, quantile=quantile, queue_size=0)
    caught = run_steps(loss_fn, 5, batch=batch, positive_rate=rate)
    assert steps_with(caught, FRACTION) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_positive_fraction_warning_reaches_the_host_on_cuda():
    # The flag travels to the host without a wait; it must still arrive within a few steps.
    loss_fn = RecallAtQuantileLoss(1, quantile=0.05, queue_size=0).cuda()
    gen = torch.Generator().manual_seed(0)
    seen = []
    for _ in range(4):
        logits = torch.randn(1000, 1, generator=gen).cuda().requires_grad_(True)
        targets = (torch.rand(1000, generator=gen) < 0.1).long().cuda()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss_fn(logits, targets).backward()
        torch.cuda.synchronize()
        seen.append(any(FRACTION in str(w.message) for w in caught))
    assert sum(seen) == 1
