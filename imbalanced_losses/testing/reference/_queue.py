"""The plain circular queue every reference loss keeps, and the train/eval bookkeeping around it.

Written as a Python loop, slot by slot, not from the library's ``MemoryQueue``: it is what the
library's queue is compared with.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class PlainQueue:
    """Rows ``(scores [C], target, weight)`` written one by one at ``ptr``, modulo ``size``.

    A push of at least ``size`` rows instead replaces the queue with its last ``size`` rows,
    oldest in slot 0, and resets ``ptr`` to 0. Rows are kept in ``dtype``. Each row also keeps
    an ``iid`` flag (drawn i.i.d. from the population; True unless the push says otherwise),
    which the partial-AUC reference's band edges need.
    """

    def __init__(self, size: int, width: int, dtype: torch.dtype = torch.float64) -> None:
        self.size = size
        self.scores = torch.zeros(size, width, dtype=dtype)
        self.targets = torch.zeros(size, dtype=torch.long)
        self.weights = torch.zeros(size, dtype=dtype)
        self.iid = torch.ones(size, dtype=torch.bool)
        self.ptr = 0
        self.count = 0

    def to(self, device: torch.device | str) -> PlainQueue:
        """Keep the rows on ``device`` (the benchmark runs the reference on a GPU)."""
        self.scores = self.scores.to(device)
        self.targets = self.targets.to(device)
        self.weights = self.weights.to(device)
        self.iid = self.iid.to(device)
        return self

    def reset(self) -> None:
        self.ptr = 0
        self.count = 0
        self.scores.zero_()
        self.targets.zero_()
        self.weights.zero_()
        self.iid.fill_(True)

    def rows(self) -> tuple[Tensor, Tensor, Tensor]:
        """The filled slots, in slot order."""
        n = self.count
        return self.scores[:n], self.targets[:n], self.weights[:n]

    def iid_rows(self) -> Tensor:
        """The filled slots' iid flags, in slot order."""
        return self.iid[: self.count]

    def push(
        self, scores: Tensor, targets: Tensor, weights: Tensor, iid: Tensor | None = None
    ) -> None:
        """Replace the queue with the last ``size`` rows, or write rows one at a time."""
        q, m = self.size, scores.shape[0]
        if q == 0 or m == 0:
            return
        if iid is None:
            iid = torch.ones(m, dtype=torch.bool, device=scores.device)
        if m >= q:
            self.scores[:] = scores[m - q :].detach().to(self.scores.dtype)
            self.targets[:] = targets[m - q :].long()
            self.weights[:] = weights[m - q :].detach().to(self.weights.dtype)
            self.iid[:] = iid[m - q :].bool()
            self.ptr, self.count = 0, q
            return
        for i in range(m):
            self.scores[self.ptr] = scores[i].detach().to(self.scores.dtype)
            self.targets[self.ptr] = targets[i].long()
            self.weights[self.ptr] = weights[i].detach().to(self.weights.dtype)
            self.iid[self.ptr] = bool(iid[i])
            self.ptr = (self.ptr + 1) % q
            self.count = min(self.count + 1, q)


class QueuedReference:
    """What a stateful reference loss does around its formula: a ``PlainQueue`` written after
    the loss, only in training mode (or with ``update_queue_in_eval``, or when the call says
    ``update_queue=True``), and only with rows that count: target != ignore_index and every
    logit finite. Each reference loss supplies its formula (:meth:`formula`); calling it is the
    same for all: the formula over the step and the queue's rows, then the write.

    Called in the reference library's order, ``(logits, targets, iid_mask=None,
    return_per_class=False, *, sample_weight=None)``. The ``iid_mask`` always goes to the queue
    with the rows; it reaches the formula only of a reference whose ``uses_iid_mask`` is True
    (the partial-AUC one): the others accept it and give the same values, as the losses do."""

    uses_iid_mask = False

    def __init__(
        self,
        num_classes: int,
        queue_size: int,
        ignore_index: int,
        update_queue_in_eval: bool,
        dtype: torch.dtype,
    ) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.update_queue_in_eval = update_queue_in_eval
        self.training = True
        self.queue = PlainQueue(queue_size, max(num_classes, 1), dtype)

    def train(self, mode: bool = True) -> QueuedReference:
        self.training = mode
        return self

    def eval(self) -> QueuedReference:
        return self.train(False)

    def reset_queue(self) -> None:
        self.queue.reset()

    def formula(self, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor, Tensor]:
        """``(loss, per_class, valid)`` of the step (subclasses), called with ``logits,
        targets, sample_weight, queue_rows`` (the queue's ``(scores, targets, weights)``) and
        the call's ``step_options``."""
        raise NotImplementedError

    def __call__(
        self,
        logits: Tensor,
        targets: Tensor,
        iid_mask: Tensor | None = None,
        return_per_class: bool = False,
        *,
        sample_weight: Tensor | None = None,
        update_queue: bool | None = None,
        **step_options: Any,
    ) -> Tensor | tuple[Tensor, Tensor, Tensor]:
        """The loss (with ``per_class`` and ``valid`` if asked), then the queue write.

        ``step_options`` go to the formula (e.g. SmoothAP's ``sample``); ``iid_mask`` goes to
        the queue with the rows, and to the formula if it uses one.
        """
        if iid_mask is not None and self.uses_iid_mask:
            step_options = {**step_options, "iid_mask": iid_mask}
        loss, per_class, valid = self.formula(
            logits, targets, sample_weight, self.queue.rows(), **step_options
        )
        self.write(logits, targets, sample_weight, update_queue, iid_mask)
        return (loss, per_class, valid) if return_per_class else loss

    def write(
        self,
        logits: Tensor,
        targets: Tensor,
        sample_weight: Tensor | None,
        update_queue: bool | None = None,
        iid: Tensor | None = None,
    ) -> None:
        """The step's rows that count enter the queue (with their ``iid`` flags), if this call
        writes."""
        writes = self.training or self.update_queue_in_eval
        if update_queue is not None:
            writes = update_queue
        if not writes:
            return
        flat = targets.reshape(-1).long()
        weights = (
            torch.ones(logits.shape[0], dtype=self.queue.weights.dtype, device=logits.device)
            if sample_weight is None
            else sample_weight
        )
        counts = (flat != self.ignore_index) & torch.isfinite(logits).all(dim=1)
        self.queue.push(
            logits.detach()[counts],
            flat[counts],
            weights[counts],
            None if iid is None else iid.reshape(-1).bool()[counts],
        )
