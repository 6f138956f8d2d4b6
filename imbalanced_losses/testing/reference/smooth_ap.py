"""Plain Smooth-AP (Brown et al., ECCV 2020): the oracle of the SmoothAPLoss tests and the
full-matrix baseline of ``scripts/bench.py``.

Written from the formula, not from the library: a Python loop over classes, the full
``[P, M]`` pair matrix, autograd for the gradient. Per class ``c`` (binary: column 0,
positives are target 1), over the pool (live rows that are not padding, then the queue)::

    D[i, j]  = sigmoid((s_jc - s_ic) / tau)        for positives i, every pooled row j
    R(i)     = 1 + scale * sum_{j != i} D[i, j]
    R+(i)    = 1 + scale * sum_{j != i, j positive of c} D[i, j]
    AP_c     = sum_i w_i R+(i) / R(i) / sum_i w_i,  loss_c = 1 - AP_c
    valid_c  = sum_i w_i > 0 and the pool holds a row that is not a positive of c

With ``sample`` (pool indices), ``j`` runs over the sampled rows only and
``scale = pool size / sample size``; otherwise ``scale = 1``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from imbalanced_losses.testing.reference._queue import QueuedReference

__all__ = ["ReferenceSmoothAPLoss", "reference_smooth_ap_loss"]


def reference_smooth_ap_loss(
    logits: Tensor,
    targets: Tensor,
    *,
    num_classes: int,
    temperature: float,
    ignore_index: int = -100,
    reduction: str = "mean",
    sample_weight: Tensor | None = None,
    queue_scores: Tensor | None = None,
    queue_targets: Tensor | None = None,
    queue_weights: Tensor | None = None,
    sample: Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[Tensor, Tensor, Tensor]:
    """Return ``(loss, per_class [C] with NaN where invalid, valid [C] bool)``.

    Computed in ``dtype`` (float64 for the tests; the benchmark runs it in float32).
    """
    targets = targets.reshape(-1).long()
    weights = (
        torch.ones(logits.shape[0], dtype=dtype)
        if sample_weight is None
        else sample_weight.detach().to(dtype)
    )
    keep = targets != ignore_index
    scores, labels, weights = logits.to(dtype)[keep], targets[keep], weights[keep]
    if queue_scores is not None and queue_scores.shape[0] > 0:
        if queue_targets is None or queue_weights is None:
            raise ValueError("queue_targets and queue_weights must be given with queue_scores")
        scores = torch.cat([scores, queue_scores.detach().to(dtype)])
        labels = torch.cat([labels, queue_targets.long()])
        weights = torch.cat([weights, queue_weights.detach().to(dtype)])
    size = scores.shape[0]
    others = torch.arange(size) if sample is None else sample
    scale = 1.0 if sample is None else size / sample.shape[0]

    zero = logits[:0].sum().to(dtype)
    per_class, valid = [], []
    for c in range(logits.shape[1]):
        is_pos = labels == (1 if num_classes == 1 else c)
        w = weights[is_pos]
        if size == 0 or w.sum() <= 0 or bool(is_pos.all()):
            per_class.append(torch.tensor(float("nan"), dtype=dtype) + zero)
            valid.append(False)
            continue
        pos_rows = is_pos.nonzero().squeeze(1)
        column = scores[:, c]
        pairs = torch.sigmoid((column[others][None, :] - column[pos_rows][:, None]) / temperature)
        not_self = others[None, :] != pos_rows[:, None]
        rank = 1 + scale * (pairs * not_self).sum(1)
        rank_pos = 1 + scale * (pairs * not_self * is_pos[others][None, :]).sum(1)
        ap = (w * rank_pos / rank).sum() / w.sum()
        per_class.append(1 - ap)
        valid.append(True)

    per_class_t = torch.stack(per_class)
    valid_t = torch.tensor(valid)
    kept = [p for p, v in zip(per_class, valid) if v]
    if reduction == "none":
        loss = per_class_t
    elif not kept:
        loss = zero
    elif reduction == "sum":
        loss = torch.stack(kept).sum()
    else:
        loss = torch.stack(kept).mean()
    return loss, per_class_t, valid_t


class ReferenceSmoothAPLoss(QueuedReference):
    """The plain formula with the plain circular queue (``self.queue``, kept in ``dtype``)."""

    def __init__(
        self,
        num_classes: int,
        queue_size: int = 1024,
        temperature: float = 0.01,
        reduction: str = "mean",
        ignore_index: int = -100,
        update_queue_in_eval: bool = False,
        dtype: torch.dtype = torch.float64,
    ):
        super().__init__(num_classes, queue_size, ignore_index, update_queue_in_eval, dtype)
        self.temperature = temperature
        self.reduction = reduction
        self.dtype = dtype

    def formula(
        self,
        logits: Tensor,
        targets: Tensor,
        sample_weight: Tensor | None,
        queue_rows: tuple[Tensor, Tensor, Tensor],
        sample: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        q_scores, q_targets, q_weights = queue_rows
        return reference_smooth_ap_loss(
            logits,
            targets,
            num_classes=self.num_classes,
            temperature=self.temperature,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            sample_weight=sample_weight,
            queue_scores=q_scores,
            queue_targets=q_targets,
            queue_weights=q_weights,
            sample=sample,
            dtype=self.dtype,
        )
