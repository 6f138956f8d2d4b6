"""Pure functions behind the queued ranking losses.

Each function works on all classes at once (columns of a ``[P, C]`` score
matrix) so the loss never loops over classes in Python nor syncs the host per
class. The threshold is found by *selection* (``torch.topk`` /
``torch.kthvalue``), not by sorting, and has no row limit (``torch.quantile``
refuses inputs past 2**24 elements).
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import Tensor

Interpolation = Literal["linear", "lower", "higher", "nearest", "midpoint"]
INTERPOLATIONS: tuple[str, ...] = ("linear", "lower", "higher", "nearest", "midpoint")

# Above this fraction of the column, one O(P) quickselect per order statistic
# beats a top-k heap/partial sort of the upper tail.
_TOPK_MAX_FRACTION = 0.05


def _order_statistic_positions(
    num_rows: int, prob: float, interpolation: str, dtype: torch.dtype
) -> tuple[int, int, float]:
    """Ascending positions ``(below, above)`` and lerp weight, as ``torch.quantile`` derives them.

    ``torch.quantile`` computes the fractional rank ``prob * (n - 1)`` in the
    input's dtype, then floors/ceils/rounds (half to even) it. Doing the same
    scalar arithmetic here makes the threshold bit-identical to it.
    """
    rank = torch.tensor(prob, dtype=dtype) * (num_rows - 1)
    if interpolation == "lower":
        rank = rank.floor()
    elif interpolation == "higher":
        rank = rank.ceil()
    elif interpolation == "nearest":
        rank = rank.round()
    below = int(rank.floor().item())
    above = int(rank.ceil().item())
    if interpolation == "midpoint":
        weight = 0.5
    else:
        weight = float((rank - below).item())
    return below, min(above, num_rows - 1), weight


def _select_ascending(scores: Tensor, positions: tuple[int, ...]) -> list[Tensor]:
    """Per-column values at the given ascending order-statistic positions (0-based)."""
    num_rows = scores.shape[0]
    lowest = min(positions)
    needed = num_rows - lowest  # top-k must reach down to the lowest position
    if needed <= max(1, int(_TOPK_MAX_FRACTION * num_rows)):
        top = torch.topk(scores, needed, dim=0, largest=True, sorted=True).values
        return [top[num_rows - 1 - p] for p in positions]
    return [torch.kthvalue(scores, p + 1, dim=0).values for p in positions]


def quantile_threshold(
    scores: Tensor, quantile: float, interpolation: str = "higher"
) -> Tensor:
    """Per-column ``(1 - quantile)`` quantile of ``scores`` ``[P, C]``; returns ``[C]``.

    Same value as ``torch.quantile(scores, 1 - quantile, dim=0,
    interpolation=interpolation)`` (NaN for a column holding a NaN), computed
    without a sort and without a size limit. ``P`` must be at least 1.
    The result carries no gradient: the threshold is a stop-gradient target.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [P, C], got shape {tuple(scores.shape)}")
    if scores.shape[0] == 0:
        raise ValueError("scores must hold at least one row to define a quantile")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    scores = scores.detach()
    below, above, weight = _order_statistic_positions(
        scores.shape[0], 1.0 - quantile, interpolation, scores.dtype
    )
    if interpolation in ("linear", "midpoint") and above != below:
        low, high = _select_ascending(scores, (below, above))
        theta = torch.lerp(low, high, weight)
    else:
        (theta,) = _select_ascending(scores, (below,))
    has_nan = torch.isnan(scores).any(dim=0)
    return theta.masked_fill(has_nan, float("nan"))


def positive_columns(targets: Tensor, num_classes: int) -> Tensor:
    """Column whose positive each row is (binary: column 0 for target 1), or -1 for none."""
    if num_classes == 1:
        return torch.where(targets == 1, 0, -1)
    return targets


def soft_recall_per_class(
    scores: Tensor,
    positive_column: Tensor,
    threshold: Tensor,
    temperature: float,
    weights: Tensor,
) -> tuple[Tensor, Tensor]:
    """Weighted mean of ``sigmoid((s - theta) / tau)`` over each class's positives.

    Each row is a positive of at most one class, so only ``O(P)`` sigmoids are
    evaluated (not ``O(P * C)``): the positive's own score is gathered and
    scattered back into its class. Returns ``(soft_recall [C], weight_mass [C])``;
    classes with zero positive mass get recall 0 (callers mask them).
    """
    num_classes = threshold.shape[0]
    is_positive = positive_column >= 0
    rows = is_positive.nonzero(as_tuple=True)[0]
    cls = positive_column[rows]
    own_scores = scores[rows, cls]
    recall_terms = torch.sigmoid((own_scores - threshold[cls]) / temperature)
    w = weights[rows].to(recall_terms.dtype)
    mass = torch.zeros(num_classes, dtype=recall_terms.dtype, device=scores.device)
    mass = mass.index_add(0, cls, w)
    weighted = torch.zeros_like(mass).index_add(0, cls, w * recall_terms)
    recall = weighted / mass.clamp_min(torch.finfo(mass.dtype).tiny)
    return recall, mass


def reduce_per_class(
    per_class: Tensor, valid: Tensor, reduction: str, anchor: Optional[Tensor] = None
) -> Tensor:
    """Reduce per-class losses over valid classes only.

    ``per_class`` must already be NaN-free where ``valid`` is False (it is
    masked here). With no valid class, ``mean``/``sum`` give a zero that is
    still connected to ``anchor``'s graph so DDP and ``backward()`` work.
    """
    if reduction == "none":
        return per_class.masked_fill(~valid, float("nan"))
    masked = torch.where(valid, per_class, torch.zeros_like(per_class))
    total = masked.sum()
    if reduction == "mean":
        total = total / valid.sum().clamp_min(1).to(total.dtype)
    if anchor is not None:
        total = total + anchor.sum() * 0.0
    return total
