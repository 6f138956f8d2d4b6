"""Hard recall at the alert budget, for evaluation (no gradient, DDP-aware)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import _distributed, _exchange, _validation
from .functional import INTERPOLATIONS, positive_scores, quantile_threshold


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
    process_group: Any = None,
) -> Tensor:
    """Fraction of each class's positives scoring at or above its alert threshold.

    The threshold is the one :class:`RecallAtQuantileLoss` uses: the
    ``(1 - quantile)`` quantile of the (non-ignored) scores of the column.
    ``scores`` ``[N]`` is binary and gives a 0-d result; ``[N, C]`` gives ``[C]``
    (``C == 1`` is binary), NaN for a class without positives; ``reduction="mean"``
    averages the classes that have positives. Under ``torch.distributed`` every
    rank's rows are pooled (the ranks of ``process_group``, default all), so
    every rank returns the global value. float16/bfloat16 scores give the answer of
    their float32 upcast: the rank and threshold are computed in float32.

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
    columns, targets = _pooled_rows(
        scores, targets, ignore_index, gather_distributed, process_group
    )
    num_classes = columns.shape[1]
    result = torch.full((num_classes,), float("nan"), dtype=torch.float64, device=columns.device)
    if columns.shape[0] > 0:
        theta = quantile_threshold(columns, quantile, interpolation)
        ones = torch.ones(targets.shape[0], dtype=torch.float64, device=columns.device)
        own, cls, is_positive = positive_scores(columns, targets, ones, num_classes)
        hit = (own >= theta[cls]).double() * is_positive
        positives = torch.zeros_like(result).index_add(0, cls, is_positive)
        hits = torch.zeros_like(result).index_add(0, cls, hit)
        result = torch.where(positives > 0, hits / positives.clamp_min(1), result)
    if reduction == "mean":
        return result.nanmean()
    return result[0] if scores.dim() == 1 else result


def _pooled_rows(
    scores: Tensor,
    targets: Tensor,
    ignore_index: int,
    gather_distributed: bool | None,
    group: Any,
) -> tuple[Tensor, Tensor]:
    """Validated non-ignored ``(scores [M, C], targets [M])`` of every rank, in rank order."""
    distributed = _distributed.should_gather(gather_distributed, group)
    problem = _static_problem(scores, targets)
    check, width = _exchange.Check(problem), 0
    if problem is None:
        columns = scores[:, None] if scores.dim() == 1 else scores
        tgt = targets.reshape(-1).long()
        width, keep = columns.shape[1], tgt != ignore_index
        bad = _validation.bad_targets(tgt, width, ignore_index)
        check = _exchange.Check(rows=keep.sum(), flags={"targets": bad})
    device = scores.device if isinstance(scores, Tensor) else torch.device("cpu")
    agreed = _exchange.agree(
        check,
        [_exchange.Agreed("the number of score columns", width)],
        flags={"targets": lambda: _validation.describe_bad_targets(tgt, width, ignore_index)},
        device=device,
        distributed=distributed,
        group=group,
    )
    columns, tgt = agreed.keep(keep, columns, tgt)
    if not agreed.distributed:
        return columns, tgt
    packed = agreed.gather(torch.cat([columns.double(), tgt.double()[:, None]], dim=1))
    return packed[:, :-1].to(scores.dtype), packed[:, -1].long()


def _static_problem(scores: object, targets: object) -> str | None:
    """What is wrong with the shapes and dtypes of this rank's inputs, or ``None``."""
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
    if targets.device != scores.device:
        return f"targets are on {targets.device} but scores are on {scores.device}"
    return None
