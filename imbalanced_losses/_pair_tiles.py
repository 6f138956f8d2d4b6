"""Row sums of pairwise sigmoids, in tiles: memory linear in the number of pairs' sides.

Pairwise ranking losses (the band-restricted pairwise pAUC, Smooth-AP's soft
ranks) need, for each *query* ``i`` (one score, one class), a sum over *keys*
``j`` of the class's key row::

    out_i = sum_j valid[c_i, j] * sigmoid((x_i - keys[c_i, j]) / tau_i)

Materialising the ``[n, m]`` pair matrix costs ``O(n * m)`` memory (the reason
the reference library advises pools of a few thousand rows). Here value and
gradient are computed tile by tile in one buffer that a forward or a backward
allocates once and reuses; the backward recomputes the sigmoids instead of
saving them, so memory is ``O(n + K * m)`` plus the buffer. Time stays
``O(n * m)``.

The kernel knows nothing of any loss: ``tau_i`` is per query and may be
negative (``tau = -t`` gives ``sigmoid((keys - x) / t)``, Smooth-AP's
"key ranked above the query"); ``keys`` has one row per class (``K = C``) or
one shared row (``K = 1``); pairs of a query with itself, if the caller's keys
contain the query, are the caller's to correct (they add ``sigmoid(0)``, and
their two gradient halves land on the same score when ``x`` and ``keys`` come
from the same tensor). Smooth-AP's private kernel in ``smooth_ap.py`` predates
this module and can move onto it (three calls: live rows, queued rows,
same-class positives, with autograd composing ``R+ / R``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

# One tile holds at most this many pairs (x64 on CUDA): small enough to stay in a
# CPU cache, large enough to amortise the per-tile launch. The buffer is allocated
# once per forward/backward and reused (allocate-and-free loops of mid-sized blocks
# make glibc's resident memory climb).
TILE_ELEMENTS = 1 << 18
_TILE_COLUMNS = 1 << 14


def _tiles(num_rows: int, num_cols: int, tile_elements: int) -> list[tuple[slice, slice]]:
    """(query rows, key columns) slices covering the ``[num_rows, num_cols]`` pairs."""
    cols = max(1, min(num_cols, tile_elements, _TILE_COLUMNS))
    rows = max(1, tile_elements // cols)
    return [
        (slice(a, min(a + rows, num_rows)), slice(b, min(b + cols, num_cols)))
        for a in range(0, num_rows, rows)
        for b in range(0, num_cols, cols)
    ]


def _tile_elements(x: Tensor, tile_elements: int | None) -> int:
    if tile_elements is not None:
        return tile_elements
    return TILE_ELEMENTS * (64 if x.is_cuda else 1)


def _fill_sigmoids(
    x: Tensor,
    query_class: Tensor,
    tau: Tensor,
    keys: Tensor,
    void: Tensor | None,
    tile: tuple[slice, slice],
    buffer: Tensor,
    void_buffer: Tensor | None,
) -> tuple[Tensor, Tensor | None]:
    """``sigmoid((x_i - keys[c_i, j]) / tau_i)`` of one tile in ``buffer``, and its void mask.

    The caller zeroes the void pairs with ``masked_fill`` last, after any product: a void key
    may hold inf/NaN, and ``0 * NaN`` is NaN.
    """
    rows, cols = tile
    x_t, cls_t = x[rows], query_class[rows]
    n_rows, n_cols = x_t.shape[0], cols.stop - cols.start
    pairs = buffer[: n_rows * n_cols].view(n_rows, n_cols)
    if keys.shape[0] == 1:
        torch.sub(x_t[:, None], keys[:, cols], out=pairs)
    else:
        torch.index_select(keys[:, cols], 0, cls_t, out=pairs)
        pairs.neg_().add_(x_t[:, None])
    pairs.div_(tau[rows, None]).sigmoid_()
    if void is None or void_buffer is None:
        return pairs, None
    mask = void_buffer[: n_rows * n_cols].view(n_rows, n_cols)
    if void.shape[0] == 1:
        mask.copy_(void[:, cols].expand(n_rows, n_cols))
    else:
        torch.index_select(void[:, cols], 0, cls_t, out=mask)
    return pairs, mask


class _PairSigmoidRowSums(torch.autograd.Function):
    """Custom autograd: sums and gradient tile by tile; nothing of size ``n * m`` is kept."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        keys: Tensor,
        query_class: Tensor,
        tau: Tensor,
        void: Tensor | None,
        tile_elements: int,
    ) -> Tensor:
        ctx.save_for_backward(x, keys, query_class, tau)
        ctx.void, ctx.tile_elements = void, tile_elements
        out = torch.zeros_like(x)
        buffer = x.new_empty(min(tile_elements, max(1, x.shape[0] * keys.shape[1])))
        void_buffer = None if void is None else torch.empty_like(buffer, dtype=torch.bool)
        for tile in _tiles(x.shape[0], keys.shape[1], tile_elements):
            pairs, mask = _fill_sigmoids(x, query_class, tau, keys, void, tile, buffer, void_buffer)
            if mask is not None:
                pairs.masked_fill_(mask, 0.0)
            out[tile[0]] += pairs.sum(1)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, keys, query_class, tau = ctx.saved_tensors
        void, tile_elements = ctx.void, ctx.tile_elements
        needs_x, needs_keys = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # d out_i / d x_i = sum_j s'(z_ij) / tau_i and d out_i / d keys[c_i, j] = -s'(z_ij) / tau_i.
        coef = grad_out / tau
        grad_x = torch.zeros_like(x) if needs_x else None
        grad_keys = torch.zeros_like(keys) if needs_keys else None
        buffer = x.new_empty(min(tile_elements, max(1, x.shape[0] * keys.shape[1])))
        void_buffer = None if void is None else torch.empty_like(buffer, dtype=torch.bool)
        for tile in _tiles(x.shape[0], keys.shape[1], tile_elements):
            rows, cols = tile
            pairs, mask = _fill_sigmoids(x, query_class, tau, keys, void, tile, buffer, void_buffer)
            pairs.addcmul_(pairs, pairs, value=-1.0)  # sigmoid' = s (1 - s)
            pairs.mul_(coef[rows, None])
            if mask is not None:
                pairs.masked_fill_(mask, 0.0)
            if grad_x is not None:
                grad_x[rows] += pairs.sum(1)
            if grad_keys is not None:
                if keys.shape[0] == 1:
                    grad_keys[0, cols] -= pairs.sum(0)
                else:
                    grad_keys[:, cols].index_add_(0, query_class[rows], pairs, alpha=-1.0)
        return grad_x, grad_keys, None, None, None, None


