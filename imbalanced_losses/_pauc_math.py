r"""The per-class math of the FPR-band partial AUC, for all classes at once.

Pure functions over a pooled ``[P, C]`` score matrix (live rows with gradient
and detached queued rows, one-vs-rest per column; ``C == 1`` is binary with
positives at target 1): no Python loop over classes, no host sync per class.
They hold no state, do no gather and no validation of user input; the loss
class composes them.

For class ``c``, with ``ref`` the pooled *iid* negatives of ``c``
(``budget_basis="fpr"``) or the whole pooled iid population
(``"population"``)::

    t_alpha = quantile(ref, 1 - alpha),  t_beta = quantile(ref, 1 - beta)   (detached)
    scale   = IQR(ref) ("iqr")  or  t_alpha - t_beta ("band");  tau = temperature * scale

and over the numerator positives ``i`` (every pooled positive, or only live
ones), weighted by ``w_i``:

* ``"trapezoid"``: ``TPR_k = sum_i w_i sigmoid((s_i - t_k) / tau) / sum_i w_i`` at
  ``n_knots`` thresholds ``t_k`` of equally spaced FPR levels in ``[alpha, beta]``,
  ``pauc = (TPR_0 / 2 + TPR_1 + ... + TPR_{K-1} / 2) / (K - 1)``; gradient into positives only.
* ``"pairwise"``: ``pauc = sum_i w_i sum_{j in band} sigmoid((s_i - s_j) / tau) /
  (|band| sum_i w_i)``, the band being the pooled negatives (iid or not) with
  ``t_beta <= s_j <= t_alpha``; gradient into positives and band negatives, in tiles
  (:mod:`._pair_tiles`).

``loss_c = 1 - pauc_c``. A class is valid when it has a pooled positive and a pooled
iid negative, (``"live"``) a live positive, numerator weight mass > 0, ``scale >
1e-12`` (else *degenerate*) and (pairwise) a band negative. This is the reference
library's (imbalanced-losses 0.6.0) ``PAUCAtBudgetLoss``, value for value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from ._device import true_indices
from ._pair_tiles import pair_sigmoid_row_sums
from .functional import (
    INTERPOLATIONS,
    _fractional_ranks,
    _select_ascending,
    positive_columns,
)

SURROGATES = ("trapezoid", "pairwise")
TAU_SCALES = ("iqr", "band")
BUDGET_BASES = ("fpr", "population")
POS_NUMERATORS = ("pool", "live")
SCALE_EPS = 1e-12  # a class whose detached dispersion is at or below this is invalid
DIAGNOSTIC_KEYS = ("t_alpha", "t_beta", "tau_eff", "band_neg_count", "pauc_var", "grad_pos_count")


@dataclass(frozen=True)
class PAUCOptions:
    """The options of the math (the loss's constructor arguments that shape the value)."""

    alpha: float = 0.0
    beta: float = 0.005
    surrogate: str = "trapezoid"
    n_knots: int = 2
    tau_scale: str = "iqr"
    pos_numerator: str = "pool"
    budget_basis: str = "fpr"
    temperature: float = 0.1
    interpolation: str = "higher"


class BandEdges(NamedTuple):
    """Detached per-class thresholds: knots ``[n_knots, C]`` (trapezoid), edges, scale ``[C]``."""

    knots: Tensor | None
    t_alpha: Tensor
    t_beta: Tensor
    scale: Tensor


class PAUCResult(NamedTuple):
    """Per-class ``loss [C]`` (1 where invalid), ``valid [C]``, ``degenerate [C]`` and diagnostics.

    ``degenerate`` marks the classes invalid only because their scale is <= 1e-12 (the loss
    warns once). ``diagnostics`` (when asked for) holds ``t_alpha``, ``t_beta``, ``tau_eff``,
    ``pauc_var`` (NaN where invalid) and ``band_neg_count`` (0 where invalid); the rank-local
    ``grad_pos_count`` comes from :func:`grad_pos_count`.
    """

    loss: Tensor
    valid: Tensor
    degenerate: Tensor
    diagnostics: dict[str, Tensor] | None


def quantile_levels(
    options: PAUCOptions, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, int]:
    """Every quantile level a class needs, laid out as the reference lays them out.

    ``[knot levels (trapezoid), 1 - alpha, 1 - beta, (0.75, 0.25 for "iqr")]`` and the number
    of knots. The levels are computed in the scores' dtype as the reference does (edges from
    Python floats; knots as ``1 - linspace(alpha, beta)`` with the two end knots set to the
    edges' exact bits), because under the non-interpolating modes one ulp of a level can
    select the adjacent order statistic.
    """
    edges = torch.tensor([1.0 - options.alpha, 1.0 - options.beta], dtype=dtype, device=device)
    parts = []
    n_knots = 0
    if options.surrogate == "trapezoid":
        fpr = torch.linspace(
            options.alpha, options.beta, options.n_knots, dtype=dtype, device=device
        )
        knots = 1.0 - fpr
        knots[0], knots[-1] = edges[0], edges[1]
        parts.append(knots)
        n_knots = options.n_knots
    parts.append(edges)
    if options.tau_scale == "iqr":
        parts.append(torch.tensor([0.75, 0.25], dtype=dtype, device=device))
    return torch.cat(parts), n_knots


def masked_column_quantiles(
    scores: Tensor, member: Tensor, levels: Tensor, interpolation: str
) -> Tensor:
    """``[L, C]``: ``torch.quantile(scores[member[:, c], c], levels, interpolation)`` per column.

    Each column has its own member count ``n_c``, so its order statistics sit at their own
    positions. Non-members are replaced by ``-inf`` (as many as shift the column's wanted
    position to a common one, ``K``) and ``+inf`` (the rest), so one selection at ``K`` (and
    ``K + 1`` to interpolate) serves every column; :func:`functional._select_ascending` does
    it without a sort. One host sync for all levels (the common positions). A column with
    no member gives a meaningless value (the caller marks it invalid); a NaN member gives
    NaN, as ``torch.quantile`` does.
    """
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    scores = scores.detach()
    num_rows, num_columns = scores.shape
    dtype, device = scores.dtype, scores.device
    if num_rows == 0:
        return scores.new_full((len(levels), num_columns), float("nan"))
    count = member.sum(0)  # [C]
    # The fractional rank as torch.quantile computes it, level * (n - 1) with the level in the
    # scores' dtype, but in float32 or wider (float16 cannot hold n - 1 past 65,504 rows).
    ranks = _fractional_ranks(levels.to(dtype)[:, None], count[None, :], interpolation)
    last = (count - 1).clamp_min(0)[None, :]
    below = ranks.floor().long().clamp(min=0).minimum(last)  # [L, C]
    above = ranks.ceil().long().clamp(min=0).minimum(last)
    # Column c gets shift_c = K - below_c leading -infs; the extra rows make room for them.
    common = below.amax(1)  # [L]
    shift = common[:, None] - below
    extra = (count[None, :] + shift - num_rows).amax(1).clamp_min(0)
    host = torch.cat([common, extra]).tolist()  # the one host sync
    common_at, extra_rows = host[: len(levels)], host[len(levels) :]

    excluded = ~member
    excluded_rank = excluded.cumsum(0, dtype=torch.int32) - 1  # among this column's non-members
    num_excluded = num_rows - count  # [C]
    minus_inf = scores.new_full((), float("-inf"))
    plus_inf = scores.new_full((), float("inf"))
    out = []
    for level in range(len(levels)):
        filler = torch.where(excluded_rank < shift[level][None, :], minus_inf, plus_inf)
        blocks = [torch.where(member, scores, filler)]
        if extra_rows[level] > 0:
            rank = num_excluded[None, :] + torch.arange(extra_rows[level], device=device)[:, None]
            blocks.append(torch.where(rank < shift[level][None, :], minus_inf, plus_inf).to(dtype))
        k = common_at[level]
        total = num_rows + extra_rows[level]
        positions = (k,) if k + 1 >= total else (k, k + 1)
        values, has_nan = _select_ascending(blocks, positions)
        low = values[0]
        if interpolation in ("linear", "midpoint"):
            # In the ranks' (float32-or-wider) dtype, rounded once back to the scores' dtype.
            wide = torch.promote_types(dtype, ranks.dtype)
            high = torch.where(above[level] > below[level], values[-1], low).to(wide)
            if interpolation == "midpoint":
                weight = torch.full_like(high, 0.5)
            else:
                weight = ranks[level] - below[level].to(wide)
            low = torch.lerp(low.to(wide), high, weight).to(dtype)
        out.append(low.masked_fill(has_nan, float("nan")))
    return torch.stack(out) if out else scores.new_empty(0, num_columns)


def reference_members(is_pos: Tensor, iid: Tensor, budget_basis: str) -> Tensor:
    """``[P, C]`` rows of each class's reference population: iid negatives, or all iid rows."""
    if budget_basis == "population":
        return iid[:, None].expand_as(is_pos)
    return iid[:, None] & ~is_pos


def band_edges(scores: Tensor, member: Tensor, options: PAUCOptions) -> BandEdges:
    """Knots, band edges and the raw (unclamped) scale of every class, from one selection pass."""
    levels, n_knots = quantile_levels(options, scores.dtype, scores.device)
    values = masked_column_quantiles(scores, member, levels, options.interpolation)
    knots = values[:n_knots] if n_knots else None
    t_alpha, t_beta = values[n_knots], values[n_knots + 1]
    if options.tau_scale == "iqr":
        scale = values[n_knots + 2] - values[n_knots + 3]
    else:
        scale = t_alpha - t_beta
    return BandEdges(knots, t_alpha, t_beta, scale)


def grad_pos_count(targets: Tensor, num_classes: int, ignore_index: int = -100) -> Tensor:
    """``[C]`` long: this rank's live (pre-gather) positives per class, padding excluded.

    Binary counts every non-zero target, as the reference does.
    """
    targets = targets.reshape(-1)
    kept = targets != ignore_index
    if num_classes == 1:
        return (kept & (targets != 0)).sum().reshape(1)
    cls = torch.where(kept, targets.long(), 0)
    return torch.zeros(num_classes, dtype=torch.long, device=targets.device).index_add_(
        0, cls, kept.long()
    )


def _per_class_sum(values: Tensor, cls: Tensor, num_classes: int) -> Tensor:
    """Sum of ``values [n, ...]`` per class ``cls [n]``: ``[C, ...]``."""
    return values.new_zeros((num_classes, *values.shape[1:])).index_add(0, cls, values)


def _band_keys(
    scores: Tensor, band: Tensor, count: Tensor, total: int, width: int
) -> tuple[Tensor, Tensor]:
    """Each class's band scores packed left in a ``[C, B]`` matrix (with gradient) and its mask.

    ``count`` is the band size per class (on the device), ``total`` and ``width`` (``B``, the
    largest band, at least 1) the same sizes already read on the host, so packing adds no
    host sync of its own (``nonzero_static``). It makes the pairs ``positives x B`` instead
    of ``positives x P`` (a band is a small slice of the pool).
    """
    num_rows, num_classes = band.shape
    flat = true_indices(band.t().reshape(-1), total)  # ordered by class, then row
    cls, row = flat // num_rows, flat % num_rows
    start = torch.cumsum(count, 0) - count
    slot = torch.arange(total, device=band.device) - start[cls]
    keys = scores.new_zeros(num_classes, width).index_put((cls, slot), scores[row, cls])
    valid = torch.zeros(num_classes, width, dtype=torch.bool, device=band.device)
    valid[cls, slot] = True
    return keys, valid


def pauc_per_class(
    scores: Tensor,
    targets: Tensor,
    weights: Tensor | None,
    iid: Tensor,
    live: Tensor,
    options: PAUCOptions,
    *,
    diagnostics: bool = False,
    tile_elements: int | None = None,
) -> PAUCResult:
    """``1 - pauc`` of every class over a pool, with validity, degeneracy and diagnostics.

    Args:
        scores: ``[P, C]`` pooled scores (live rows may carry gradient, queued rows detached).
        targets: ``[P]`` class ids without padding (binary: 0/1).
        weights: ``[P]`` non-negative detached weights (``None``: all 1); only the
            numerator positives' weights count.
        iid: ``[P]`` bool, rows drawn i.i.d. from the population (the band edges use only these).
        live: ``[P]`` bool, rows of this step (``pos_numerator="live"`` counts only these).
        options: the loss's options.
        diagnostics: also return the reference's per-class diagnostics (weight-blind).
        tile_elements: pairs per tile of the pairwise kernel (tests use small tiles).
    """
    num_rows, num_classes = scores.shape
    dtype, device = scores.dtype, scores.device
    targets = targets.reshape(-1)
    column = positive_columns(targets, num_classes)
    cls = column.clamp(min=0)
    is_positive_row = column >= 0
    is_pos = is_positive_row[:, None] & (cls[:, None] == torch.arange(num_classes, device=device))
    iid = iid.to(torch.bool)
    live = live.to(torch.bool)
    if weights is None:
        weights = torch.ones(num_rows, dtype=dtype, device=device)
    weights = weights.detach().to(dtype)

    numerator = is_positive_row & live if options.pos_numerator == "live" else is_positive_row
    pos_count = _per_class_sum(is_positive_row.long(), cls, num_classes)
    num_count = _per_class_sum(numerator.long(), cls, num_classes)
    iid_neg = iid[:, None] & ~is_pos
    iid_neg_count = iid_neg.sum(0)
    num_weight = torch.where(numerator, weights, torch.zeros_like(weights))
    mass = _per_class_sum(num_weight, cls, num_classes)
    base_ok = (pos_count > 0) & (iid_neg_count > 0) & (num_count > 0) & (mass != 0)

    edges = band_edges(scores, reference_members(is_pos, iid, options.budget_basis), options)
    # `<=` is False for a NaN scale: the reference then carries on with a NaN loss.
    degenerate = base_ok & (edges.scale <= SCALE_EPS)
    valid = base_ok & ~degenerate
    tau = options.temperature * edges.scale.clamp_min(SCALE_EPS)
    safe_tau = torch.where(valid, tau, torch.ones_like(tau))  # no inf/NaN gradients off-class

    own = scores.gather(1, cls[:, None]).squeeze(1)
    if options.surrogate == "trapezoid":
        assert edges.knots is not None
        n_knots = edges.knots.shape[0]
        rule = torch.ones(n_knots, dtype=dtype, device=device)
        rule[0] = rule[-1] = 0.5
        rule = rule / (n_knots - 1)
        # contrib[i, k] = sigmoid((s_i - t_k) / tau) for every row at its own class's knots. Rows
        # off the numerator or of an invalid class get a 0 score: their term is dropped, and a
        # NaN or inf of theirs must not reach the gradient either (0 * sigmoid'(NaN) is NaN).
        counted = numerator & valid[cls]
        safe_own = torch.where(counted, own, torch.zeros_like(own))
        contrib = torch.sigmoid((safe_own[:, None] - edges.knots.t()[cls]) / safe_tau[cls][:, None])
        # where, not a product: a non-numerator row must add 0 even if its term is NaN.
        terms = torch.where(counted[:, None], num_weight[:, None] * contrib, 0.0)
        tpr = _per_class_sum(terms, cls, num_classes) / torch.where(valid, mass, 1.0)[:, None]
        pauc = tpr @ rule
        per_positive = contrib.detach() @ rule if diagnostics else None
        band_count = None
    else:
        band = ~is_pos & (scores.detach() >= edges.t_beta) & (scores.detach() <= edges.t_alpha)
        band = band & valid[None, :]
        band_count = band.sum(0)
        valid = valid & (band_count > 0)
        counted = numerator & valid[cls]  # invalid classes cost no pairs
        # The pairwise path's one host sync: the band sizes and the numerator row count.
        sizes = torch.cat([band_count, counted.sum().reshape(1)]).tolist()
        band_sizes, num_counted = sizes[:-1], sizes[-1]
        keys, key_valid = _band_keys(
            scores, band, band_count, sum(band_sizes), max(1, max(band_sizes, default=0))
        )
        rows = true_indices(counted, num_counted)
        row_cls = cls[rows]
        sums = pair_sigmoid_row_sums(
            own[rows], row_cls, safe_tau[row_cls], keys, key_valid, tile_elements=tile_elements
        )
        denominator = torch.where(valid, band_count.to(dtype) * mass, 1.0)
        pauc = _per_class_sum(num_weight[rows] * sums, row_cls, num_classes) / denominator
        per_positive = None
        if diagnostics:
            per_positive = torch.zeros(num_rows, dtype=dtype, device=device)
            per_positive[rows] = sums.detach() / band_count.clamp_min(1)[row_cls].to(dtype)
    loss = torch.where(valid, 1.0 - pauc, torch.ones_like(pauc))

    diag = None
    if diagnostics:
        assert per_positive is not None
        diag = _diagnostics(
            scores, cls, numerator, iid_neg, num_count, edges, tau, valid, per_positive, num_classes
        )
    return PAUCResult(loss, valid, degenerate, diag)


def _diagnostics(
    scores: Tensor,
    cls: Tensor,
    numerator: Tensor,
    iid_neg: Tensor,
    num_count: Tensor,
    edges: BandEdges,
    tau: Tensor,
    valid: Tensor,
    per_positive: Tensor,
    num_classes: int,
) -> dict[str, Tensor]:
    """The reference's weight-blind diagnostics: NaN (floats) or 0 (counts) where invalid."""
    detached = scores.detach()
    in_band = iid_neg & (detached >= edges.t_beta) & (detached <= edges.t_alpha)
    # pauc_var: population variance over the numerator positives of each one's contribution.
    count = num_count.clamp_min(1).to(scores.dtype)
    v = torch.where(numerator, per_positive, 0.0)
    mean = _per_class_sum(v, cls, num_classes) / count
    centred = torch.where(numerator, (per_positive - mean[cls]).square(), 0.0)
    variance = _per_class_sum(centred, cls, num_classes) / count
    nan = torch.full_like(tau, float("nan"))
    return {
        "t_alpha": torch.where(valid, edges.t_alpha, nan),
        "t_beta": torch.where(valid, edges.t_beta, nan),
        "tau_eff": torch.where(valid, tau, nan),
        "band_neg_count": torch.where(valid, in_band.sum(0), 0),
        "pauc_var": torch.where(valid, variance, nan),
    }
