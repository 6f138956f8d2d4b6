"""Pure functions behind the queued ranking losses.

Each function works on all classes at once (columns of a ``[P, C]`` score
matrix) so the loss never loops over classes in Python nor syncs the host per
class. The threshold is found by *selection* (``torch.topk`` /
``torch.kthvalue``), not by sorting, and has no row limit (``torch.quantile``
refuses inputs past 2**24 elements).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

INTERPOLATIONS: tuple[str, ...] = ("linear", "lower", "higher", "nearest", "midpoint")

# Above this fraction of the column, one O(P) quickselect per order statistic
# beats a top-k heap/partial sort of the upper tail.
_TOPK_MAX_FRACTION = 0.05
_TOPK_CHUNK_ROWS = 1 << 20
# The quickselect path copies columns into a contiguous [columns, P] chunk, and
# torch.kthvalue allocates a clone and int64 indices of it: 4x the chunk. On the
# CPU, glibc keeps freed blocks of that size in its heap, and a block no later
# request fits (a bigger chunk as the queue fills, or one split by a small
# tensor) stays in the process's memory: filling a 16k-row queue at C=1000 grew
# the resident memory by over 3x the pool (scripts/bench.py). So on the CPU a
# chunk is one buffer of about 2**18 values whatever the pool size, reused for
# every chunk of a call, and the results go into tensors allocated beforehand.
_KTH_CHUNK_ELEMENTS = 1 << 18
# Other devices have a caching allocator and pay a kernel launch per chunk: at
# most 1/8 of the columns (and 2**22 values) per chunk.
_KTH_DEVICE_MIN_CHUNKS = 8
_KTH_DEVICE_CHUNK_ELEMENTS = 1 << 22


def _order_statistic_positions(
    num_rows: int, prob: float, interpolation: str, dtype: torch.dtype
) -> tuple[int, int, float]:
    """Ascending positions ``(below, above)`` and lerp weight, as ``torch.quantile`` derives them.

    ``torch.quantile`` computes the fractional rank ``prob * (n - 1)`` in the
    input's dtype, then floors/ceils/rounds (half to even) it. Doing the same
    scalar arithmetic here makes the threshold bit-identical to it. Half-precision
    inputs (which ``torch.quantile`` refuses) get the rank of their float32 upcast:
    in bfloat16 ``0.999`` is ``1.0`` (the top row instead of the budget) and in
    float16 ``n - 1`` overflows past 65,504 rows.
    """
    rank = _fractional_ranks(
        torch.tensor(prob, dtype=_at_least_float32(dtype)),
        torch.tensor(num_rows),
        interpolation,
    )
    below = int(rank.floor().item())
    above = int(rank.ceil().item())
    if interpolation == "midpoint":
        weight = 0.5
    else:
        weight = float((rank - below).item())
    return below, min(above, num_rows - 1), weight


def _fractional_ranks(prob: Tensor, num_rows: Tensor, interpolation: str) -> Tensor:
    """Fractional ranks ``prob * (num_rows - 1)``, rounded as ``interpolation`` says, broadcast.

    Always in float32 or wider whatever ``prob``'s dtype (``prob`` is upcast exactly): a
    half-precision rank cannot even hold ``n - 1`` past 65,504 rows. Shared by the scalar
    :func:`_order_statistic_positions` and the per-column ranks of the PAUC math.
    """
    wide = _at_least_float32(prob.dtype)
    rank = prob.to(wide) * (num_rows - 1).clamp_min(0).to(wide)
    if interpolation == "lower":
        rank = rank.floor()
    elif interpolation == "higher":
        rank = rank.ceil()
    elif interpolation == "nearest":
        rank = rank.round()
    return rank


def _at_least_float32(dtype: torch.dtype) -> torch.dtype:
    """The dtype of ranks, weights and thresholds for scores of ``dtype``."""
    return torch.promote_types(dtype, torch.float32)


def _select_ascending(
    blocks: Sequence[Tensor], positions: tuple[int, ...]
) -> tuple[list[Tensor], Tensor]:
    """Per-column values at ascending order-statistic positions (0-based) of the stacked blocks.

    Also returns a per-column NaN flag (torch.quantile returns NaN for such a
    column). Neither path concatenates the blocks.
    """
    num_rows = sum(block.shape[0] for block in blocks)
    needed = num_rows - min(positions)  # the top-k must reach the lowest position
    if needed <= max(1, int(_TOPK_MAX_FRACTION * num_rows)):
        return _select_from_top(blocks, positions, num_rows, needed)
    return _select_by_quickselect(blocks, positions, num_rows)


def _select_from_top(
    blocks: Sequence[Tensor], positions: tuple[int, ...], num_rows: int, needed: int
) -> tuple[list[Tensor], Tensor]:
    """A small upper tail: top-k of each block (in row chunks), then top-k of their union."""
    # CPU top-k allocates (value, index) scratch for its whole input, so big
    # blocks go in chunks; the union of per-chunk top-k sets holds the global one.
    chunk = max(_TOPK_CHUNK_ROWS, 16 * needed)
    tails = [
        torch.topk(part, min(needed, part.shape[0]), dim=0, sorted=False).values
        for block in blocks
        for part in block.split(chunk)
        if part.shape[0] > 0
    ]
    union = tails[0] if len(tails) == 1 else torch.cat(tails)
    top = torch.topk(union, needed, dim=0, sorted=True).values
    # top-k orders NaN above every number, so a NaN column shows it first.
    return [top[num_rows - 1 - p] for p in positions], torch.isnan(top[0])


def _select_by_quickselect(
    blocks: Sequence[Tensor], positions: tuple[int, ...], num_rows: int
) -> tuple[list[Tensor], Tensor]:
    """One quickselect per position, over contiguous chunks of columns.

    Each chunk holds a few columns of every block, transposed, so the selection
    runs along contiguous memory and its scratch stays a small, fixed size.
    """
    first = blocks[0]
    num_columns = first.shape[1]
    if first.device.type == "cpu":
        width = _KTH_CHUNK_ELEMENTS // num_rows
    else:
        width = min(
            -(-num_columns // _KTH_DEVICE_MIN_CHUNKS), _KTH_DEVICE_CHUNK_ELEMENTS // num_rows
        )
    width = max(1, min(width, num_columns))
    found = [first.new_empty(num_columns) for _ in positions]
    has_nan = torch.empty(num_columns, dtype=torch.bool, device=first.device)
    buffer = first.new_empty(width, num_rows)
    for start in range(0, num_columns, width):
        stop = min(start + width, num_columns)
        chunk = buffer[: stop - start]
        offset = 0
        for block in blocks:
            chunk[:, offset : offset + block.shape[0]] = block[:, start:stop].T
            offset += block.shape[0]
        for values, p in zip(found, positions):
            values[start:stop] = torch.kthvalue(chunk, p + 1, dim=1).values
        has_nan[start:stop] = torch.isnan(chunk.amax(dim=1))  # max propagates NaN
    return found, has_nan


def quantile_threshold(
    scores: Tensor | Sequence[Tensor], quantile: float, interpolation: str = "higher"
) -> Tensor:
    """Per-column ``(1 - quantile)`` quantile of ``scores`` ``[P, C]``; returns ``[C]``.

    Same value as ``torch.quantile(scores, 1 - quantile, dim=0,
    interpolation=interpolation)`` (NaN for a column holding a NaN), computed
    by selection, without a sort and without a size limit. float16/bfloat16
    scores give the float32 value and dtype of ``torch.quantile`` on their
    float32 upcast (a half-precision rank or interpolation picks the wrong row). ``scores`` may be a
    sequence of row blocks ``[P_i, C]`` (e.g. live rows and the queue), taken as
    if concatenated. The result carries no gradient: it is a stop-gradient target.
    """
    blocks = [scores] if isinstance(scores, Tensor) else list(scores)
    if not blocks or any(b.dim() != 2 or b.shape[1] != blocks[0].shape[1] for b in blocks):
        shapes = [tuple(b.shape) for b in blocks]
        raise ValueError(f"scores must be [P, C] blocks with equal C, got shapes {shapes}")
    num_rows = sum(b.shape[0] for b in blocks)
    if num_rows == 0:
        raise ValueError("scores must hold at least one row to define a quantile")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    blocks = [b.detach() for b in blocks]
    below, above, weight = _order_statistic_positions(
        num_rows, 1.0 - quantile, interpolation, blocks[0].dtype
    )
    positions = (below,) if above == below else (below, above)
    values, has_nan = _select_ascending(blocks, positions)
    wide = _at_least_float32(blocks[0].dtype)
    if interpolation in ("linear", "midpoint"):
        # Always lerp, as torch.quantile does, even when both ends coincide:
        # lerp(-inf, -inf, w) is NaN there, and we match it bit for bit.
        theta = torch.lerp(values[0].to(wide), values[-1].to(wide), weight)
    else:
        theta = values[0].to(wide)
    return theta.masked_fill(has_nan, float("nan"))


def out_of_range_targets(targets: Tensor, num_classes: int) -> Tensor:
    """Mask of class ids that are not valid: outside ``{0, 1}`` (binary) or ``[0, C)``.

    Callers exclude ``ignore_index`` rows themselves.
    """
    if num_classes == 1:
        return (targets != 0) & (targets != 1)
    return (targets < 0) | (targets >= num_classes)


def positive_columns(targets: Tensor, num_classes: int) -> Tensor:
    """Column whose positive each row is (binary: column 0 for target 1), or -1 for none."""
    if num_classes == 1:
        return torch.where(targets == 1, 0, -1)
    return targets


def positive_scores(
    scores: Tensor,
    targets: Tensor,
    weights: Tensor,
    num_classes: int,
    own: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Each row's score in its own class column: ``(score [n], class [n], weight [n])``.

    A row is a positive of at most one class (one-vs-rest), so per-positive
    terms cost ``O(n)`` rather than ``O(n * C)``. Rows that are no positive
    (binary target 0) keep their place with weight 0: selecting the positives
    out would need their count on the host, a device sync. ``own``, when
    given, is the own-class score already extracted (e.g. gathered with
    gradient while ``scores`` travelled detached).
    """
    column = positive_columns(targets, num_classes)
    cls = column.clamp(min=0)
    if own is None:
        own = scores.gather(1, cls[:, None]).squeeze(1)
    if num_classes == 1:
        weights = torch.where(column >= 0, weights, torch.zeros_like(weights))
    return own, cls, weights


