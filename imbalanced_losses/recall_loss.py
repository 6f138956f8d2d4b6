"""Differentiable recall above a score quantile (the alert budget)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._base import BASE_OPTIONS, POSITIVES, TEMPERATURE, QueuedRankingLoss
from ._device import HostCopy
from ._distributed import all_reduce_replicated
from ._options import arguments, choice, real
from ._pool import Pool
from ._sharded_select import sharded_quantile_threshold
from .functional import (
    INTERPOLATIONS,
    positive_columns,
    quantile_threshold,
    recall_from_sums,
    soft_recall_loss,
    soft_recall_sums,
)

# The positive-fraction check waits until the pool expects this many rows above the
# threshold: fewer, and a fraction near the quantile is sampling noise.
_MIN_ROWS_TO_JUDGE_FRACTION = 20


class RecallAtQuantileLoss(QueuedRankingLoss):
    r"""``1 - soft recall`` of each class's positives above its alert threshold.

    For class ``c`` the threshold is the ``(1 - quantile)`` quantile of the
    pooled scores of column ``c`` (live rows of every rank, then the memory
    queue), with ``torch.quantile``'s ``quantile_interpolation`` and no
    gradient; then

    .. math:: \text{loss}_c = 1 - \frac{\sum_{i \in P_c} w_i\,
              \sigma((s_{ic} - \theta_c)/\tau)}{\sum_{i \in P_c} w_i}

    Multi-class is one-vs-rest per column; ``num_classes=1`` is binary (column
    0, positives have target 1). ``quantile`` must exceed the positive
    fraction, otherwise even a perfect model leaves positives below the
    threshold (at 1% positives, use ``quantile > 0.01``).

    Args:
        num_classes: number of columns of ``logits``; 1 for binary.
        quantile: alert budget, the top fraction of scores, in (0, 1).
        queue_size: rows of past (detached) scores kept to stabilise the
            threshold; 0 disables the queue.
        temperature: sigmoid width ``tau``; settable between steps (annealing)
            and saved in ``state_dict()``.
        reduction: ``"mean"`` / ``"sum"`` over classes with a positive, or
            ``"none"`` for ``[C]`` with NaN where a class has no positive.
        ignore_index: target of padding rows; they never count nor enter the queue.
        update_queue_in_eval: also write the queue in ``eval()`` mode.
        gather_distributed: pool all ranks' rows (``None``: whenever
            ``torch.distributed`` is initialised with world size > 1, decided
            at each forward).
        quantile_interpolation: as in ``torch.quantile``; with ``"higher"`` the
            threshold is a pooled score and at most ``quantile * (n - 1)`` of
            the ``n`` pooled rows score strictly above it.
        max_pool_size: estimate the threshold from a uniform sample of this
            many pooled rows, without replacement, drawn in O(max_pool_size) and
            redrawn at each training step (recall still uses every positive).
        seed: seed of that sample's private generator (the global RNG is untouched).
        sharded: each rank keeps a queue shard of ``queue_size // world_size`` of its own
            rows and the ranks exchange per-class statistics, never rows: the traffic and
            the memory per rank do not grow with the world (docs/ddp.md, "Sharded mode").
            Not with ``max_pool_size``.
        process_group: the ranks to pool rows from (default: all). Pass the
            group DDP averages gradients over, e.g. the data-parallel group of
            a 2-D mesh: rank order and the gradient factor come from it. A deep
            copy shares the group; pickling leaves it behind (the unpickled loss
            uses the default group until one is assigned to ``process_group``).
        positives: ``"pool"`` (mean over every pooled positive, queued ones
            included) or ``"live"`` (this step's positives of all ranks; the
            queue only sets the threshold, and a class needs a live positive).

    The forward runs eagerly, also inside a program compiled with
    ``torch.compile`` (a graph break there): compile the model, not the loss.

    Shape:
        ``logits`` ``[N, C]`` float, ``targets`` ``[N]`` or ``[N, 1]`` integer or bool,
        ``sample_weight`` ``[N]`` non-negative (moves recall, never the threshold).
    """

    # Its gradient flows only through each positive's own-class score: under DDP the
    # gathered rows travel detached and no dense [global rows, C] gradient is built.
    own_class_gradient_only = True
    supports_sharded = True
    options = (
        *BASE_OPTIONS,
        real("quantile", lambda q: 0.0 < q < 1.0, "a float in (0, 1)"),
        TEMPERATURE,
        choice("quantile_interpolation", INTERPOLATIONS),
        POSITIVES,
    )
    quantile: float
    quantile_interpolation: str

    def __init__(
        self,
        num_classes: int,
        quantile: float = 0.005,
        queue_size: int = 1024,
        temperature: float = 0.01,
        reduction: str = "mean",
        ignore_index: int = -100,
        update_queue_in_eval: bool = False,
        gather_distributed: bool | None = None,
        quantile_interpolation: str = "higher",
        max_pool_size: int | None = None,
        *,
        seed: int = 0,
        sharded: bool = False,
        process_group: Any = None,
        positives: str = "pool",
    ) -> None:
        super().__init__(**arguments(locals()))
        self._pending_fraction: HostCopy | None = None

    def per_class_loss(self, pool: Pool) -> tuple[Tensor, Tensor]:
        if pool.sharded:
            return self._sharded_per_class_loss(pool)
        blocks = pool.threshold_blocks()
        self._warn_if_pool_too_small(sum(block.shape[0] for block in blocks))
        self._warn_if_positives_exceed_quantile(pool.size, lambda: _largest_positive_fraction(pool))
        theta = quantile_threshold(blocks, self.quantile, self.quantile_interpolation)
        return soft_recall_loss(*pool.positives(), theta, self.temperature)

    def _sharded_per_class_loss(self, pool: Pool) -> tuple[Tensor, Tensor]:
        """The same loss from this rank's rows: an exact distributed threshold, then one
        ``all_reduce`` of ``[3, C]`` sums (recall numerator, positive weight, positive count).

        Every rank gets the same threshold and the same sums, so the same loss; the sums'
        replicated gradient rule makes DDP's average the single-process gradient. The
        positive count (no gradient) rides along for the positive-fraction warning, which so
        judges the global pool with no collective of its own.
        """
        size = pool.global_size
        assert size is not None and size > 0
        self._warn_if_pool_too_small(size, queue_full=pool.shards_full is True)
        theta = sharded_quantile_threshold(
            pool.threshold_blocks(),
            self.quantile,
            self.quantile_interpolation,
            group=pool.group,
            total=size,  # agreed in the metadata exchange: no check collective, no host read
        )
        weighted, mass = soft_recall_sums(*pool.positives(), theta, self.temperature)
        counts = _positive_counts(pool).to(weighted.dtype)
        weighted, mass, counts = all_reduce_replicated(
            torch.stack([weighted, mass, counts]), pool.group
        )
        self._warn_if_positives_exceed_quantile(size, lambda: _largest_of(counts.detach(), size))
        return 1.0 - recall_from_sums(weighted, mass), mass > 0

    def reset_queue(self) -> None:
        """Empty the memory queue; re-arms the warnings (a pending check is dropped)."""
        super().reset_queue()
        self._pending_fraction = None

    def _warn_if_pool_too_small(self, sample_size: int, *, queue_full: bool | None = None) -> None:
        """``pool * quantile < 1`` puts the threshold at the pool's top score.

        Judged only once the queue is full (or disabled): a filling queue is
        small by nature and says nothing about the settings. Sharded: ``sample_size`` is
        the global pool and ``queue_full`` says every rank's shard is full (agreed counts),
        so every rank warns alike (a warning turned into an error then stops every rank).
        """
        if queue_full is None:
            queue_full = self.queue.count == self.queue.capacity
        if queue_full and sample_size * self.quantile < 1:
            queue_state = " with the queue full" if self.queue.capacity else ""
            self._warn_once(
                "small pool",
                f"the pool holds {sample_size} rows{queue_state}, "
                f"too few for quantile={self.quantile} (pool * quantile < 1), so the threshold "
                "sits at the top of the pool; use a larger queue_size or batch.",
            )

    def _warn_if_positives_exceed_quantile(
        self, pool_size: int, largest: Callable[[], Tensor]
    ) -> None:
        """Warn when a class's positives make up at least ``quantile`` of the pooled rows.

        The threshold admits only that share of rows, so even a perfect model
        leaves some positives below it. The fraction is computed on the device;
        on CUDA its value is read at a later step, once it has reached the host,
        so the check never makes the host wait. ``largest()``: ``[fraction, class]`` on the
        device, of the pool of ``pool_size`` rows (every rank's, also in sharded mode).
        """
        if "positive fraction" in self._warned:
            return
        if self._pending_fraction is None:
            if pool_size * self.quantile < _MIN_ROWS_TO_JUDGE_FRACTION:
                return
            self._pending_fraction = HostCopy(largest())
        reading = self._pending_fraction.get()
        if reading is None:  # not on the host yet
            return
        self._pending_fraction = None
        fraction, column = reading
        if fraction < self.quantile:
            return
        who = "positives" if self.num_classes == 1 else f"class {int(column)}'s positives"
        self._warn_once(
            "positive fraction",
            f"{who} make up {fraction:.2%} of the {pool_size} pooled rows, at or above "
            f"quantile={self.quantile}: the threshold admits only that share of the rows, so "
            "even a perfect model leaves some positives below it and the loss keeps pushing "
            "positives against each other; use a quantile above every class's positive "
            f"fraction (e.g. quantile={min(0.5, 2 * fraction):.3g}).",
        )


def _largest_positive_fraction(pool: Pool) -> Tensor:
    """``[fraction, class]`` (float64, on the device) of the class with most pooled positives."""
    return _largest_of(_positive_counts(pool), pool.size)


def _positive_counts(pool: Pool) -> Tensor:
    """``[C]`` float64 (on the device): how many of the pool's rows are positives of each class."""
    counts = torch.zeros(pool.num_classes, dtype=torch.float64, device=pool.live.scores.device)
    for rows in (pool.live, pool.queued):
        if pool.num_classes == 1:  # no row-sized temporary for the common binary case
            counts += (rows.targets == 1).sum()
            continue
        # In row chunks: a 20M-row batch must not get int64/float64 temporaries.
        for targets in rows.targets.split(1 << 20):
            column = positive_columns(targets, pool.num_classes)
            counts.index_add_(0, column.clamp(min=0), (column >= 0).to(torch.float64))
    return counts


def _largest_of(counts: Tensor, pool_size: int) -> Tensor:
    """``[fraction, class]`` of the largest of the per-class positive ``counts``."""
    # max over a dim keeps both on the device; counts[counts.argmax()] would read the index
    # on the host (a sync on CUDA).
    largest, worst = counts.max(dim=0)
    return torch.stack([largest.to(torch.float64) / pool_size, worst.to(torch.float64)])
