"""Plain reference implementation of Recall-at-Quantile (the formula of the README).

Written from the formula, not from the library: a Python loop over classes, boolean masks and
``torch.quantile`` per class. It is the oracle of the test-suite and the baseline of
``scripts/bench.py``. It is deliberately slow and deliberately keeps ``torch.quantile``'s
2^24-row limit. It does no input validation, no subsampling and no distributed gather.

Math, per class ``c`` (binary mode ``num_classes == 1``: column 0, positives are target 1)::

    pool     = live rows whose target != ignore_index, then the queue rows
    theta_c  = torch.quantile(pool[:, c], 1 - quantile, interpolation)     (detached)
    recall_c = sum_{i pos} w_i * sigmoid((s_ic - theta_c) / temperature) / sum_{i pos} w_i
    loss_c   = 1 - recall_c,  valid_c = (sum_{i pos} w_i > 0)

``mean``/``sum`` reduce over valid classes; with no valid class the loss is a zero that is still
connected to the graph. ``none`` returns ``[C]`` with NaN for invalid classes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from imbalanced_losses.testing.reference._queue import QueuedReference

__all__ = [
    "reference_recall_at_quantile_loss",
    "reference_recall_at_quantile",
    "ReferenceRecallAtQuantileLoss",
]


def _positive_label(num_classes: int, c: int) -> int:
    return 1 if num_classes == 1 else c


def reference_recall_at_quantile_loss(
    logits: Tensor,
    targets: Tensor,
    *,
    num_classes: int,
    quantile: float,
    temperature: float,
    interpolation: str = "higher",
    ignore_index: int = -100,
    reduction: str = "mean",
    sample_weight: Tensor | None = None,
    queue_scores: Tensor | None = None,
    queue_targets: Tensor | None = None,
    queue_weights: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Return ``(loss, per_class [C] with NaN where invalid, valid [C] bool)``."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    if queue_scores is not None:
        dtype = torch.promote_types(dtype, queue_scores.dtype)
    num_columns = logits.shape[1]
    targets = targets.reshape(-1).long()
    if sample_weight is None:
        weights = torch.ones(logits.shape[0], dtype=dtype, device=logits.device)
    else:
        weights = sample_weight.detach().to(dtype)

    # Pool: live rows that are not padding, then the queue rows (which carry no gradient).
    keep = targets != ignore_index
    scores = logits.to(dtype)[keep]
    labels = targets[keep]
    weights = weights[keep]
    if queue_scores is not None and queue_scores.shape[0] > 0:
        if queue_targets is None:
            raise ValueError("queue_targets must be given with queue_scores")
        if queue_weights is None:
            queue_weights = torch.ones(queue_scores.shape[0], dtype=dtype, device=logits.device)
        scores = torch.cat([scores, queue_scores.detach().to(dtype)])
        labels = torch.cat([labels, queue_targets.long().to(labels.device)])
        weights = torch.cat([weights, queue_weights.detach().to(dtype)])

    # A zero that is connected to the graph (an empty sum: no NaN even if logits hold NaN).
    zero = logits[:0].sum().to(dtype)
    nan = torch.tensor(float("nan"), dtype=dtype, device=logits.device)

    per_class = []
    valid = []
    for c in range(num_columns):
        is_pos = labels == _positive_label(num_classes, c)
        w_pos = weights[is_pos]
        if w_pos.sum() <= 0:  # also covers an empty pool and a class with no positive
            per_class.append(nan + zero)
            valid.append(False)
            continue
        column = scores[:, c]
        theta = torch.quantile(column.detach(), 1.0 - quantile, interpolation=interpolation)
        soft = torch.sigmoid((column[is_pos] - theta) / temperature)
        recall = (w_pos * soft).sum() / w_pos.sum()
        per_class.append(1.0 - recall)
        valid.append(True)

    per_class_t = torch.stack(per_class) if per_class else zero.reshape(0)
    valid_t = torch.tensor(valid, dtype=torch.bool, device=logits.device)
    valid_losses = [p for p, v in zip(per_class, valid) if v]
    if reduction == "none":
        loss = per_class_t
    elif not valid_losses:
        loss = zero
    elif reduction == "sum":
        loss = torch.stack(valid_losses).sum()
    elif reduction == "mean":
        loss = torch.stack(valid_losses).mean()
    else:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    return loss, per_class_t, valid_t


def reference_recall_at_quantile(
    scores: Tensor,
    targets: Tensor,
    quantile: float,
    *,
    interpolation: str = "higher",
    ignore_index: int = -100,
    reduction: str = "none",
) -> Tensor:
    """Hard recall at the same threshold rule: a positive counts when ``score >= theta``.

    ``scores`` ``[N]`` (binary, returns a 0-d tensor) or ``[N, C]`` (``C == 1`` binary, else
    one-vs-rest) gives ``[C]`` with NaN for a class without positives; ``reduction="mean"``
    averages the classes that have positives.
    """
    one_dim = scores.dim() == 1
    scores2d = scores.reshape(-1, 1) if one_dim else scores
    num_columns = scores2d.shape[1]
    targets = targets.reshape(-1).long()
    keep = targets != ignore_index
    pool = scores2d[keep].detach().to(torch.promote_types(scores.dtype, torch.float32))
    labels = targets[keep]
    recalls = []
    for c in range(num_columns):
        is_pos = labels == _positive_label(num_columns, c)
        if not bool(is_pos.any()):
            recalls.append(float("nan"))
            continue
        theta = torch.quantile(pool[:, c], 1.0 - quantile, interpolation=interpolation)
        hits = (pool[is_pos, c] >= theta).sum().item()
        recalls.append(hits / int(is_pos.sum()))
    result = torch.tensor(recalls, dtype=torch.float64)
    if reduction == "mean":
        return result.nanmean()
    if reduction != "none":
        raise ValueError(f"reduction must be 'none' or 'mean', got {reduction!r}")
    return result[0] if one_dim else result


class ReferenceRecallAtQuantileLoss(QueuedReference):
    """Stateful reference: the functional reference plus the plain circular queue
    (``self.queue``, a :class:`PlainQueue` kept in ``dtype``), written after the loss."""

    def __init__(
        self,
        num_classes: int,
        quantile: float = 0.005,
        queue_size: int = 1024,
        temperature: float = 0.01,
        reduction: str = "mean",
        ignore_index: int = -100,
        update_queue_in_eval: bool = False,
        quantile_interpolation: str = "higher",
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__(num_classes, queue_size, ignore_index, update_queue_in_eval, dtype)
        self.quantile = quantile
        self.temperature = temperature
        self.reduction = reduction
        self.interpolation = quantile_interpolation

    def formula(
        self,
        logits: Tensor,
        targets: Tensor,
        sample_weight: Tensor | None,
        queue_rows: tuple[Tensor, Tensor, Tensor],
    ) -> tuple[Tensor, Tensor, Tensor]:
        queue_scores, queue_targets, queue_weights = queue_rows
        return reference_recall_at_quantile_loss(
            logits,
            targets,
            num_classes=self.num_classes,
            quantile=self.quantile,
            temperature=self.temperature,
            interpolation=self.interpolation,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            sample_weight=sample_weight,
            queue_scores=queue_scores,
            queue_targets=queue_targets,
            queue_weights=queue_weights,
        )