def soft_recall_per_class(
    own_scores: Tensor,
    own_class: Tensor,
    weights: Tensor,
    threshold: Tensor,
    temperature: float,
) -> tuple[Tensor, Tensor]:
    """Weighted mean of ``sigmoid((s - theta_c) / tau)`` over each class's positives.

    Inputs are the positives from :func:`positive_scores`. Returns
    ``(soft_recall [C], weight_mass [C])``; a class with zero mass gets recall
    0 (the caller masks it as invalid). Computed in at least float32, so the
    masses (positive counts when weights are 1) stay exact in half precision.
    """
    weighted, mass = soft_recall_sums(own_scores, own_class, weights, threshold, temperature)
    return recall_from_sums(weighted, mass), mass


def soft_recall_sums(
    own_scores: Tensor,
    own_class: Tensor,
    weights: Tensor,
    threshold: Tensor,
    temperature: float,
) -> tuple[Tensor, Tensor]:
    """``(sum of w * sigmoid((s - theta_c) / tau) [C], sum of w [C])`` over each class's positives.

    The two sums behind :func:`soft_recall_per_class`: sums over disjoint sets of positives
    add up (the sharded mode adds every rank's with one ``all_reduce``).
    """
    threshold = threshold.to(_at_least_float32(threshold.dtype))
    recall_terms = torch.sigmoid((own_scores - threshold[own_class]) / temperature)
    w = weights.to(recall_terms.dtype)
    mass = torch.zeros_like(threshold).index_add(0, own_class, w)
    # where, not w * terms: a weight-0 row must add 0 even if its term is inf/NaN.
    terms = torch.where(w > 0, w * recall_terms, torch.zeros_like(recall_terms))
    weighted = torch.zeros_like(threshold).index_add(0, own_class, terms)
    return weighted, mass


