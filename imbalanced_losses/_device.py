"""Moving data between the host and the device without making either wait.

The library's budget is one host sync per forward (the read of the metadata row). These are
the only helpers that cross between host and device: a host-to-device copy that does not
block, a selection by a count the host already knows, and the one explicit device-to-host
copy (so profilers and ``SyncCounter`` can count it).
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
