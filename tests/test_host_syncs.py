"""At most 2 host syncs per steady-state forward on CUDA, none in backward, none per class.

Counted on CPU: every aten op of a forward+backward is seen through a TorchDispatchMode, and an
op counts when it would block the host on CUDA *and* it reads data that would live on the GPU
(a tensor derived from the inputs, the loss's buffers or a tensor created on their device).
The profiler's op names alone cannot tell that on a CPU build: the threshold code reads
host-only scalars with ``.item()`` (e.g. the quantile's fractional rank, computed on a CPU
scalar tensor whatever the device), which cost nothing on CUDA.

The recall loss's only intended sync is the host read of the metadata row (validation, row
counts and the agreed configuration travel in it): an explicit device-to-host copy. SmoothAP on a
binary problem makes one more: the count of queued (and sampled) positives, which selecting them
needs and which no host-side state can know (the queue overwrites rows the host never saw).
"""

from __future__ import annotations

from collections import Counter
from unittest import mock

import pytest
import torch

from imbalanced_losses import RecallAtQuantileLoss, SmoothAPLoss, _device
from imbalanced_losses._exchange import Agreed, columns
from imbalanced_losses.testing import SyncCounter, run_ranks
from imbalanced_losses.testing._host_syncs import DEVICE_TO_HOST


def _sample_on_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The ``max_pool_size`` sample as a tensor the counter sees on the device, as on CUDA.

    On a CPU build the library's host-to-device copy is a no-op, so the sample would look
    host-only and a sync that reads it would go uncounted.
    """
    return torch.empty_like(host, device=device).copy_(host)


def _count_steady_state_step(loss_fn, gen, num_classes: int, rows: int) -> tuple[Counter, Counter]:
    """Forward and backward sync counts of one step after the queue has filled."""
    for _ in range(3):  # warm up: fill the queue, cache the configuration
        logits = torch.randn(rows, num_classes, generator=gen, requires_grad=True)
        loss_fn(logits, torch.randint(0, max(num_classes, 2), (rows,), generator=gen)).backward()
    logits = torch.randn(rows, num_classes, generator=gen, requires_grad=True)
    targets = torch.randint(0, max(num_classes, 2), (rows,), generator=gen)
    targets[0] = -100  # a padding row: filtering must not sync either
    weights = torch.rand(rows, generator=gen)
    buffers = list(loss_fn.buffers())
    with (
        mock.patch.object(_device, "to_device", _sample_on_device),
        SyncCounter(logits, targets, weights, *buffers) as forward,
    ):
        loss = loss_fn(logits, targets, sample_weight=weights)
    with SyncCounter(loss, *buffers) as backward:
        loss.backward()
    return forward.counts, backward.counts


@pytest.mark.filterwarnings("ignore:.*pool.*:UserWarning")
@pytest.mark.parametrize("max_pool_size", [None, 24])
@pytest.mark.parametrize("quantile", [0.01, 0.3])  # both threshold selection paths
@pytest.mark.parametrize("num_classes", [1, 6])
def test_one_host_sync_per_forward_and_none_in_backward(num_classes, quantile, max_pool_size):
    loss_fn = RecallAtQuantileLoss(
        num_classes, quantile=quantile, queue_size=40, max_pool_size=max_pool_size
    )
    forward, backward = _count_steady_state_step(
        loss_fn, torch.Generator().manual_seed(0), num_classes, 32
    )
    assert forward == Counter({DEVICE_TO_HOST: 1}), forward  # the metadata read, nothing else
    assert sum(forward.values()) <= 2
    assert backward == Counter(), backward


def _count_on_rank(rank: int) -> tuple[dict, dict]:
    loss_fn = RecallAtQuantileLoss(4, quantile=0.3, queue_size=40)
    forward, backward = _count_steady_state_step(
        loss_fn, torch.Generator().manual_seed(rank), 4, 8 + 3 * rank
    )
    return dict(forward), dict(backward)


def test_one_host_sync_per_forward_under_two_gloo_ranks():
    for rank, (forward, backward) in enumerate(run_ranks(_count_on_rank, 2, timeout_s=120)):
        assert forward == {DEVICE_TO_HOST: 1}, f"rank {rank}: {forward}"
        assert backward == {}, f"rank {rank}: {backward}"


@pytest.mark.parametrize("max_pool_size", [None, 24])
@pytest.mark.parametrize("num_classes", [1, 6])
def test_smooth_ap_syncs_at_most_twice_per_forward_and_never_in_backward(
    num_classes, max_pool_size
):
    """Positives are selected with counts the host knows: the metadata's, and for binary
    problems one read of the queued (and sampled) positive counts; none of these is a sync."""
    loss_fn = SmoothAPLoss(num_classes, queue_size=40, max_pool_size=max_pool_size)
    forward, backward = _count_steady_state_step(
        loss_fn, torch.Generator().manual_seed(0), num_classes, 32
    )
    # Multi-class: every pooled row is a positive of its class, the metadata read is all.
    expected = 1 if num_classes > 1 else 2
    assert forward == Counter({DEVICE_TO_HOST: expected}), forward
    assert backward == Counter(), backward


def _count_smooth_ap_on_rank(rank: int, num_classes: int) -> tuple[dict, dict]:
    loss_fn = SmoothAPLoss(num_classes, queue_size=40, max_pool_size=30)
    forward, backward = _count_steady_state_step(
        loss_fn, torch.Generator().manual_seed(rank), num_classes, 8 + 3 * rank
    )
    return dict(forward), dict(backward)


@pytest.mark.parametrize("num_classes", [1, 4])
def test_smooth_ap_syncs_at_most_twice_per_forward_under_two_gloo_ranks(num_classes):
    results = run_ranks(_count_smooth_ap_on_rank, 2, args=(num_classes,), timeout_s=120)
    expected = 1 if num_classes > 1 else 2
    for rank, (forward, backward) in enumerate(results):
        assert forward == {DEVICE_TO_HOST: expected}, f"rank {rank}: {forward}"
        assert backward == {}, f"rank {rank}: {backward}"


def test_agreed_state_held_in_device_tensors_is_not_read_on_the_host():
    """The state agreed across ranks may live on the device (counters as tensors): it joins the
    metadata row there, and host numbers join it without a blocking copy."""
    count, ptr = torch.tensor(7), torch.tensor(3)
    agreed = [
        Agreed("queue fill count", count),
        Agreed("queue write position", ptr),
        Agreed("temperature", 0.5),
    ]
    with SyncCounter(count, ptr) as counter:
        row = columns(agreed, torch.device("cpu"))
    assert counter.counts == Counter(), counter.counts
    assert row.dtype == torch.float64 and row.tolist() == [7.0, 3.0, 0.5]
