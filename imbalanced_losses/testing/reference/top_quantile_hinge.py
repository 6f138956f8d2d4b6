"""Plain top-quantile hinge: the oracle of the docs' own-loss example (``TopQuantileHingeLoss``).

Written from the formula, not from the example's code: a Python loop over classes. Per class
``c`` (binary: column 0, positives are target 1), over the pool (live rows that are not
padding, then the queue)::

    theta_c  = the (1 - quantile) quantile of column c over the pool ("higher" rule)
    h(x)     = tau * log(1 + exp(x / tau))          (a hinge softened to width tau)
    loss_c   = sum_i w_i h(theta_c + margin - s_ic) / sum_i w_i   over positives i of c
    valid_c  = sum_i w_i > 0

The threshold is a constant for the gradient; only the live rows carry one.
"""

from __future__ import annotations

import torch
from torch import Tensor

from imbalanced_losses.testing.reference._queue import QueuedReference

__all__ = ["ReferenceTopQuantileHingeLoss"]


class ReferenceTopQuantileHingeLoss(QueuedReference):
    """The plain formula with the plain circular queue (``self.queue``, kept in ``dtype``)."""

    def __init__(
        self,
        num_classes: int,
        queue_size: int = 1024,
        reduction: str = "mean",
        ignore_index: int = -100,
        update_queue_in_eval: bool = False,
        temperature: float = 0.1,
        quantile: float = 0.2,
        margin: float = 0.1,
        dtype: torch.dtype = torch.float64,
    ):
        super().__init__(num_classes, queue_size, ignore_index, update_queue_in_eval, dtype)
        self.temperature, self.quantile, self.margin = temperature, quantile, margin
        self.reduction, self.dtype = reduction, dtype

    def formula(
        self,
        logits: Tensor,
        targets: Tensor,
        sample_weight: Tensor | None,
        queue_rows: tuple[Tensor, Tensor, Tensor],
        **_: object,
    ) -> tuple[Tensor, Tensor, Tensor]:
        dtype = self.dtype
        flat = targets.reshape(-1).long()
        keep = flat != self.ignore_index
        weights = (
            torch.ones(logits.shape[0], dtype=dtype)
            if sample_weight is None
            else sample_weight.detach().to(dtype)
        )
        q_scores, q_targets, q_weights = queue_rows
        scores = torch.cat([logits.to(dtype)[keep], q_scores.detach().to(dtype)])
        labels = torch.cat([flat[keep], q_targets.long()])
        weights = torch.cat([weights[keep], q_weights.to(dtype)])
        zero = logits[:0].sum().to(dtype)
        per_class, valid = [], []
        for c in range(logits.shape[1]):
            is_pos = labels == (1 if self.num_classes == 1 else c)
            w = weights[is_pos]
            if scores.shape[0] == 0 or w.sum() <= 0:
                per_class.append(torch.tensor(float("nan"), dtype=dtype) + zero)
                valid.append(False)
                continue
            column = scores[:, c]
            theta = torch.quantile(column.detach(), 1 - self.quantile, interpolation="higher")
            x = (theta + self.margin - column[is_pos]) / self.temperature
            hinge = self.temperature * (x.clamp_min(0) + torch.log1p(torch.exp(-x.abs())))
            per_class.append((w * hinge).sum() / w.sum())
            valid.append(True)
        per_class_t = torch.stack(per_class)
        kept = [p for p, v in zip(per_class, valid) if v]
        if self.reduction == "none":
            loss = per_class_t
        elif not kept:
            loss = zero
        elif self.reduction == "sum":
            loss = torch.stack(kept).sum()
        else:
            loss = torch.stack(kept).mean()
        return loss, per_class_t, torch.tensor(valid)
