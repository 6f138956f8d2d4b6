"""What every rank must agree on before rows are gathered, and the error when they do not.

The metadata row of each forward (``_validation``) carries, after its counts and flags, one
column per *agreed value*: the loss's options, this call's options and the loss's state (the
queue's fill count and write position, the subsampling step, the temperature, the dtypes).
Ranks that disagree would either gather rows of different sizes (a crash inside the transport)
or train on different pools (silent divergence). So every rank compares the exchanged columns
and raises the same ``ValueError``, naming each value that differs with every rank's value and
the likely cause. The values ride in the row that is exchanged anyway: no extra collective, and
no host sync (host numbers reach a CUDA device by an asynchronous copy from pinned memory;
values that already live on the device are converted there, never read on the host).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

MUST_MATCH = "every rank must match"
CHECKPOINT_FIX = (
    "the loss state differs between ranks: load the checkpoint on every rank "
    "(load_state_dict on one rank only leaves the others behind)"
)
QUEUE_FIX = CHECKPOINT_FIX + ", and call reset_queue() on every rank or on none"
TEMPERATURE_FIX = (
    "set loss_fn.temperature to the same value on every rank (run the annealing schedule on "
    "every rank), or load the checkpoint on every rank"
)
LOGITS_DTYPE_FIX = (
    "pass logits of one dtype on every rank (the same model precision, autocast and "
    ".to(dtype) on every rank)"
)
LOSS_DTYPE_FIX = "convert the loss the same way on every rank (loss_fn.to(dtype), .double())"

# Floating dtypes by a stable code; others get a code from their name's checksum.
_DTYPES = ("float16", "bfloat16", "float32", "float64")


def number(value: float) -> str:
    """An integral value without its ``.0``, anything else as Python prints it."""
    return str(int(value)) if math.isfinite(value) and value == int(value) else repr(value)


def dtype_code(dtype: torch.dtype | None) -> float:
    """``dtype`` as a number that travels in a float64 column (-1: no dtype, bad input)."""
    if dtype is None:
        return -1.0
    name = str(dtype).removeprefix("torch.")
    if name in _DTYPES:
        return float(_DTYPES.index(name))
    return float(1000 + zlib.crc32(name.encode()) % 1_000_000)


def dtype_name(code: float) -> str:
    """The inverse of :func:`dtype_code`, for messages."""
    if 0 <= code < len(_DTYPES) and code == int(code):
        return f"torch.{_DTYPES[int(code)]}"
    return "no tensor" if code == -1 else f"dtype code {number(code)}"


@dataclass(frozen=True)
class Agreed:
    """One value every rank must hold: how the error names and shows it, and how to fix it.

    ``value`` is a host number, or a 0-d tensor when the loss keeps it on the device (it is
    then converted on the device, never read on the host).
    """

    name: str
    value: float | Tensor
    fix: str = MUST_MATCH
    show: Callable[[float], str] = number


def columns(agreed: Sequence[Agreed], device: torch.device) -> Tensor:
    """The agreed values as float64 columns on ``device``, without a host sync."""
    host = [0.0 if isinstance(a.value, Tensor) else float(a.value) for a in agreed]
    row = to_device(torch.tensor(host, dtype=torch.float64), device)
    for i, a in enumerate(agreed):
        if isinstance(a.value, Tensor):
            row[i] = a.value.detach().reshape(())  # copied and converted on the device
    return row


def raise_on_disagreement(metas: list[list[float]], first: int, agreed: Sequence[Agreed]) -> None:
    """Raise the same ``ValueError`` on every rank when any agreed column differs.

    ``metas`` is every rank's exchanged row; the agreed columns start at ``first``. The
    message lists every value that differs (per rank) and then each distinct fix once.
    """
    differing, fixes = [], []
    for i, a in enumerate(agreed):
        seen = [m[first + i] for m in metas]
        if all(v == seen[0] for v in seen):
            continue
        by_rank = ", ".join(f"rank {r}: {a.show(v)}" for r, v in enumerate(seen))
        differing.append(f"{a.name} ({by_rank})")
        if a.fix not in fixes:
            fixes.append(a.fix)
    if differing:
        raise ValueError(f"ranks disagree on {', '.join(differing)}; {'; '.join(fixes)}")


def to_device(host: Tensor, device: torch.device) -> Tensor:
    """Host-to-device copy that does not block the host (pinned, non-blocking) on CUDA."""
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)
