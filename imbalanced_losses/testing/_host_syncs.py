"""Count the ops of a forward/backward that would make the host wait for a CUDA device.

A host sync stalls the Python thread until the GPU catches up, so a loss should cost at most a
couple per step. ``SyncCounter`` counts them on any build, CPU included: it sees every aten op
through a ``TorchDispatchMode`` and counts one when the op blocks the host on CUDA *and* reads
data that would live on the device (a tensor given to it, or one derived from those or created
on their device). Op names alone cannot tell that: host-only scalars read with ``.item()`` cost
nothing on CUDA.

Some host reads never reach the dispatcher on a CPU build (``.tolist()``, ``.numpy()``, and
``.cpu()`` / ``.to("cpu")``, which are no-ops there): a ``TorchFunctionMode`` entered alongside
sees those Python-level calls. It also flags, apart (``host_to_device``), tensors built from
host data straight onto a device (``torch.tensor(data, device=d)``, ``torch.as_tensor``,
``torch.asarray``): on CUDA a pageable copy that waits for the stream, where a pinned,
non-blocking copy would not.
"""

from __future__ import annotations

import traceback
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["BOOL_INDEX", "DEVICE_TO_HOST", "HOST_TO_DEVICE", "SYNC_OPS", "SyncCounter"]

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
HOST_TO_DEVICE = "tensor built from host data on a device (blocking pageable copy on CUDA)"

_HOST_READS = {torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__array__}
_MOVES = {torch.Tensor.cpu, torch.Tensor.to}
_FROM_HOST_DATA = {torch.tensor, torch.as_tensor, torch.asarray}
_HERE = str(Path(__file__).resolve())
_TORCH = str(Path(torch.__file__).resolve().parent)


def _caller() -> str:
    """``file:line`` of the innermost frame outside torch and this module (for reports)."""
    for frame in reversed(traceback.extract_stack()):
        name = str(Path(frame.filename).resolve())
        if name != _HERE and not name.startswith(_TORCH):
            return f"{frame.filename}:{frame.lineno}"
    return "?"


def _target_device(args: tuple, kwargs: dict) -> Any:
    """The device argument of ``Tensor.to`` (a device, a string, a tensor) or ``None``."""
    if "device" in kwargs:
        return kwargs["device"]
    for a in args[1:]:
        if isinstance(a, (torch.device, str, torch.Tensor)):
            return a
    return None


class _PythonLevelReads(TorchFunctionMode):
    """The reads and copies the dispatcher does not see on a CPU build (see the module)."""

    def __init__(self, counter: SyncCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        counter = self.counter
        this = args[0] if args else None
        tracked = isinstance(this, torch.Tensor) and this in counter.on_device
        if func in _FROM_HOST_DATA and kwargs.get("device") is not None:
            data = args[0] if args else kwargs.get("data", kwargs.get("obj"))
            if not (isinstance(data, torch.Tensor) and data in counter.on_device):
                counter._count(counter.host_to_device, HOST_TO_DEVICE)
        if tracked and func in _HOST_READS:
            # One read, however it is done inside (on CUDA ``tolist`` copies through the
            # dispatcher, which would count it again).
            counter._count(counter.counts, DEVICE_TO_HOST)
            counter._inside_read += 1
            try:
                return func(*args, **kwargs)
            finally:
                counter._inside_read -= 1
        out = func(*args, **kwargs)
        if tracked and func in _MOVES and out is this:
            # A no-op on this build, a device-to-host copy on CUDA when the target is the host:
            # then hand back a fresh untracked copy, as CUDA would.
            target = "cpu" if func is torch.Tensor.cpu else _target_device(args, kwargs)
            # Only an explicit host target counts: on a CPU build a ``torch.device("cpu")`` is
            # as likely the inputs' own device (``x.to(logits.device)``) as the host.
            to_host = (
                target not in counter.on_device
                if isinstance(target, torch.Tensor)
                else isinstance(target, str) and torch.device(target).type == "cpu"
            )
            if to_host:
                counter._count(counter.counts, DEVICE_TO_HOST)
                with _disable_current_modes():  # a host copy: not a tensor the counter tracks
                    out = this.clone()
        elif func in _FROM_HOST_DATA and kwargs.get("device") is not None:
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    counter.on_device[t] = True
        return out


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
        # Apart from ``counts``: host data copied onto a device without a pinned non-blocking copy.
        self.host_to_device: Counter[str] = Counter()
        # ``file:line`` of every counted call, per reason (to find the call sites).
        self.where: defaultdict[str, list[str]] = defaultdict(list)
        self._python_level = _PythonLevelReads(self)
        self._inside_read = 0  # > 0 while a counted Python-level read runs

    def _count(self, counter: Counter[str], reason: str) -> None:
        if self._inside_read:
            return
        counter[reason] += 1
        self.where[reason].append(_caller())

    def __enter__(self) -> SyncCounter:
        self._python_level.__enter__()
        try:
            super().__enter__()
        except BaseException:
            self._python_level.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            super().__exit__(*exc)
        finally:
            self._python_level.__exit__(*exc)

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
            self._count(self.counts, name)
        to_host = name == "aten._to_copy.default" and kwargs.get("device") == torch.device("cpu")
        if from_device and to_host:
            self._count(self.counts, DEVICE_TO_HOST)
        non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
        if name == "aten.copy_.default" and non_blocking and args[0].is_pinned():
            # The non-blocking copy into pinned host memory (its reader waits on an event): no
            # sync, and the buffer stays host memory, so reading it later costs nothing.
            return func(*args, **kwargs)
        if from_device and name.startswith("aten.index.Tensor"):
            indices = args[1] if len(args) > 1 else []
            if any(i is not None and i.dtype == torch.bool for i in indices):
                self._count(self.counts, BOOL_INDEX)
        out = func(*args, **kwargs)
        if to_host:  # the copy lives on the host: reading it (.tolist()) costs nothing more
            return out
        # A draw from a CPU generator is host work by design (a loss's private sampler).
        generator = kwargs.get("generator")
        from_host_generator = generator is not None and generator.device.type == "cpu"
        created_on_device = kwargs.get("device") is not None and not from_host_generator
        if from_device or created_on_device:
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self.on_device[t] = True
        return out
