"""Smooth average precision over the pooled ranking, in bounded memory."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import _device
from ._base import BASE_OPTIONS, TEMPERATURE, QueuedRankingLoss
from ._options import arguments
from ._pair_tiles import pair_sigmoid_row_sums
from ._pool import Pool, Rows
from .functional import positive_columns

# Names the loss in the error a second derivative raises (the pair kernel is once differentiable).
_ONCE = "SmoothAPLoss (its gradient is computed tile by tile, in place)"


class SmoothAPLoss(QueuedRankingLoss):
    r"""``1 - AP`` of each class, with ranks smoothed by a sigmoid (Smooth-AP).

    Brown, Xie, Kalogeiton and Zisserman, "Smooth-AP: Smoothing the Path Towards
    Large-Scale Image Retrieval", ECCV 2020. For class ``c`` and each pooled
    positive ``i`` (live rows of every rank, then the memory queue):

    .. math::
        R(i) = 1 + \sum_{j \ne i} \sigma\Big(\frac{s_{jc} - s_{ic}}{\tau}\Big), \quad
        R^+(i) = 1 + \sum_{j \ne i,\, j \in P_c} \sigma\Big(\frac{s_{jc} - s_{ic}}{\tau}\Big),
        \quad \text{loss}_c = 1 - \frac{\sum_{i \in P_c} w_i R^+(i) / R(i)}{\sum_{i \in P_c} w_i}

    Unlike a loss with a detached threshold, the gradient reaches every live row:
    positives are pushed up and the negatives ranked above them pushed down
    (queued rows carry no gradient). Value and gradient are computed tile by tile
    by a custom autograd function (the package's tiled pair kernel), so memory grows
    with ``P + M``, not ``P * M``: a pool of 1,000,000 rows with 5,000 positives fits
    in well under 1 GB.
    Time is still ``O(P * M)``. The loss is differentiable once: differentiating its
    gradient again (a gradient penalty, ``create_graph=True``) raises. A forward
    makes one host sync (multi-class) or two (binary with queued rows or
    ``max_pool_size``: the count of queued/sampled positives), none in backward.

    A class counts (``mean``/``sum``) when the pool holds a positive of it with
    weight > 0 and at least one row that is not a positive of it. Multi-class is
    one-vs-rest per column; ``num_classes=1`` is binary (positives have target 1).

    Args:
        num_classes: number of columns of ``logits``; 1 for binary.
        queue_size: rows of past (detached) scores ranked against; 0 disables the queue.
        temperature: sigmoid width ``tau`` in logit units; settable between steps
            (annealing) and saved in ``state_dict()``.
        reduction: ``"mean"`` / ``"sum"`` over valid classes, or ``"none"`` for ``[C]``
            with NaN where a class is not valid.
        ignore_index: target of padding rows; they never count nor enter the queue.
        update_queue_in_eval: also write the queue in ``eval()`` mode.
        gather_distributed: pool all ranks' rows (``None``: whenever
            ``torch.distributed`` is initialised with world size > 1).
        max_pool_size: the sums over ``j`` use a uniform sample of this many pooled
            rows, scaled up by ``pool / sample`` (each positive ``i`` still counts).
        seed: seed of that sample's private generator (the global RNG is untouched).
        sharded: keep each rank's rows on its rank (docs/ddp.md, "Sharded mode"); not yet
            available for this loss (``ValueError``).
        process_group: the group whose ranks' rows are pooled (default: the whole world);
            pass the group that DDP averages gradients over. A deep copy shares the
            group; pickling leaves it behind (the unpickled loss uses the default
            group until one is assigned to ``process_group``).

    Shape:
        ``logits`` ``[N, C]`` float, ``targets`` ``[N]`` or ``[N, 1]`` integer or bool,
        ``sample_weight`` ``[N]`` non-negative (weights the mean over positives only).
    """

    options = (*BASE_OPTIONS, TEMPERATURE)

    def __init__(
        self,
        num_classes: int,
        queue_size: int = 1024,
        temperature: float = 0.01,
        reduction: str = "mean",
        ignore_index: int = -100,
        update_queue_in_eval: bool = False,
        gather_distributed: bool | None = None,
        max_pool_size: int | None = None,
        *,
        seed: int = 0,
        sharded: bool = False,
        process_group: Any = None,
    ) -> None:
        super().__init__(**arguments(locals()))

    def per_class_loss(self, pool: Pool) -> tuple[Tensor, Tensor]:
        num_classes = self.num_classes
        live, queued = pool.live, pool.queued
        n_live = live.scores.shape[0]
        sample = pool.threshold_rows  # ascending: live rows first
        sampled = None if sample is None else pool.blocks()[0]  # applied by the pool
        live_count, queued_count, sampled_count = _positive_counts(pool, sampled)
        parts = [
            _positives_of(rows, num_classes, count)
            for rows, count in ((live, live_count), (queued, queued_count))
        ]
        own = torch.cat([parts[0][0], parts[1][0]])
        own_class = torch.cat([parts[0][1], parts[1][1]])
        weight = torch.cat([parts[0][2], parts[1][2]])
        live_row = torch.cat([parts[0][3], torch.full_like(parts[1][3], -1)])
        queued_row = torch.cat([torch.full_like(parts[0][3], -1), parts[1][3]])

        zeros = own.new_zeros(num_classes)
        mass = zeros.index_add(0, own_class, weight)
        # index_add, not bincount: bincount reads the largest class on the host (a sync on CUDA).
        count = own_class.new_zeros(num_classes).index_add_(
            0, own_class, torch.ones_like(own_class)
        )
        valid = (mass > 0) & (count < pool.size)
        if own.shape[0] == 0:
            return zeros, valid

        if sample is None:
            scale = 1.0
            live_cols = live.scores.t().contiguous()
            # A copy: the queue is overwritten after this step's forward, before its backward.
            queued_cols = queued.scores.t().clone(memory_format=torch.contiguous_format)
            self_live, self_queued = live_row, queued_row
            pos_cols, pos_class = own[None, :], own_class
            self_pos = torch.arange(own.shape[0], device=own.device)
        else:
            scale = pool.size / sample.shape[0]
            # One block of the sampled rows (live rows first, with their gradient, then
            # queued ones): splitting the sample by block would need its per-block sizes
            # on the host.
            assert sampled is not None
            live_cols = sampled.scores.t().contiguous()
            queued_cols = live_cols.new_empty(live_cols.shape[0], 0)
            row_of_pos = torch.where(live_row >= 0, live_row, queued_row + n_live)
            self_live = _position_in(sample, row_of_pos, pool.size)
            self_queued = torch.full_like(live_row, -1)
            # The sampled rows that are positives, as indices into ``own``; their count
            # came to the host with the other counts.
            pos_index = torch.full((pool.size,), -1, dtype=torch.long, device=own.device)
            pos_index[row_of_pos] = torch.arange(own.shape[0], device=own.device)
            sampled_pos = pos_index[sample]
            sampled_pos = sampled_pos[_device.true_indices(sampled_pos >= 0, sampled_count)]
            pos_cols, pos_class = own[sampled_pos][None, :], own_class[sampled_pos]
            self_pos = _position_in(
                sampled_pos, torch.arange(own.shape[0], device=own.device), own.shape[0]
            )
        # sigmoid((s_j - s_i) / tau), "row j ranked above positive i": the kernel with -tau. Each
        # sum includes the pair j == i when i is among the keys: sigmoid(0) = 1/2, taken out.
        tau = -self.temperature
        has_self = [(i >= 0).to(own.dtype) for i in (self_live, self_queued, self_pos)]
        above = (
            pair_sigmoid_row_sums(own, own_class, tau, live_cols, what=_ONCE) - 0.5 * has_self[0]
        )
        if queued_cols.shape[1] > 0:
            above = above + (
                pair_sigmoid_row_sums(own, own_class, tau, queued_cols, what=_ONCE)
                - 0.5 * has_self[1]
            )
        # R+ counts only the positives of i's own class (binary: every positive).
        key_class = pos_class if num_classes > 1 else None
        above_pos = pair_sigmoid_row_sums(
            own, own_class, tau, pos_cols, key_class=key_class, what=_ONCE
        )
        rank = 1 + scale * above  # R(i): every pooled row above i, softly
        rank_pos = 1 + scale * (above_pos - 0.5 * has_self[2])  # R+(i): same-class positives
        ratio = rank_pos / rank
        ap = zeros.index_add(0, own_class, weight * ratio) / mass.clamp_min(
            torch.finfo(mass.dtype).tiny
        )
        return 1.0 - ap, valid


def _positive_counts(pool: Pool, sampled: Rows | None) -> tuple[int, int, int]:
    """How many live, queued and sampled rows are positives, as host ints.

    Multi-class: every pooled row is a positive of its class. Binary: the live
    count came with the metadata; the queued and sampled counts are read in one
    device-to-host copy (the forward's second and last host sync): the host
    cannot know which queued rows are positives without reading them.
    """
    n_live, n_queued = pool.live.scores.shape[0], pool.queued.scores.shape[0]
    n_sampled = 0 if sampled is None else sampled.targets.shape[0]
    if pool.num_classes > 1:
        return n_live, n_queued, n_sampled
    counts: list[int | None] = [
        pool.live.num_positives,
        0 if n_queued == 0 else None,
        0 if sampled is None else None,
    ]
    live_pos, queued_pos = (pool.live.targets == 1), (pool.queued.targets == 1)
    unknown = {0: live_pos, 1: queued_pos}
    pending = {k: unknown[k].sum() for k in (0, 1) if counts[k] is None}
    if sampled is not None:
        pending[2] = (sampled.targets == 1).sum()
    if pending:
        values = _device.host_copy(torch.stack(list(pending.values()))).tolist()
        for k, value in zip(pending, values):
            counts[k] = int(value)
    live_count, queued_count, sampled_count = counts
    assert live_count is not None and queued_count is not None and sampled_count is not None
    return live_count, queued_count, sampled_count


def _positives_of(
    rows: Rows, num_classes: int, count: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Each positive's own-class score, class, weight and row index within ``rows``.

    ``count`` is how many rows are positives (known on the host): selecting them
    then needs no device sync.
    """
    column = positive_columns(rows.targets, num_classes)
    if count == column.shape[0]:
        index = torch.arange(count, device=column.device)
    else:
        index = _device.true_indices(column >= 0, count)
    cls = column[index]
    return rows.scores[index, cls], cls, rows.weights[index], index


def _position_in(chosen: Tensor, wanted: Tensor, size: int) -> Tensor:
    """Position of each ``wanted`` index within ``chosen`` (-1 when absent or negative)."""
    position = torch.full((size + 1,), -1, dtype=torch.long, device=chosen.device)
    position[chosen] = torch.arange(chosen.shape[0], device=chosen.device)
    return position[torch.where(wanted >= 0, wanted, size)]
