"""Hard recall at the alert budget, for evaluation (no gradient, DDP-aware)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _distributed
from .functional import INTERPOLATIONS, positive_columns, quantile_threshold


@torch.no_grad()
def recall_at_quantile(
    scores: Tensor,
    targets: Tensor,
    quantile: float,
    *,
    interpolation: str = "higher",
    ignore_index: int = -100,
    reduction: str = "none",
    gather_distributed: Optional[bool] = None,
) -> Tensor:
    """Fraction of each class's positives scoring at or above its alert threshold.

    The threshold is the one :class:`RecallAtQuantileLoss` uses: the
    ``(1 - quantile)`` quantile of the (non-ignored) scores of the column.
    ``scores`` ``[N]`` is binary and gives a 0-d result; ``[N, C]`` gives ``[C]``
    (``C == 1`` is binary), NaN for a class without positives; ``reduction="mean"``
    averages the classes that have positives. Under ``torch.distributed`` every
    rank's rows are pooled, so every rank returns the global value.
    """
    if not isinstance(scores, Tensor) or not scores.is_floating_point() or scores.dim() not in (1, 2):
        raise ValueError(f"scores must be a float tensor [N] or [N, C], got {scores!r:.80}")
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {quantile!r}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    if reduction not in ("none", "mean"):
        raise ValueError(f"reduction must be 'none' or 'mean', got {reduction!r}")
    squeeze = scores.dim() == 1
    columns = scores.reshape(scores.shape[0], -1)
    if not isinstance(targets, Tensor) or targets.is_floating_point():
        raise ValueError("targets must be an integer or bool tensor of class ids")
    targets = targets.reshape(-1).long()
    if targets.shape[0] != columns.shape[0]:
        raise ValueError(
            f"targets must have {columns.shape[0]} rows to match scores, got {targets.shape[0]}"
        )
    if _distributed.should_gather(gather_distributed):
        packed = torch.cat([columns.double(), targets.double()[:, None]], dim=1)
        packed = _distributed.all_gather_no_grad(packed)
        columns, targets = packed[:, :-1].to(columns.dtype), packed[:, -1].long()
    keep = targets != ignore_index
    columns, targets = columns[keep], targets[keep]
    num_classes = columns.shape[1]
    if num_classes > 1 and ((targets < 0) | (targets >= num_classes)).any():
        raise ValueError(f"targets must be in [0, {num_classes}) or ignore_index={ignore_index}")
    if num_classes == 1 and ((targets != 0) & (targets != 1)).any():
        raise ValueError(f"binary targets must be 0, 1 or ignore_index={ignore_index}")
    result = torch.full((num_classes,), float("nan"), dtype=torch.float64, device=columns.device)
    if columns.shape[0] > 0:
        theta = quantile_threshold(columns, quantile, interpolation)
        cls = positive_columns(targets, num_classes)
        rows = (cls >= 0).nonzero(as_tuple=True)[0]
        hit = (columns[rows, cls[rows]] >= theta[cls[rows]]).double()
        positives = torch.zeros_like(result).index_add(0, cls[rows], torch.ones_like(hit))
        hits = torch.zeros_like(result).index_add(0, cls[rows], hit)
        result = torch.where(positives > 0, hits / positives.clamp_min(1), result)
    if reduction == "mean":
        return result.nanmean()
    return result[0] if squeeze else result
