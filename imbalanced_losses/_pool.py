"""The rows a loss ranks in one step: the API a loss author writes ``per_class_loss`` against.

A :class:`Pool` is this step's live rows (every rank's, in rank order, with gradient) and the
memory queue's rows (detached), kept as two :class:`Rows` blocks so a step never copies the
whole queue. It selects for the loss, without a host sync:

* :meth:`Pool.positives`: each positive's own-class score, class and weight (threshold and
  pairwise losses alike);
* :meth:`Pool.negatives`: which rows are negatives of which class, as a mask;
* :meth:`Pool.blocks`: the rows that sums over the pool run over: both blocks, or, when
  ``max_pool_size`` capped the pool, the sample as one block (its sums are scaled up by
  :attr:`Pool.scale`); :meth:`Pool.threshold_blocks` is the same, detached, for quantiles.

Every row carries ``iid``: whether it was drawn i.i.d. from the population (``iid_mask`` of
the forward; rows the caller densified are not), so a loss can estimate population
quantiles from iid rows only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._device import true_indices
from .functional import positive_columns, positive_scores


@dataclass
class Rows:
    """A block of rows: ``scores [n, C]``, ``targets [n]``, ``weights [n]``, ``iid [n]`` bool.

    ``iid`` is ``None`` only while a block is built: it then means every row is iid.
    ``own [n]``, when set, is each row's score in its own class column and is the only
    tensor carrying gradient (``scores`` travelled detached): the cheap gradient path of a
    loss that sets ``own_class_gradient_only``. ``num_positives``, when the host knows it,
    is how many rows are a positive of some class: binary positives are then selected
    without a sync.
    """

    scores: Tensor
    targets: Tensor
    weights: Tensor
    iid: Tensor | None = None
    own: Tensor | None = None
    num_positives: int | None = None

    def __post_init__(self) -> None:
        if self.iid is None:  # every row iid: a view, never a row-sized allocation
            ones = torch.ones((), dtype=torch.bool, device=self.targets.device)
            self.iid = ones.expand(self.targets.shape[0])

    def take(self, index: Tensor) -> Rows:
        """The rows at ``index`` (gradient kept)."""
        own = None if self.own is None else self.own[index]
        assert self.iid is not None
        return Rows(
            self.scores[index], self.targets[index], self.weights[index], self.iid[index], own
        )


@dataclass
class Pool:
    """The live rows (with gradient) and the queued rows a loss ranks this step.

    ``threshold_rows`` indexes (live first, then queue), in ascending order, the
    ``max_pool_size`` sample when the pool was capped (``None``: all rows); per-row terms
    such as recall still count every positive. ``positives_from`` is ``"pool"`` (every
    pooled positive) or ``"live"`` (this step's positives only; the queue then only sets
    thresholds).

    Sharded mode (``sharded=True`` on the loss): ``live`` and ``queued`` are this rank's
    rows only (its live rows and its queue shard); the pool is the union over the ranks of
    ``group``, ``global_size`` rows in all (``shards_full``: every shard is full). A loss
    then reduces per-class statistics over ``group`` (``_distributed.all_reduce_replicated``,
    the replicated gradient rule) instead of reading rows it does not hold.
    """

    live: Rows
    queued: Rows
    num_classes: int
    threshold_rows: Tensor | None = None
    positives_from: str = "pool"
    sharded: bool = False
    group: Any = None
    global_size: int | None = None
    shards_full: bool | None = None  # sharded: every rank's shard is full (agreed counts)

    @property
    def size(self) -> int:
        """Number of pooled rows (live plus queued)."""
        return self.live.scores.shape[0] + self.queued.scores.shape[0]

    @property
    def scale(self) -> float:
        """``pool / sample``: what a sum over :meth:`blocks` is scaled by to stand for the pool."""
        rows = self.threshold_rows
        return 1.0 if rows is None else self.size / rows.shape[0]

    def blocks(self) -> list[Rows]:
        """The rows sums over the pool run over: ``[live, queued]``, or the sample as one block.

        The sampled block is gathered from both blocks in sample order (live rows first;
        live scores keep their gradient), without concatenating the pool or a host sync.
        """
        rows = self.threshold_rows
        if rows is None:
            return [self.live, self.queued]
        n_live = self.live.scores.shape[0]
        if n_live == 0 or self.queued.scores.shape[0] == 0:
            return [(self.queued if n_live == 0 else self.live).take(rows)]
        from_live = self.live.take(rows.clamp(max=n_live - 1))
        from_queue = self.queued.take((rows - n_live).clamp(min=0))
        is_live = rows < n_live

        def pick(a: Tensor, b: Tensor) -> Tensor:
            return torch.where(is_live.view(-1, *([1] * (a.dim() - 1))), a, b)

        assert from_live.iid is not None and from_queue.iid is not None
        return [
            Rows(
                pick(from_live.scores, from_queue.scores),
                pick(from_live.targets, from_queue.targets),
                pick(from_live.weights, from_queue.weights),
                pick(from_live.iid, from_queue.iid),
            )
        ]

    def threshold_blocks(self) -> list[Tensor]:
        """Detached score blocks to estimate thresholds from (the sample when capped)."""
        return [block.scores.detach() for block in self.blocks()]

    def negatives(self, rows: Rows) -> Tensor:
        """``[n, C]`` bool: row ``i`` is a negative of class ``c`` (binary: target 0).

        One-vs-rest: a row is a negative of every class but its own. A mask, not a
        selection, so no count has to reach the host; AND it with ``rows.iid`` for the
        iid negatives.
        """
        column = positive_columns(rows.targets, self.num_classes)
        if self.num_classes == 1:
            return (column < 0)[:, None]
        classes = torch.arange(self.num_classes, device=column.device)
        return column[:, None] != classes[None, :]

    def positives(self) -> tuple[Tensor, Tensor, Tensor]:
        """Own-class score, class and weight of the rows that count as positives.

        ``(own_score [K], class [K], weight [K])``; live scores carry gradient.
        Multi-class: every row is a positive of its class. Binary: the live
        positives are selected (their count came with the metadata, so without
        a host sync); queued rows with target 0 come with weight 0 instead
        (selecting them would cost a sync, and the queue is small).
        """
        blocks = [self._binary_positives_only(self.live)]
        if self.positives_from == "pool" and self.queued.targets.shape[0] > 0:
            blocks.append(self.queued)  # an empty queue joins no copy of the live positives
        parts = [
            positive_scores(rows.scores, rows.targets, rows.weights, self.num_classes, rows.own)
            for rows in blocks
        ]
        if len(parts) == 1:
            return parts[0]
        return tuple(torch.cat(p) for p in zip(*parts))  # type: ignore[return-value]

    def _binary_positives_only(self, rows: Rows) -> Rows:
        """The positive rows of a binary block whose positive count is known, else ``rows``.

        Keeps every per-positive temporary (and its gradient) positive-sized
        rather than row-sized: binary positives are often 1% of the rows.
        """
        count = rows.num_positives
        if self.num_classes != 1 or count is None or count == rows.targets.shape[0]:
            return rows
        return rows.take(true_indices(rows.targets == 1, count))
