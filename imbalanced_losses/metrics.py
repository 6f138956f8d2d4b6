"""Hard recall at the alert budget, for evaluation (no gradient, DDP-aware)."""

from __future__ import annotations

import torch
from torch import Tensor

from . import _distributed
from .functional import (
    INTERPOLATIONS,
    out_of_range_targets,
    positive_columns,
    quantile_threshold,
)


@torch.no_grad()
def recall_at_quantile(
    scores: Tensor,
    targets: Tensor,
    quantile: float,
    *,
    interpolation: str = "higher",
    ignore_index: int = -100,
    reduction: str = "none",
    gather_distributed: bool | None = None,
) -> Tensor:
    """Fraction of each class's positives scoring at or above its alert threshold.

    The threshold is the one :class:`RecallAtQuantileLoss` uses: the
    ``(1 - quantile)`` quantile of the (non-ignored) scores of the column.
    ``scores`` ``[N]`` is binary and gives a 0-d result; ``[N, C]`` gives ``[C]``
    (``C == 1`` is binary), NaN for a class without positives; ``reduction="mean"``
    averages the classes that have positives. Under ``torch.distributed`` every
    rank's rows are pooled, so every rank returns the global value.

    Every row tied with the threshold counts as alerted: with heavily tied scores
    (e.g. saturated or dead units) more than the budget is alerted and recall is
    inflated; check ``(scores >= threshold).float().mean()`` if that can happen.
    """
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {quantile!r}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    if reduction not in ("none", "mean"):
        raise ValueError(f"reduction must be 'none' or 'mean', got {reduction!r}")
    problem = _input_problem(scores, targets, ignore_index)
    if _distributed.should_gather(gather_distributed):
        # One metadata collective first, so bad input on any rank raises on every
        # rank instead of leaving the others waiting in the row gather.
        width = scores.shape[1] if problem is None and scores.dim() == 2 else 1
        num_rows = scores.shape[0] if problem is None else 0
        device = scores.device if isinstance(scores, Tensor) else None
        meta = torch.tensor(
            [float(problem is not None), num_rows, width], dtype=torch.float64, device=device
        )
        metas = torch.stack(_distributed.all_gather_rows_of_equal_shape(meta)).tolist()
        _raise_on_any(metas, problem)
        columns, targets = scores.reshape(num_rows, width), targets.reshape(-1).long()
        packed = torch.cat([columns.double(), targets.double()[:, None]], dim=1)
        packed = _distributed.gather_rows(packed, [int(m[1]) for m in metas])
        columns, targets = packed[:, :-1].to(scores.dtype), packed[:, -1].long()
    elif problem is not None:
        raise ValueError(problem)
    else:
        columns, targets = scores.reshape(scores.shape[0], -1), targets.reshape(-1).long()
    squeeze = scores.dim() == 1
    keep = targets != ignore_index
    columns, targets = columns[keep], targets[keep]
    num_classes = columns.shape[1]
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


def _input_problem(scores: object, targets: object, ignore_index: int) -> str | None:
    """What is wrong with this rank's ``scores``/``targets``, or ``None``."""
    if (
        not isinstance(scores, Tensor)
        or not scores.is_floating_point()
        or scores.dim() not in (1, 2)
    ):
        shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        return f"scores must be a float tensor [N] or [N, C], got {shape}"
    if not isinstance(targets, Tensor) or targets.is_floating_point():
        return "targets must be an integer or bool tensor of class ids"
    if targets.numel() != scores.shape[0] or targets.dim() > 2:
        return (
            f"targets must hold {scores.shape[0]} class ids to match scores, "
            f"got shape {tuple(targets.shape)}"
        )
    t = targets.reshape(-1).long()
    t = t[t != ignore_index]
    num_classes = 1 if scores.dim() == 1 else scores.shape[1]
    if not out_of_range_targets(t, num_classes).any():
        return None
    if num_classes == 1:
        return f"binary targets must be 0, 1 or ignore_index={ignore_index}"
    return f"targets must be in [0, {num_classes}) or ignore_index={ignore_index}"


def _raise_on_any(metas: list[list[float]], problem: str | None) -> None:
    flagged = [r for r, m in enumerate(metas) if m[0]]
    if problem is not None:
        raise ValueError(f"rank {_distributed.world()[0]}: {problem}")
    if flagged:
        raise ValueError(f"invalid input on rank(s) {flagged} (see their error)")
    widths = {int(m[2]) for m in metas}
    if len(widths) > 1:
        raise ValueError(f"ranks disagree on the number of score columns: {sorted(widths)}")
