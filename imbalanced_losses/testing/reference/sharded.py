"""The pool of a ``sharded=True`` loss, kept plainly: one FIFO queue per rank.

In sharded mode rank ``r`` keeps a queue shard of ``queue_size // W`` of its own rows, and a step
pools every rank's live rows with every shard. With equal per-rank batches and ``queue_size`` a
multiple of the global batch that is the gathered mode's pool; otherwise it is another pool, and
this is its oracle: a plain reference loss (its formula, its row filter) whose queue is ``W``
:class:`PlainQueue` shards, each fed by its rank's slice of each step. The DDP harness tells it
each step's per-rank row counts (``set_rank_sizes``, called before the step).

A new world size (a checkpoint resumed by another number of ranks, where every rank loads the
same rank's file) starts every shard empty, as the loss does: a shard saved by rank ``r`` of
``W`` is only kept by rank ``r`` of ``W``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from imbalanced_losses.testing.reference._queue import PlainQueue, QueuedReference

__all__ = ["ShardedReference"]


class ShardedReference:
    """``reference``'s formula over its live rows plus ``W`` per-rank queue shards.

    ``reference``: a :class:`QueuedReference` with the loss's settings (its own queue is not
    used, only its formula and row filter); ``queue_size``: the loss's, each shard holding
    ``queue_size // W`` rows. The shards' rows join the pool in rank order (a pool is a set:
    the order changes no loss).
    """

    def __init__(self, reference: QueuedReference, queue_size: int) -> None:
        self.reference = reference
        self.queue_size = queue_size
        self.shards: list[PlainQueue] = []
        self.sizes: tuple[int, ...] | None = None

    # The harness and the tests drive it like the other references.
    @property
    def num_classes(self) -> int:
        return self.reference.num_classes

    @property
    def ignore_index(self) -> int:
        return self.reference.ignore_index

    @property
    def training(self) -> bool:
        return self.reference.training

    def train(self, mode: bool = True) -> ShardedReference:
        self.reference.train(mode)
        return self

    def eval(self) -> ShardedReference:
        return self.train(False)

    def set_rank_sizes(self, sizes: tuple[int, ...]) -> None:
        """The next step's rows per rank, in rank order (padding rows included)."""
        if len(sizes) != len(self.shards):  # a new world: every shard starts empty
            width = self.reference.queue.scores.shape[1]
            dtype = self.reference.queue.scores.dtype
            self.shards = [PlainQueue(self.queue_size // len(sizes), width, dtype) for _ in sizes]
        self.sizes = tuple(sizes)

    def __call__(
        self,
        logits: Tensor,
        targets: Tensor,
        *,
        return_per_class: bool = False,
        sample_weight: Tensor | None = None,
        update_queue: bool | None = None,
        **step_options: Any,
    ) -> Tensor | tuple[Tensor, Tensor, Tensor]:
        if self.sizes is None or sum(self.sizes) != logits.shape[0]:
            raise ValueError(
                f"ShardedReference: call set_rank_sizes(sizes) first with sizes summing to the "
                f"step's {logits.shape[0]} rows, got sizes {self.sizes}"
            )
        filled = [shard.rows() for shard in self.shards]
        queue_rows = tuple(torch.cat(part) for part in zip(*filled))
        loss, per_class, valid = self.reference.formula(
            logits, targets, sample_weight, queue_rows, **step_options
        )
        start = 0
        iid = step_options.get("iid_mask")
        for shard, n in zip(self.shards, self.sizes):
            rows = slice(start, start + n)
            start += n
            # The reference's own write (mode, update_queue, row filter) into this rank's shard.
            own_queue, self.reference.queue = self.reference.queue, shard
            try:
                self.reference.write(
                    logits[rows],
                    targets.reshape(-1)[rows],
                    None if sample_weight is None else sample_weight[rows],
                    update_queue,
                    None if iid is None else iid.reshape(-1)[rows],
                )
            finally:
                self.reference.queue = own_queue
        return (loss, per_class, valid) if return_per_class else loss
