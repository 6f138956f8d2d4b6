"""``RecallAtQuantile``: the evaluation metric accumulated over batches and ranks (torchmetrics).

A quantile cannot be averaged over batches: the recall of a dataloader is the recall at the
threshold of *all* its scores, so the metric keeps every (non-ignored) row and calls
:func:`recall_at_quantile` once, on the concatenation of every update of every rank.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

try:
    from torchmetrics import Metric
except ImportError as exc:  # the core package never needs torchmetrics
    raise ImportError(
        "RecallAtQuantile needs torchmetrics, which is an optional dependency: "
        'pip install "imbalanced-losses[metrics]"'
    ) from exc

from . import _validation
from .functional import INTERPOLATIONS
from .metrics import _static_problem, recall_at_quantile

__all__ = ["RecallAtQuantile"]

# Score dtypes a row store can hold; float64 holds each of them exactly.
_SCORE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class RecallAtQuantile(Metric):
    """Hard recall at the alert budget over a whole dataloader, synced across DDP ranks.

    ``update(scores, targets)`` takes the arguments of :func:`recall_at_quantile` (``scores``
    ``[N]`` binary or ``[N, C]`` one-vs-rest, ``targets`` ``[N]`` class ids, ``ignore_index``
    rows dropped) and keeps the rows; ``compute()`` returns exactly
    ``recall_at_quantile(cat(all scores), cat(all targets), quantile, ...)`` over every update
    of every rank (ranks may see uneven numbers of rows, or none). Under Lightning, log the
    metric object itself (``self.log("val_recall", metric)``) and Lightning calls ``compute``
    and ``reset`` at the end of the epoch.

    Why not average per-batch recalls: each batch has its own threshold, and a batch without a
    positive has no recall at all (NaN), so the mean of per-batch values is a different number.

    Memory: every kept row is stored (``C + 1`` float64 values per row) until ``reset()``, as
    for any exact quantile. Rows are stored in float64, which holds float16, bfloat16 and float32
    scores exactly; ``compute`` casts them back to the dtype ``torch.cat`` would give the raw
    scores, so thresholds and ties are those of the inputs.

    Args:
        quantile: the alert budget, in (0, 1): the share of rows at or above the threshold.
        interpolation: quantile interpolation, as in ``torch.quantile``.
        ignore_index: target value of padding rows, which count nowhere.
        reduction: ``"none"`` (a 0-d tensor for ``[N]`` scores, ``[C]`` otherwise, NaN for a
            class without positives) or ``"mean"`` (over the classes that have positives).
            torchmetrics returns any one-element result as 0-d, so ``[N, 1]`` scores give a
            0-d tensor here where the function gives ``[1]``.
        kwargs: passed to ``torchmetrics.Metric`` (``sync_on_compute``, ``process_group``, ...).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    rows: list[Tensor] | Tensor
    layouts: list[Tensor] | Tensor

    def __init__(
        self,
        quantile: float,
        *,
        interpolation: str = "higher",
        ignore_index: int = -100,
        reduction: str = "none",
        **kwargs: Any,
    ) -> None:
        if not (isinstance(quantile, (int, float)) and 0.0 < quantile < 1.0):
            raise ValueError(f"quantile must be a number in (0, 1), got {quantile!r}")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}"
            )
        if reduction not in ("none", "mean"):
            raise ValueError(f"reduction must be 'none' or 'mean', got {reduction!r}")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
        super().__init__(**kwargs)
        self.quantile = float(quantile)
        self.interpolation = interpolation
        self.ignore_index = ignore_index
        self.reduction = reduction
        # Both states are flat float64 vectors, one entry per update: torchmetrics fills a rank
        # without updates with an empty vector of the metric's dtype, which then gathers
        # cleanly alongside the others (same number of dimensions, same dtype).
        #   rows:    the kept rows of the update, [scores | target], flattened
        #   layouts: (score columns, 0 for [N] scores; index of the scores' dtype)
        self.add_state("rows", default=[], dist_reduce_fx="cat")
        self.add_state("layouts", default=[], dist_reduce_fx="cat")
        self.set_dtype(torch.float64)

    def update(self, scores: Tensor, targets: Tensor) -> None:
        """Keep this batch's non-ignored rows; checks the batch before storing anything."""
        # the function's own checks, so the metric accepts exactly what it accepts
        problem = _static_problem(scores, targets)
        if problem is not None:
            raise ValueError(problem)
        if scores.dtype not in _SCORE_DTYPES:
            raise ValueError(f"scores must be one of {_SCORE_DTYPES}, got {scores.dtype}")
        columns = 0 if scores.dim() == 1 else scores.shape[1]
        targets = targets.reshape(-1).long()
        if _validation.bad_targets(targets, max(columns, 1), self.ignore_index):
            raise ValueError(
                _validation.describe_bad_targets(targets, max(columns, 1), self.ignore_index)
            )
        if isinstance(self.layouts, list) and self.layouts:
            seen = int(self.layouts[0][0])
            if seen != columns:
                raise ValueError(
                    f"scores have {_describe(columns)} but earlier updates had "
                    f"{_describe(seen)}; call reset() between different tasks"
                )
        keep = targets != self.ignore_index
        kept_scores = scores.reshape(scores.shape[0], max(columns, 1))[keep].double()
        kept = torch.cat([kept_scores, targets[keep].double()[:, None]], dim=1)
        layout = torch.tensor(
            [columns, _SCORE_DTYPES.index(scores.dtype)], dtype=torch.float64, device=kept.device
        )
        self.rows.append(kept.reshape(-1))  # type: ignore[union-attr]
        self.layouts.append(layout)  # type: ignore[union-attr]

    def compute(self) -> Tensor:
        """``recall_at_quantile`` of every row kept since the last ``reset()``, on every rank."""
        # (after a sync the states are tensors: every rank's entries, in rank order)
        layouts = self.layouts if isinstance(self.layouts, Tensor) else _cat(self.layouts)
        layouts = layouts.reshape(-1, 2)
        if layouts.shape[0] == 0:  # no update anywhere: nothing says how many classes
            return torch.tensor(float("nan"), dtype=torch.float64, device=self.device)
        column_counts = sorted({int(c) for c in layouts[:, 0].tolist()})
        if len(column_counts) > 1:
            raise ValueError(
                "updates disagree on the score columns "
                f"({', '.join(_describe(c) for c in column_counts)}), e.g. across ranks"
            )
        columns = column_counts[0]
        dtypes = [_SCORE_DTYPES[int(i)] for i in layouts[:, 1].tolist()]
        dtype = dtypes[0]
        for other in dtypes[1:]:  # as torch.cat would promote the raw scores
            dtype = torch.promote_types(dtype, other)
        rows = self.rows if isinstance(self.rows, Tensor) else _cat(self.rows)
        rows = rows.reshape(-1, max(columns, 1) + 1)
        scores = rows[:, :-1].to(dtype)
        if rows.shape[0] == 0:  # what the function gives when every row is ignored
            shape = () if columns == 0 or self.reduction == "mean" else (columns,)
            return torch.full(shape, float("nan"), dtype=torch.float64, device=rows.device)
        return recall_at_quantile(
            scores[:, 0] if columns == 0 else scores,
            rows[:, -1].long(),
            self.quantile,
            interpolation=self.interpolation,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            gather_distributed=False,  # the states are already every rank's rows
        )


def _cat(entries: list[Tensor]) -> Tensor:
    return torch.cat(entries) if entries else torch.empty(0, dtype=torch.float64)


def _describe(columns: int) -> str:
    return "shape [N] (binary)" if columns == 0 else f"{columns} column(s)"
