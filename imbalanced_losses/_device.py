"""Moving data between the host and the device without making either wait.

The library's budget is one host sync per forward (the read of the metadata row). These are
the only helpers that cross between host and device: a host-to-device copy that does not
block, a selection by a count the host already knows, the one explicit device-to-host
copy (so profilers and ``SyncCounter`` can count it), and a device-to-host copy read a step
later that never waits (for checks whose answer can arrive late, such as warnings).
"""

from __future__ import annotations

import torch
from torch import Tensor


def to_device(host: Tensor, device: torch.device) -> Tensor:
    """Host-to-device copy that does not block the host (pinned, non-blocking) on CUDA."""
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def host_copy(tensor: Tensor) -> Tensor:
    """One explicit device-to-host copy (a copy even on CPU, so profilers can count it)."""
    return tensor.to("cpu", copy=True)


def true_indices(mask: Tensor, count: int) -> Tensor:
    """Indices of the ``count`` True entries of ``mask`` (a count the host already knows).

    ``nonzero_static`` needs no device sync; CUDA has it from torch 2.6, older
    builds fall back to ``nonzero`` (one sync).
    """
    try:
        return mask.nonzero_static(size=count).squeeze(1)
    except NotImplementedError:
        return mask.nonzero().squeeze(1)


class HostCopy:
    """A small device tensor on its way to the host: pinned memory and an event on CUDA."""

    def __init__(self, values: Tensor) -> None:
        self._event: torch.cuda.Event | None = None
        if values.device.type == "cuda":
            self._host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self._host.copy_(values, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = values

    def get(self) -> list[float] | None:
        """The values, or ``None`` while the copy has not finished (never waits)."""
        if self._event is not None and not self._event.query():
            return None
        return self._host.tolist()
