"""Pure checks of one rank's inputs: they decide nothing across ranks and never sync.

Shape, dtype and device checks run on the host without touching values and return the
first problem as a message (or ``None``); value checks (targets in range, weights finite
and non-negative) return a device flag, with a ``describe_*`` that explains a flagged
input once it must raise. ``_exchange`` carries the flags to every rank and decides.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .functional import out_of_range_targets


def static_problem(
    logits: Any,
    targets: Any,
    sample_weight: Any,
    num_classes: int,
    state_device: torch.device,
    iid_mask: Any = None,
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
    if iid_mask is not None:
        if (
            not isinstance(iid_mask, Tensor)
            or iid_mask.is_floating_point()
            or iid_mask.is_complex()
        ):
            return f"iid_mask must be a bool tensor [{n}], got {describe(iid_mask)}"
        if tuple(iid_mask.shape) != (n,):
            return (
                f"iid_mask must be [N] matching logits dim-0, got {tuple(iid_mask.shape)} vs N={n}"
            )
        if iid_mask.device != logits.device:
            return f"iid_mask is on {iid_mask.device} but logits are on {logits.device}"
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


def describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"tensor of dtype {value.dtype} and shape {tuple(value.shape)}"
    return type(value).__name__
