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

The kernel knows nothing of any loss: ``tau_i`` is per query (or one float)
and may be negative (``tau = -t`` gives ``sigmoid((keys - x) / t)``,
Smooth-AP's "key ranked above the query"); ``keys`` has one row per class
(``K = C``) or one shared row (``K = 1``); pairs of a query with itself, if the
caller's keys contain the query, are the caller's to correct (they add
``sigmoid(0)``, and their two gradient halves land on the same score when ``x``
and ``keys`` come from the same tensor). The package's one tiled pair kernel:
the pairwise pAUC calls it once (band negatives), ``SmoothAPLoss`` up to three
times (live rows, queued rows, same-class positives) and lets autograd compose
``R+ / R``. Its backward is once differentiable (``what`` names the caller in
the error a second derivative raises).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ._autograd import once_differentiable

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


class _Pass:
    """What every tile of one forward or backward pass reads, and the buffers it reuses.

    A float ``tau`` is divided into ``x`` and ``keys`` here, once, so no per-pair division is
    left; a per-query one is divided into each tile. Either way a tile computes
    ``(keys - x) / -tau``, which is ``(x - keys) / tau`` to the bit and one pass fewer after an
    ``index_select``.
    """

    def __init__(self, ctx: Any, x: Tensor, keys: Tensor, tau: Tensor | float) -> None:
        self.query_class, self.void, self.key_class = ctx.query_class, ctx.void, ctx.key_class
        self.neg_tau: Tensor | None
        if isinstance(tau, Tensor):
            self.x, self.keys, self.neg_tau = x, keys, -tau
        else:
            self.x, self.keys, self.neg_tau = x / -tau, keys / -tau, None
        # One buffer of pairs and one of their masks, allocated once per pass.
        self.buffer = x.new_empty(min(ctx.tile_elements, max(1, x.shape[0] * keys.shape[1])))
        self.mask_buffer: Tensor | None = None
        if self.void is not None:
            self.mask_buffer = torch.empty_like(self.buffer, dtype=torch.bool)
        elif self.key_class is not None:
            # A 0/1 weight, not a bool mask: a product is ~5x faster than masked_fill on CPU.
            self.mask_buffer = torch.empty_like(self.buffer)
            self.query_class_int = self.query_class.int()

    def sigmoids(self, tile: tuple[slice, slice]) -> tuple[Tensor, Tensor | None]:
        """``sigmoid((x_i - keys[c_i, j]) / tau_i)`` of one tile in the buffer, its void mask.

        ``key_class`` pairs of another class are zeroed here (a product). ``valid`` void pairs
        are left to the caller, who zeroes them with ``masked_fill`` last, after any product:
        a void key may hold inf/NaN, and ``0 * NaN`` is NaN.
        """
        rows, cols = tile
        x_t, cls_t = self.x[rows], self.query_class[rows]
        n_rows, n_cols = x_t.shape[0], cols.stop - cols.start
        pairs = self.buffer[: n_rows * n_cols].view(n_rows, n_cols)
        if self.keys.shape[0] == 1:
            torch.sub(self.keys[:, cols], x_t[:, None], out=pairs)
        else:
            torch.index_select(self.keys[:, cols], 0, cls_t, out=pairs).sub_(x_t[:, None])
        if self.neg_tau is not None:
            pairs.div_(self.neg_tau[rows, None])
        pairs.sigmoid_()
        if self.mask_buffer is None:
            return pairs, None
        mask = self.mask_buffer[: n_rows * n_cols].view(n_rows, n_cols)
        if self.key_class is not None:
            torch.eq(self.key_class[None, cols], self.query_class_int[rows, None], out=mask)
            return pairs.mul_(mask), None
        assert self.void is not None
        if self.void.shape[0] == 1:
            mask.copy_(self.void[:, cols].expand(n_rows, n_cols))
        else:
            torch.index_select(self.void[:, cols], 0, cls_t, out=mask)
        return pairs, mask


class _PairSigmoidRowSums(torch.autograd.Function):
    """Custom autograd: sums and gradient tile by tile; nothing of size ``n * m`` is kept."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        keys: Tensor,
        query_class: Tensor,
        tau: Tensor | float,
        void: Tensor | None,
        key_class: Tensor | None,
        tile_elements: int,
        what: str,
    ) -> Tensor:
        ctx.save_for_backward(x, keys, tau if isinstance(tau, Tensor) else None)
        ctx.query_class, ctx.tau, ctx.void, ctx.key_class = query_class, tau, void, key_class
        ctx.tile_elements, ctx.what = tile_elements, what
        run = _Pass(ctx, x, keys, tau)
        out = torch.zeros_like(x)
        for tile in _tiles(x.shape[0], keys.shape[1], tile_elements):
            pairs, mask = run.sigmoids(tile)
            if mask is not None:
                pairs.masked_fill_(mask, 0.0)
            out[tile[0]] += pairs.sum(1)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        return once_differentiable(ctx.what)(_row_sums_backward)(ctx, grad_out)


def _row_sums_backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
    """Gradient of the row sums, tile by tile, the sigmoids recomputed (never saved)."""
    x, keys, tau_tensor = ctx.saved_tensors
    tau = ctx.tau if tau_tensor is None else tau_tensor
    query_class = ctx.query_class
    needs_x, needs_keys = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    run = _Pass(ctx, x, keys, tau)
    # d out_i / d x_i = sum_j s'(z_ij) / tau_i and d out_i / d keys[c_i, j] = -s'(z_ij) / tau_i.
    coef = grad_out / tau
    grad_x = torch.zeros_like(x) if needs_x else None
    grad_keys = torch.zeros_like(keys) if needs_keys else None
    for tile in _tiles(x.shape[0], keys.shape[1], ctx.tile_elements):
        rows, cols = tile
        pairs, mask = run.sigmoids(tile)
        pairs.addcmul_(pairs, pairs, value=-1.0)  # sigmoid' = s (1 - s)
        if mask is None:
            # coef applied by the reductions, not in a pass over the pairs (speed).
            if grad_x is not None:
                grad_x[rows] += coef[rows] * pairs.sum(1)
            if grad_keys is not None:
                _subtract_key_gradient(grad_keys, pairs, coef[rows], query_class[rows], cols)
            continue
        # With void pairs coef goes in first: a void-only row's coef may be NaN/inf (any tau),
        # and only a pair zeroed after the product adds nothing.
        pairs.mul_(coef[rows, None]).masked_fill_(mask, 0.0)
        if grad_x is not None:
            grad_x[rows] += pairs.sum(1)
        if grad_keys is not None:
            if keys.shape[0] == 1:
                grad_keys[0, cols] -= pairs.sum(0)
            else:
                grad_keys[:, cols].index_add_(0, query_class[rows], pairs, alpha=-1.0)
    return grad_x, grad_keys, None, None, None, None, None, None


def _subtract_key_gradient(
    grad_keys: Tensor, pairs: Tensor, coef: Tensor, query_class: Tensor, cols: slice
) -> None:
    """``grad_keys[c_i, j] -= coef_i * pairs[i, j]`` as one matrix product per tile."""
    if grad_keys.shape[0] == 1:
        grad_keys[0, cols].addmv_(pairs.t(), coef, alpha=-1.0)
        return
    weights = coef.new_zeros(pairs.shape[0], grad_keys.shape[0])
    weights.scatter_(1, query_class[:, None], coef[:, None])
    grad_keys[:, cols].addmm_(weights.t(), pairs, alpha=-1.0)


def pair_sigmoid_row_sums(
    x: Tensor,
    query_class: Tensor,
    tau: Tensor | float,
    keys: Tensor,
    valid: Tensor | None = None,
    *,
    key_class: Tensor | None = None,
    tile_elements: int | None = None,
    what: str = "pair_sigmoid_row_sums (its gradient is computed tile by tile)",
) -> Tensor:
    """``out_i = sum_j valid[c_i, j] * sigmoid((x_i - keys[c_i, j]) / tau_i)`` in bounded memory.

    Args:
        x: ``[n]`` query scores (may carry gradient).
        query_class: ``[n]`` long, the row of ``keys`` each query is compared with
            (ignored when ``keys`` has one row).
        tau: ``[n]`` per-query temperature, non-zero (negative flips the comparison), or
            one Python float for every query (divided into ``x`` and ``keys`` once, not into
            every pair); no gradient flows into it.
        keys: ``[K, m]`` key scores, one row per class or one shared row (may carry gradient).
        valid: ``[C, m]`` (row ``c_i`` for query ``i``) or ``[1, m]`` bool, which keys count
            (``None``: all); ``C`` rows also with a shared key row, e.g. "key ``j`` counts for
            queries of its own class". Void keys add nothing to the value nor to any gradient,
            whatever they hold.
        key_class: ``[m]`` integer, instead of ``valid``: key ``j`` counts only for queries
            of class ``key_class[j]``, without materialising a ``[C, m]`` mask. The other
            pairs are multiplied by 0, so unlike ``valid`` a NaN/inf key still reaches every
            query's sum (pass ``valid`` for keys that may hold them); class ids < 2**31.
        tile_elements: pairs per tile (default :data:`TILE_ELEMENTS`, x64 on CUDA).
        what: names the caller in the error a second derivative raises (the backward is
            once differentiable, as :func:`._autograd.once_differentiable` marks it).

    Returns:
        ``[n]`` sums, differentiable (once) in ``x`` and ``keys``.
    """
    if (
        x.dim() != 1
        or query_class.shape != x.shape
        or (isinstance(tau, Tensor) and tau.shape != x.shape)
    ):
        tau_shape = tuple(tau.shape) if isinstance(tau, Tensor) else "a float"
        raise ValueError(
            f"x, query_class and tau must be [n] (tau may be a float), got {tuple(x.shape)}, "
            f"{tuple(query_class.shape)}, {tau_shape}"
        )
    if not isinstance(tau, Tensor) and not (math.isfinite(tau) and tau != 0):
        raise ValueError(f"tau must be a finite non-zero float or an [n] tensor, got {tau!r}")
    if keys.dim() != 2 or (
        valid is not None and (valid.dim() != 2 or valid.shape[1] != keys.shape[1])
    ):
        shape = None if valid is None else tuple(valid.shape)
        raise ValueError(
            f"keys must be [K, m] and valid [C or 1, m], got {tuple(keys.shape)}, {shape}"
        )
    if key_class is not None and (valid is not None or key_class.shape != keys.shape[1:]):
        shape = tuple(key_class.shape)
        raise ValueError(
            f"key_class must be [m] = [{keys.shape[1]}] and replaces valid (pass one of the "
            f"two), got key_class {shape} with valid {'given' if valid is not None else 'None'}"
        )
    void = None if valid is None else ~valid.to(torch.bool)
    tiles = _tile_elements(x, tile_elements)
    if tiles < 1:
        raise ValueError(f"tile_elements must be >= 1, got {tiles}")
    keys = keys.to(x.dtype).contiguous()
    if isinstance(tau, Tensor):
        tau = tau.detach().to(x.dtype)
    out: Tensor = _PairSigmoidRowSums.apply(
        x,
        keys,
        query_class.long(),
        tau,
        void,
        None if key_class is None else key_class.int(),
        tiles,
        what,
    )
    return out
