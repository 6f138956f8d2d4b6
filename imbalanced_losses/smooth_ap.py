"""Smooth average precision over the pooled ranking, in bounded memory."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import _device
from ._autograd import once_differentiable
from ._base import BASE_OPTIONS, TEMPERATURE, QueuedRankingLoss
from ._options import arguments
from ._pool import Pool, Rows
from .functional import positive_columns

# Pairs are computed in tiles of at most this many elements (x64 on CUDA) in one buffer
# that a forward or backward allocates once and reuses: small enough to stay in the CPU's
# cache, and never a per-tile allocation (glibc keeps freed mid-sized blocks on its heap,
# so allocate-and-free loops make the resident memory climb).
_TILE_ELEMENTS = 1 << 18
_TILE_COLUMNS = 1 << 14


class _Block:
    """Columns the positives are ranked against: ``cols [C_b, m]``, already divided by tau.

    ``has_self [P]`` says whether positive ``i`` is itself one of the columns (its
    pair ``j == i`` contributes ``sigmoid(0)`` and is taken out again). With
    ``j_class [m]`` only columns that are positives of the row's class count;
    ``cols`` then has one row: each column's own-class score.
    """

    def __init__(self, cols: Tensor, has_self: Tensor, j_class: Tensor | None = None) -> None:
        self.cols, self.has_self, self.j_class = cols, has_self, j_class


def _tiles(num_pos: int, width: int, device: torch.device) -> list[tuple[slice, slice]]:
    scale = 64 if device.type == "cuda" else 1
    cols = max(1, min(width, _TILE_ELEMENTS * scale, _TILE_COLUMNS * scale))
    rows = max(1, _TILE_ELEMENTS * scale // cols)
    return [
        (slice(a, min(a + rows, num_pos)), slice(b, min(b + cols, width)))
        for a in range(0, num_pos, rows)
        for b in range(0, width, cols)
    ]


def _pair_sigmoids(
    block: _Block, own: Tensor, own_class: Tensor, tile: tuple[slice, slice], buffer: Tensor
) -> Tensor:
    """``sigmoid(s_j / tau - s_i / tau)`` for one tile of (positives, columns), in ``buffer``."""
    rows, columns = tile
    own_k, cls_k = own[rows], own_class[rows]
    cols = block.cols[:, columns]
    pairs = buffer[: own_k.shape[0] * cols.shape[1]].view(own_k.shape[0], cols.shape[1])
    if cols.shape[0] == 1:
        torch.sub(cols, own_k[:, None], out=pairs)
    else:
        torch.index_select(cols, 0, cls_k, out=pairs)
        pairs.sub_(own_k[:, None])
    pairs.sigmoid_()
    if block.j_class is not None:
        pairs.mul_(block.j_class[None, columns] == cls_k[:, None])
    return pairs


class _SmoothAPRatios(torch.autograd.Function):
    """``R+(i) / R(i)`` of every positive without materialising the ``[P, M]`` pair matrix.

    Tiles of (positives x columns) of each block are computed in one reused buffer;
    the backward recomputes the sigmoids tile by tile instead of saving them, so
    memory is ``O(P + M)`` plus the buffer. The pair ``j == i`` is included in the
    tiles and its exact contribution removed afterwards (``sigmoid(0) = 1/2`` in the
    sums; in the gradient its two halves land on the same score and cancel).
    """

    @staticmethod
    def forward(
        ctx: Any,
        own: Tensor,
        live_cols: Tensor,
        queued_cols: Tensor,
        pos_cols: Tensor,
        own_class: Tensor,
        pos_class: Tensor,
        self_in_live: Tensor,
        self_in_queued: Tensor,
        self_in_pos: Tensor,
        scale: float,
        tau: float,
    ) -> Tensor:
        inputs = (own, live_cols, queued_cols, pos_cols, own_class, pos_class,
                  self_in_live, self_in_queued, self_in_pos)  # fmt: skip
        ctx.save_for_backward(*inputs)
        ctx.scale, ctx.tau = scale, tau
        own_t, blocks = _blocks(inputs, tau)
        buffer = own.new_empty(_TILE_ELEMENTS * (64 if own.is_cuda else 1))
        sums = []
        for block in blocks:
            total = torch.zeros_like(own)
            for tile in _tiles(own.shape[0], block.cols.shape[1], own.device):
                total[tile[0]] += _pair_sigmoids(block, own_t, own_class, tile, buffer).sum(1)
            sums.append(total - 0.5 * block.has_self)
        rank = 1 + scale * (sums[0] + sums[1])  # R(i): every pooled row above i, softly
        rank_pos = 1 + scale * sums[2]  # R+(i): the positives of i's class above it
        ctx.ranks = rank, rank_pos
        return rank_pos / rank

    @staticmethod
    @once_differentiable("SmoothAPLoss (its gradient is computed tile by tile, in place)")
    def backward(ctx: Any, grad_ratio: Tensor) -> tuple[Tensor | None, ...]:
        own, live_cols, queued_cols, pos_cols, own_class = ctx.saved_tensors[:5]
        rank, rank_pos = ctx.ranks
        own_t, blocks = _blocks(ctx.saved_tensors, ctx.tau)
        # d ratio / d sigmoid_ij, over tau: every pooled j moves R, same-class positives R+.
        coef_all = -grad_ratio * ctx.scale * rank_pos / rank.square() / ctx.tau
        coef_pos = grad_ratio * ctx.scale / rank / ctx.tau
        needs = ctx.needs_input_grad
        grads: list[Tensor | None] = [
            torch.zeros_like(c) if needs[k + 1] else None
            for k, c in enumerate((live_cols, queued_cols, pos_cols))
        ]
        grad_own = torch.zeros_like(own)
        buffer = own.new_empty(_TILE_ELEMENTS * (64 if own.is_cuda else 1))
        for block, coef, grad_cols in zip(blocks, (coef_all, coef_all, coef_pos), grads):
            for tile in _tiles(own.shape[0], block.cols.shape[1], own.device):
                rows, columns = tile
                pairs = _pair_sigmoids(block, own_t, own_class, tile, buffer)
                pairs.addcmul_(pairs, pairs, value=-1)  # sigmoid' = s (1 - s)
                grad_own[rows] -= coef[rows] * pairs.sum(1)
                if grad_cols is None:
                    continue
                if grad_cols.shape[0] == 1:  # one score per column (binary, or R+)
                    grad_cols[0, columns].addmv_(pairs.t(), coef[rows])
                else:  # each row's weight lands on its own class's scores
                    weights = coef.new_zeros(pairs.shape[0], grad_cols.shape[0])
                    weights.scatter_(1, own_class[rows, None], coef[rows, None])
                    grad_cols[:, columns].addmm_(weights.t(), pairs)
        return (grad_own, *grads) + (None,) * 8


def _blocks(inputs: tuple[Tensor, ...], tau: float) -> tuple[Tensor, list[_Block]]:
    """``own / tau`` and the three blocks: live rows, queued rows (for R), positives (for R+)."""
    own, live_cols, queued_cols, pos_cols, _, pos_class, *has_self = inputs
    return own / tau, [
        _Block(live_cols / tau, has_self[0]),
        _Block(queued_cols / tau, has_self[1]),
        _Block(pos_cols / tau, has_self[2], pos_class),
    ]


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
    (queued rows carry no gradient). Value and gradient are computed in chunks of
    positives by a custom autograd function, so memory grows with ``P + M``, not
    ``P * M``: a pool of 1,000,000 rows with 5,000 positives fits in well under 1 GB.
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
        process_group: Any = None,
    ) -> None:
        super().__init__(**arguments(locals()))

    def per_class_loss(self, pool: Pool) -> tuple[Tensor, Tensor]:
        num_classes = self.num_classes
        live, queued = pool.live, pool.queued
        n_live = live.scores.shape[0]
        sample = None if pool.threshold_rows is None else pool.threshold_rows.sort().values
        live_count, queued_count, sampled_count = _positive_counts(pool, sample)
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
            # One block of the sampled rows (sorted: live rows first, with their gradient,
            # then queued ones), gathered from both blocks: splitting the sample by block
            # would need its per-block sizes on the host.
            live_cols = _take(live.scores, queued.scores, sample, n_live).t().contiguous()
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
        ratio = _SmoothAPRatios.apply(
            own, live_cols, queued_cols, pos_cols, own_class, pos_class,
            *((i >= 0).to(own.dtype) for i in (self_live, self_queued, self_pos)),
            scale, self.temperature,
        )  # fmt: skip
        ap = zeros.index_add(0, own_class, weight * ratio) / mass.clamp_min(
            torch.finfo(mass.dtype).tiny
        )
        return 1.0 - ap, valid


def _positive_counts(pool: Pool, sample: Tensor | None) -> tuple[int, int, int]:
    """How many live, queued and sampled rows are positives, as host ints.

    Multi-class: every pooled row is a positive of its class. Binary: the live
    count came with the metadata; the queued and sampled counts are read in one
    device-to-host copy (the forward's second and last host sync): the host
    cannot know which queued rows are positives without reading them.
    """
    n_live, n_queued = pool.live.scores.shape[0], pool.queued.scores.shape[0]
    n_sampled = 0 if sample is None else sample.shape[0]
    if pool.num_classes > 1:
        return n_live, n_queued, n_sampled
    counts: list[int | None] = [
        pool.live.num_positives,
        0 if n_queued == 0 else None,
        0 if sample is None else None,
    ]
    live_pos, queued_pos = (pool.live.targets == 1), (pool.queued.targets == 1)
    unknown = {0: live_pos, 1: queued_pos}
    pending = {k: unknown[k].sum() for k in (0, 1) if counts[k] is None}
    if sample is not None:
        pending[2] = _take(live_pos, queued_pos, sample, n_live).sum()
    if pending:
        values = _device.host_copy(torch.stack(list(pending.values()))).tolist()
        for k, value in zip(pending, values):
            counts[k] = int(value)
    live_count, queued_count, sampled_count = counts
    assert live_count is not None and queued_count is not None and sampled_count is not None
    return live_count, queued_count, sampled_count


def _take(live: Tensor, queued: Tensor, sample: Tensor, n_live: int) -> Tensor:
    """Rows ``sample`` of the live rows followed by the queued ones, without concatenating them."""
    if n_live == 0 or queued.shape[0] == 0:
        return (queued if n_live == 0 else live)[sample]
    from_live = live[sample.clamp(max=n_live - 1)]
    from_queue = queued[(sample - n_live).clamp(min=0)]
    is_live = (sample < n_live).view(-1, *([1] * (live.dim() - 1)))
    return torch.where(is_live, from_live, from_queue)


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