def recall_from_sums(weighted: Tensor, mass: Tensor) -> Tensor:
    """Soft recall from :func:`soft_recall_sums` (0 where a class has no positive weight)."""
    return weighted / mass.clamp_min(torch.finfo(mass.dtype).tiny)


def soft_recall_loss(
    own_scores: Tensor,
    own_class: Tensor,
    weights: Tensor,
    threshold: Tensor,
    temperature: float,
) -> tuple[Tensor, Tensor]:
    """``(1 - soft recall [C], valid [C])``: a class is valid when its positives weigh > 0."""
    recall, mass = soft_recall_per_class(own_scores, own_class, weights, threshold, temperature)
    return 1.0 - recall, mass > 0


def recall_at_quantile_loss(
    scores: Tensor,
    targets: Tensor,
    quantile: float,
    temperature: float,
    *,
    weights: Tensor | None = None,
    extra: tuple[Tensor, Tensor, Tensor] | None = None,
    interpolation: str = "higher",
    ignore_index: int = -100,
    positives: str = "pool",
) -> tuple[Tensor, Tensor]:
    r"""Per-class ``1 - soft recall`` of the positives above each class's alert threshold.

    The loss of :class:`~imbalanced_losses.RecallAtQuantileLoss` as one pure
    function, without queue or gather. For class ``c``, ``theta_c`` is the
    ``(1 - quantile)`` quantile (``torch.quantile``'s ``interpolation``, no
    gradient) of column ``c`` over the rows of ``scores`` and of ``extra``, and

    .. math:: \text{loss}_c = 1 - \frac{\sum_{i \in P_c} w_i\,
              \sigma((s_{ic} - \theta_c)/\tau)}{\sum_{i \in P_c} w_i}

    Args:
        scores: ``[N, C]`` logits (``C == 1``: binary, positives have target 1).
        targets: ``[N]`` class ids; rows equal to ``ignore_index`` count nowhere.
        quantile: alert budget in (0, 1); must exceed each class's positive fraction.
        temperature: sigmoid width ``tau`` > 0.
        weights: ``[N]`` non-negative weights of the positives (never move ``theta``).
        extra: more rows ``(scores [M, C], targets [M], weights [M])`` without
            ignored targets, e.g. a memory queue: they move ``theta`` and, with
            ``positives="pool"``, count as positives too.
        positives: ``"pool"`` (every positive of ``scores`` and ``extra``) or
            ``"live"`` (only those of ``scores``).

    Returns:
        ``(per_class [C], valid [C] bool)``; ``per_class`` is meaningless where
        ``valid`` is False (no positive weight). ``per_class`` is in at least float32:
        float16/bfloat16 scores give the float32 answer on the same values.
    """
    num_classes = scores.shape[1]
    # Weights (and so the per-class masses, which count positives) in at least float32:
    # a float16 mass stops at 2,048 positives, a bfloat16 one at 256.
    wide = _at_least_float32(scores.dtype)
    if weights is None:
        weights = torch.ones(scores.shape[0], dtype=wide, device=scores.device)
    keep = targets.reshape(-1) != ignore_index
    rows = [(scores[keep], targets.reshape(-1)[keep].long(), weights[keep].to(wide))]
    if extra is not None:
        rows.append((extra[0].to(scores.dtype), extra[1].long(), extra[2].to(wide)))
    threshold = quantile_threshold([r[0] for r in rows], quantile, interpolation)
    counted = rows if positives == "pool" else rows[:1]
    parts = [positive_scores(s, t, w, num_classes) for s, t, w in counted]
    own, cls, w = (torch.cat(p) for p in zip(*parts))
    return soft_recall_loss(own, cls, w, threshold, temperature)


def reduce_per_class(
    per_class: Tensor, valid: Tensor, reduction: str, anchor: Tensor | None = None
) -> Tensor:
    """Reduce per-class losses over valid classes only.

    ``per_class`` must already be NaN-free where ``valid`` is False (it is
    masked here). With no valid class, ``mean``/``sum`` give a zero that is
    still connected to ``anchor``'s graph so DDP and ``backward()`` work.
    """
    if reduction == "none":
        return per_class.masked_fill(~valid, float("nan"))
    masked = torch.where(valid, per_class, torch.zeros_like(per_class))
    # Sum and class count in at least float32 (a bfloat16 count is inexact past 256 classes),
    # rounded to the input dtype once at the end.
    total = masked.sum(dtype=_at_least_float32(per_class.dtype))
    if reduction == "mean":
        total = total / valid.sum().clamp_min(1).to(total.dtype)
    total = total.to(per_class.dtype)
    if anchor is not None:
        total = total + anchor.sum() * 0.0
    return total
