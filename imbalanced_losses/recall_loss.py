"""Differentiable recall above a score quantile (the alert budget)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._base import BASE_OPTIONS, POSITIVES, TEMPERATURE, QueuedRankingLoss
from ._device import HostCopy
from ._options import arguments, choice, real
from ._pool import Pool
from .functional import INTERPOLATIONS, positive_columns, quantile_threshold, soft_recall_loss

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
        process_group: Any = None,
        positives: str = "pool",
    ) -> None:
        super().__init__(**arguments(locals()))
        self._pending_fraction: HostCopy | None = None

    def per_class_loss(self, pool: Pool) -> tuple[Tensor, Tensor]:
        blocks = pool.threshold_blocks()
        self._warn_if_pool_too_small(sum(block.shape[0] for block in blocks))
        self._warn_if_positives_exceed_quantile(pool)
        theta = quantile_threshold(blocks, self.quantile, self.quantile_interpolation)
        return soft_recall_loss(*pool.positives(), theta, self.temperature)

    def reset_queue(self) -> None:
        """Empty the memory queue; re-arms the warnings (a pending check is dropped)."""
        super().reset_queue()
        self._pending_fraction = None

    def _warn_if_pool_too_small(self, sample_size: int) -> None:
        """``pool * quantile < 1`` puts the threshold at the pool's top score.

        Judged only once the queue is full (or disabled): a filling queue is
        small by nature and says nothing about the settings.
        """
        if self.queue.count == self.queue.capacity and sample_size * self.quantile < 1:
            queue_state = " with the queue full" if self.queue.capacity else ""
            self._warn_once(
                "small pool",
                f"the pool holds {sample_size} rows{queue_state}, "
                f"too few for quantile={self.quantile} (pool * quantile < 1), so the threshold "
                "sits at the top of the pool; use a larger queue_size or batch.",
            )

    def _warn_if_positives_exceed_quantile(self, pool: Pool) -> None:
        """Warn when a class's positives make up at least ``quantile`` of the pooled rows.

        The threshold admits only that share of rows, so even a perfect model
        leaves some positives below it. The fraction is computed on the device;
        on CUDA its value is read at a later step, once it has reached the host,
        so the check never makes the host wait.
        """
        if "positive fraction" in self._warned:
            return
        if self._pending_fraction is None:
            if pool.size * self.quantile < _MIN_ROWS_TO_JUDGE_FRACTION:
                return
            self._pending_fraction = HostCopy(_largest_positive_fraction(pool))
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
            f"{who} make up {fraction:.2%} of the {pool.size} pooled rows, at or above "
            f"quantile={self.quantile}: the threshold admits only that share of the rows, so "
            "even a perfect model leaves some positives below it and the loss keeps pushing "
            "positives against each other; use a quantile above every class's positive "
            f"fraction (e.g. quantile={min(0.5, 2 * fraction):.3g}).",
        )


def _largest_positive_fraction(pool: Pool) -> Tensor:
    """``[fraction, class]`` (float64, on the device) of the class with most pooled positives."""
    counts = torch.zeros(pool.num_classes, dtype=torch.float64, device=pool.live.scores.device)
    for rows in (pool.live, pool.queued):
        if pool.num_classes == 1:  # no row-sized temporary for the common binary case
            counts += (rows.targets == 1).sum()
            continue
        # In row chunks: a 20M-row batch must not get int64/float64 temporaries.
        for targets in rows.targets.split(1 << 20):
            column = positive_columns(targets, pool.num_classes)
            counts.index_add_(0, column.clamp(min=0), (column >= 0).to(torch.float64))
    # max over a dim keeps both on the device; counts[counts.argmax()] would read the index
    # on the host (a sync on CUDA).
    largest, worst = counts.max(dim=0)
    return torch.stack([largest / pool.size, worst.to(torch.float64)])
