"""The plain circular queue every reference loss keeps, and the train/eval bookkeeping around it.

Written as a Python loop, slot by slot, not from the library's ``MemoryQueue``: it is what the
library's queue is compared with.
"""

from __future__ import annotations

import torch
from torch import Tensor


class PlainQueue:
    """Rows ``(scores [C], target, weight)`` written one by one at ``ptr``, modulo ``size``.

    A push of at least ``size`` rows instead replaces the queue with its last ``size`` rows,
    oldest in slot 0, and resets ``ptr`` to 0. Rows are kept in ``dtype``.
    """

    def __init__(self, size: int, width: int, dtype: torch.dtype = torch.float64) -> None:
        self.size = size
        self.scores = torch.zeros(size, width, dtype=dtype)
        self.targets = torch.zeros(size, dtype=torch.long)
        self.weights = torch.zeros(size, dtype=dtype)
        self.ptr = 0
        self.count = 0

    def to(self, device: torch.device | str) -> PlainQueue:
        """Keep the rows on ``device`` (the benchmark runs the reference on a GPU)."""
        self.scores = self.scores.to(device)
        self.targets = self.targets.to(device)
        self.weights = self.weights.to(device)
        return self

    def reset(self) -> None:
        self.ptr = 0
        self.count = 0
        self.scores.zero_()
        self.targets.zero_()
        self.weights.zero_()

    def rows(self) -> tuple[Tensor, Tensor, Tensor]:
        """The filled slots, in slot order."""
        n = self.count
        return self.scores[:n], self.targets[:n], self.weights[:n]

    def push(self, scores: Tensor, targets: Tensor, weights: Tensor) -> None:
        """Replace the queue with the last ``size`` rows, or write rows one at a time."""
        q, m = self.size, scores.shape[0]
        if q == 0 or m == 0:
            return
        if m >= q:
            self.scores[:] = scores[m - q :].detach().to(self.scores.dtype)
            self.targets[:] = targets[m - q :].long()
            self.weights[:] = weights[m - q :].detach().to(self.weights.dtype)
            self.ptr, self.count = 0, q
            return
        for i in range(m):
            self.scores[self.ptr] = scores[i].detach().to(self.scores.dtype)
            self.targets[self.ptr] = targets[i].long()
            self.weights[self.ptr] = weights[i].detach().to(self.weights.dtype)
            self.ptr = (self.ptr + 1) % q
            self.count = min(self.count + 1, q)


class QueuedReference:
    """What a stateful reference loss does around its formula: a ``PlainQueue`` written after
    the loss, only in training mode (or with ``update_queue_in_eval``, or when the call says
    ``update_queue=True``), and only with rows that count: target != ignore_index and every
    logit finite. Not a loss itself; each reference loss composes its own formula with it."""

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

    def write(
        self,
        logits: Tensor,
        targets: Tensor,
        sample_weight: Tensor | None,
        update_queue: bool | None = None,
    ) -> None:
        """The step's rows that count enter the queue, if this call writes."""
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
        self.queue.push(logits.detach()[counts], flat[counts], weights[counts])
