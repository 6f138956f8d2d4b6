"""Count the ops of a forward/backward that would make the host wait for a CUDA device.

A host sync stalls the Python thread until the GPU catches up, so a loss should cost at most a
couple per step. ``SyncCounter`` counts them on any build, CPU included: it sees every aten op
through a ``TorchDispatchMode`` and counts one when the op blocks the host on CUDA *and* reads
data that would live on the device (a tensor given to it, or one derived from those or created
on their device). Op names alone cannot tell that: host-only scalars read with ``.item()`` cost
nothing on CUDA.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["BOOL_INDEX", "DEVICE_TO_HOST", "SYNC_OPS", "SyncCounter"]

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
    "aten.bincount.default": "output size depends on the largest value, read on the host",
}
DEVICE_TO_HOST = "device-to-host copy (Tensor.to('cpu') / .cpu() / .tolist())"
BOOL_INDEX = "indexing with a bool mask (an implicit nonzero)"


class SyncCounter(TorchDispatchMode):
    """Counts, per reason, the ops that would synchronise with a CUDA device.

    Pass the tensors that would live on the device (inputs, the loss's buffers; for a backward,
    the loss)::

        with SyncCounter(logits, targets, *loss_fn.buffers()) as forward:
            loss = loss_fn(logits, targets)
        print(sum(forward.counts.values()), dict(forward.counts))
    """

    def __init__(self, *device_tensors: torch.Tensor) -> None:
        super().__init__()
        self.on_device = WeakIdKeyDictionary()
        for t in device_tensors:
            self.on_device[t] = True
        self.counts: Counter[str] = Counter()

    @property
    def total(self) -> int:
        """All syncs counted so far, whatever the reason."""
        return sum(self.counts.values())

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
        # A draw from a CPU generator is host work by design (a loss's private sampler).
        generator = kwargs.get("generator")
        from_host_generator = generator is not None and generator.device.type == "cpu"
        created_on_device = kwargs.get("device") is not None and not from_host_generator
        if from_device or created_on_device:
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self.on_device[t] = True
        return out
