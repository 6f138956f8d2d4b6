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
from torch.utils._python_dispatch import _disable_current_modes

from imbalanced_losses import RecallAtQuantileLoss, SmoothAPLoss, _device
from imbalanced_losses._exchange import Agreed, columns
from imbalanced_losses.testing import SyncCounter, run_ranks
from imbalanced_losses.testing._host_syncs import DEVICE_TO_HOST, HOST_TO_DEVICE


def _sample_on_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The ``max_pool_size`` sample as a tensor the counter sees on the device, as on CUDA.

    On a CPU build the library's host-to-device copy is a no-op, so the sample would look
    host-only and a sync that reads it would go uncounted.
    """
    return torch.empty_like(host, device=device).copy_(host)


def _host_copy_as_on_cuda(self, values: torch.Tensor) -> None:
    """``_device.HostCopy`` as on CUDA: a pinned non-blocking copy read after its event.

    On a CPU build it keeps the device tensor itself, so the counter would see its read as a
    device read; the CUDA path never waits (``get`` returns None until the event fires).
    """
    self._event = None
    with _disable_current_modes():  # the event-guarded async copy, invisible to the host
        self._host = values.clone()


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
        mock.patch.object(_device.HostCopy, "__init__", _host_copy_as_on_cuda),
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


def _count_sharded_on_rank(rank: int, num_classes: int, quantile: float) -> tuple[dict, dict]:
    loss_fn = RecallAtQuantileLoss(num_classes, quantile=quantile, queue_size=40, sharded=True)
    forward, backward = _count_steady_state_step(
        loss_fn, torch.Generator().manual_seed(rank), num_classes, 8 + 3 * rank
    )
    return dict(forward), dict(backward)


@pytest.mark.parametrize("num_classes,quantile", [(1, 0.3), (4, 0.3), (4, 0.05)])
def test_the_sharded_recall_loss_keeps_one_host_sync_per_forward_under_two_gloo_ranks(
    num_classes, quantile
):
    """The distributed threshold reuses the metadata's global row count (no check collective,
    no second host read); its radix rounds and the statistics' all-reduce stay on the device."""
    results = run_ranks(_count_sharded_on_rank, 2, args=(num_classes, quantile), timeout_s=120)
    for rank, (forward, backward) in enumerate(results):
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


@pytest.mark.parametrize(
    "read",
    [
        lambda x: x.sum().tolist(),
        lambda x: (x * 2).tolist(),
        lambda x: x.tolist(),
        lambda x: x.sum().numpy(),
        lambda x: x.sum().cpu(),
        lambda x: x.sum().to("cpu"),
        lambda x: x.sum().cpu().tolist(),  # the copy is host memory: reading it is free
        lambda x: x.sum().item(),
        lambda x: int(x.sum()),
        lambda x: float(x.sum()),
        lambda x: bool(x.sum() > 0),
    ],
    ids=["sum-tolist", "tolist", "input-tolist", "numpy", "cpu", "to-cpu", "cpu-tolist", "item"]
    + ["int", "float", "bool"],
)
def test_every_host_read_of_a_device_tensor_counts_once(read):
    """A CPU build dispatches no op for ``.tolist()``/``.numpy()``/``.cpu()``: counted anyway."""
    x = torch.randn(5)
    with SyncCounter(x) as counter:
        read(x)
    assert counter.total == 1, dict(counter.counts)
    assert counter.host_to_device == Counter()


def test_host_reads_of_host_tensors_cost_nothing():
    x, host = torch.randn(5), torch.arange(4)
    with SyncCounter(x) as counter:
        host.tolist(), host.sum().item(), int(host[0]), host.cpu().tolist()
    assert counter.total == 0, dict(counter.counts)


def test_host_data_built_on_a_device_is_counted_apart_with_its_call_site():
    """``torch.as_tensor(False, device=dev)`` per forward is a blocking pageable copy on CUDA."""
    x = torch.randn(5)
    with SyncCounter(x) as counter:
        flag = torch.as_tensor(False, device=x.device)
        torch.tensor([1.0, 2.0], device=x.device)
        torch.asarray([3], device=x.device)
        torch.as_tensor(x, device=x.device)  # already on the device: no copy
        torch.tensor([1.0])  # stays on the host: no copy
        flag.tolist()  # the new tensor is a device tensor: reading it back is a sync
    assert counter.host_to_device == Counter({HOST_TO_DEVICE: 3}), counter.host_to_device
    assert counter.counts == Counter({DEVICE_TO_HOST: 1}), counter.counts
    assert all(site.startswith(__file__) for site in counter.where[HOST_TO_DEVICE])
