"""At most 2 host syncs per steady-state forward on CUDA, none in backward, none per class.

Counted on CPU: every aten op of a forward+backward is seen through a TorchDispatchMode, and an
op counts when it would block the host on CUDA *and* it reads data that would live on the GPU
(a tensor derived from the inputs, the loss's buffers or a tensor created on their device).
The profiler's op names alone cannot tell that on a CPU build: the threshold code reads
host-only scalars with ``.item()`` (e.g. the quantile's fractional rank, computed on a CPU
scalar tensor whatever the device), which cost nothing on CUDA.

The loss's only intended sync is the host read of the metadata row (validation, row counts and
the agreed configuration travel in it): an explicit device-to-host copy.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from imbalanced_losses import RecallAtQuantileLoss
from imbalanced_losses.testing import run_ranks

# Ops that block the host on CUDA, and why.
SYNC_OPS = {
    "aten.nonzero.default": "output size depends on the values: the host waits for the kernel",
    "aten._local_scalar_dense.default": "Tensor.item() / int() / float(): reads one value",
    "aten.is_nonzero.default": "bool(tensor) in Python control flow",
    "aten.equal.default": "returns a Python bool computed on the device",
    "aten.masked_select.default": "output size depends on the mask",
    "aten._unique2.default": "output size depends on the values",
    "aten.unique_consecutive.default": "output size depends on the values",
    "aten.repeat_interleave.Tensor": "output size depends on the repeats (without output_size)",
}
DEVICE_TO_HOST = "device-to-host copy (Tensor.to('cpu') / .cpu() / .tolist())"
BOOL_INDEX = "indexing with a bool mask (an implicit nonzero)"


class SyncCounter(TorchDispatchMode):
    """Counts, per reason, the ops that would synchronise with a CUDA device."""

    def __init__(self, *device_tensors: torch.Tensor) -> None:
        super().__init__()
        self.on_device = WeakIdKeyDictionary()
        for t in device_tensors:
            self.on_device[t] = True
        self.counts: Counter[str] = Counter()

    def _touches_device(self, args: Any) -> bool:
        return any(
            isinstance(a, torch.Tensor) and a in self.on_device for a in tree_flatten(args)[0]
        )

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        from_device = self._touches_device((args, kwargs))
        if from_device and name in SYNC_OPS:
            self.counts[name] += 1
        if (
            from_device
            and name == "aten._to_copy.default"
            and kwargs.get("device") == torch.device("cpu")
        ):
            self.counts[DEVICE_TO_HOST] += 1
        if from_device and name.startswith("aten.index.Tensor"):
            indices = args[1] if len(args) > 1 else []
            if any(i is not None and i.dtype == torch.bool for i in indices):
                self.counts[BOOL_INDEX] += 1
        out = func(*args, **kwargs)
        created_on_device = kwargs.get("device") is not None and name != "aten.randperm.generator"
        if from_device or created_on_device:
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self.on_device[t] = True
        return out


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
    with SyncCounter(logits, targets, weights, *buffers) as forward:
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
        loss_fn, torch.Generator().manual_seed(0), num_classes, 16
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