def pair_sigmoid_row_sums(
    x: Tensor,
    query_class: Tensor,
    tau: Tensor,
    keys: Tensor,
    valid: Tensor | None = None,
    *,
    tile_elements: int | None = None,
) -> Tensor:
    """``out_i = sum_j valid[c_i, j] * sigmoid((x_i - keys[c_i, j]) / tau_i)`` in bounded memory.

    Args:
        x: ``[n]`` query scores (may carry gradient).
        query_class: ``[n]`` long, the row of ``keys`` each query is compared with
            (ignored when ``keys`` has one row).
        tau: ``[n]`` per-query temperature, non-zero (negative flips the comparison);
            no gradient flows into it.
        keys: ``[K, m]`` key scores, one row per class or one shared row (may carry gradient).
        valid: ``[C, m]`` (row ``c_i`` for query ``i``) or ``[1, m]`` bool, which keys count
            (``None``: all); ``C`` rows also with a shared key row, e.g. "key ``j`` counts for
            queries of its own class". Void keys add nothing to the value nor to any gradient,
            whatever they hold.
        tile_elements: pairs per tile (default :data:`TILE_ELEMENTS`, x64 on CUDA).

    Returns:
        ``[n]`` sums, differentiable in ``x`` and ``keys``.
    """
    if x.dim() != 1 or query_class.shape != x.shape or tau.shape != x.shape:
        raise ValueError(
            f"x, query_class and tau must be [n], got {tuple(x.shape)}, "
            f"{tuple(query_class.shape)}, {tuple(tau.shape)}"
        )
    if keys.dim() != 2 or (
        valid is not None and (valid.dim() != 2 or valid.shape[1] != keys.shape[1])
    ):
        shape = None if valid is None else tuple(valid.shape)
        raise ValueError(
            f"keys must be [K, m] and valid [C or 1, m], got {tuple(keys.shape)}, {shape}"
        )
    void = None if valid is None else ~valid.to(torch.bool)
    tiles = _tile_elements(x, tile_elements)
    if tiles < 1:
        raise ValueError(f"tile_elements must be >= 1, got {tiles}")
    keys = keys.to(x.dtype).contiguous()
    out: Tensor = _PairSigmoidRowSums.apply(
        x, keys, query_class.long(), tau.detach().to(x.dtype), void, tiles
    )
    return out
