"""Input validation and the metadata row that every rank exchanges before gathering rows.

Validation must cost neither a host sync per check nor a hang across ranks. So
shape, dtype and device checks run on the host without touching values; value
checks (targets in range, weights finite and non-negative) are reduced on the
device into one *metadata row*, together with the row counts and the options
and state every rank must agree on (``_exchange``). Ranks exchange that row
with one small collective and read it on the host once; then every rank takes
the same decision: raise (naming the rank(s) at fault), or go on with the row
counts it needs to gather and filter rows without another sync. The loss and
the metric both use it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from . import _distributed
from ._exchange import Agreed, raise_on_disagreement
from .functional import out_of_range_targets


class Meta:
    """Columns of the metadata row; the agreed-on configuration follows ``CONFIG``."""

    STATIC_ERROR, ROWS, FINITE_ROWS, BAD_TARGETS, BAD_WEIGHTS, POSITIVE_ROWS = range(6)
    CONFIG = 6


def metadata_row(
    *,
    static_error: bool,
    rows: Tensor | int,
    finite_rows: Tensor | int,
    bad_targets: Tensor | bool,
    bad_weights: Tensor | bool,
    config: Tensor,
    positive_rows: Tensor | int = 0,
) -> Tensor:
    """This rank's metadata row (float64, on ``config``'s device), without a host sync.

    ``positive_rows`` (kept rows that are a positive of some class) lets the
    loss select its positives with a size the host knows, so without a sync.
    """
    values = [rows, finite_rows, bad_targets, bad_weights, positive_rows]
    device = config.device
    row = torch.stack(
        [torch.as_tensor(v, device=device).to(torch.float64).reshape(()) for v in values]
    )
    flag = torch.full((1,), float(static_error), dtype=torch.float64, device=device)
    return torch.cat([flag, row, config])


def exchange(row: Tensor, *, distributed: bool, group: Any = None) -> list[list[float]]:
    """Every rank's metadata row in rank order, read on the host once.

    The row travels on the device the group's backend needs (CUDA under NCCL),
    whatever device the inputs are on. This host read is the one sync that
    validation costs per forward.
    """
    if distributed:
        rows = torch.stack(_distributed.all_gather_rows_of_equal_shape(row, group))
    else:
        rows = row[None]
    return host_copy(rows).tolist()


def host_copy(tensor: Tensor) -> Tensor:
    """One explicit device-to-host copy (a copy even on CPU, so profilers can count it)."""
    return tensor.to("cpu", copy=True)


def raise_on_any_problem(
    metas: list[list[float]],
    rank: int,
    problems: Mapping[int, Callable[[], str]],
    config: Sequence[str | Agreed],
) -> None:
    """Raise the same decision on every rank: bad input anywhere, or ranks that disagree.

    ``problems`` maps a flag column of the metadata row to a function that
    describes the problem from this rank's inputs (called only where flagged).
    ``config`` names the agreed columns (``Agreed`` entries say how to show and fix them).
    """
    for column, describe in problems.items():
        flagged = [r for r, m in enumerate(metas) if m[column]]
        if not flagged:
            continue
        if rank in flagged:
            message = describe()
            raise ValueError(message if len(metas) == 1 else f"rank {rank}: {message}")
        raise ValueError(
            f"invalid input on rank(s) {flagged} (see their error); "
            "no rank changed its state this step"
        )
    agreed = [Agreed(c, 0.0) if isinstance(c, str) else c for c in config]
    raise_on_disagreement(metas, Meta.CONFIG, agreed)


def static_problem(
    logits: Any, targets: Any, sample_weight: Any, num_classes: int, state_device: torch.device
) -> str | None:
    """First shape/dtype/device problem of a loss's inputs, without touching their values."""
    c = num_classes
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        return f"logits must be a floating-point tensor [N, {c}], got {describe(logits)}"
    if logits.dim() != 2 or logits.shape[1] != c:
        return (
            f"logits must have shape [N, {c}] for num_classes={c}, got shape {tuple(logits.shape)}"
        )
    if not isinstance(targets, Tensor):
        return f"targets must be an integer or bool tensor [N], got {describe(targets)}"
    if targets.is_floating_point() or targets.is_complex():
        return f"targets must hold integer or bool class ids, got dtype {targets.dtype}"
    n = logits.shape[0]
    if not (tuple(targets.shape) == (n,) or tuple(targets.shape) == (n, 1)):
        return (
            f"targets must have shape [{n}] or [{n}, 1] to match logits, got {tuple(targets.shape)}"
        )
    if targets.device != logits.device:
        return f"targets are on {targets.device} but logits are on {logits.device}"
    if state_device != logits.device:
        return (
            f"logits are on {logits.device} but the loss's queue is on "
            f"{state_device}; move the loss with loss_fn.to({str(logits.device)!r})"
        )
    if sample_weight is not None:
        if not isinstance(sample_weight, Tensor) or not sample_weight.is_floating_point():
            return (
                f"sample_weight must be a floating-point tensor [{n}], "
                f"got {describe(sample_weight)}"
            )
        if tuple(sample_weight.shape) != (n,):
            return f"sample_weight must have shape [{n}], got {tuple(sample_weight.shape)}"
        if sample_weight.device != logits.device:
            return f"sample_weight is on {sample_weight.device} but logits are on {logits.device}"
    return None


def bad_targets(targets: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    """Device flag: some non-ignored target is not a valid class id."""
    return ((targets != ignore_index) & out_of_range_targets(targets, num_classes)).any()


def describe_bad_targets(targets: Tensor, num_classes: int, ignore_index: int) -> str:
    t = targets.reshape(-1).long()
    t = t[t != ignore_index]
    if num_classes == 1:
        bad = t[out_of_range_targets(t, 1)].unique()[:8].tolist()
        return (
            f"targets for binary mode (num_classes=1) must be 0, 1 or "
            f"ignore_index={ignore_index}; got values outside {{0, 1}}: {bad}"
        )
    return (
        f"targets must be in [0, {num_classes}) or ignore_index={ignore_index}; "
        f"got values outside that range (min {int(t.min())}, max {int(t.max())})"
    )


def bad_weights(weights: Tensor) -> Tensor:
    """Device flag: some weight is negative or not finite."""
    return ~torch.isfinite(weights).all() | (weights < 0).any()


def describe_bad_weights(sample_weight: Tensor | None) -> str:
    assert sample_weight is not None
    w = sample_weight.detach()
    return (
        "sample_weight must be finite and non-negative; got "
        f"{int((~torch.isfinite(w)).sum())} non-finite and {int((w < 0).sum())} negative values"
    )


def true_indices(mask: Tensor, count: int) -> Tensor:
    """Indices of the ``count`` True entries of ``mask`` (a count the host already knows).

    ``nonzero_static`` needs no device sync; CUDA has it from torch 2.6, older
    builds fall back to ``nonzero`` (one sync).
    """
    try:
        return mask.nonzero_static(size=count).squeeze(1)
    except NotImplementedError:
        return mask.nonzero().squeeze(1)


def describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"tensor of dtype {value.dtype} and shape {tuple(value.shape)}"
    return type(value).__name__
