"""Exact per-class quantile thresholds over rows that stay on their rank (sharded mode).

Why: gathering every rank's rows to find each class's threshold costs ``W·N·C`` numbers per
step, yet a threshold is an order statistic, and an order statistic can be found from counts
alone. Each float maps to an int64 *key* whose order is the float order (the IEEE-754 bit trick:
negative floats have their magnitude bits flipped). The k-th smallest key is then picked one
``bits``-bit digit at a time, most significant first: each round every rank counts, per class,
its rows that match the prefix found so far by their next digit, one ``all_reduce`` (SUM) adds
the ``[C, 2**bits]`` counts, and every rank walks the same cumulative counts to the same digit.
After ``key width / bits`` rounds (float32: 32 bits, float64: 64) every rank holds the k-th key
exactly. The (k+1)-th, which "linear" and "midpoint" need, is the same key when the counts say
it repeats, else the smallest key above it: one ``all_reduce`` (MIN).

Traffic depends on C and the dtype only, never on N or W, and all classes go together (no
Python loop per class, one host read in all: the global row count, which fixes the positions).
The result equals :func:`~imbalanced_losses.functional.quantile_threshold` on the rank-ordered
concatenation of every rank's rows: its rank arithmetic is reused, a column holding a NaN gives
NaN, ±inf are ordinary keys, and float16/bfloat16 are ranked on their exact float32 upcast.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from numbers import Real

import torch
from torch import Tensor

from imbalanced_losses._distributed import Group, all_reduce_min, all_reduce_sum
from imbalanced_losses.functional import (
    INTERPOLATIONS,
    _at_least_float32,
    _order_statistic_positions,
)

RADIX_BITS: tuple[int, ...] = (1, 2, 4, 8, 16)
_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1


def _key_width(dtype: torch.dtype) -> int:
    return 64 if dtype == torch.float64 else 32


def ordered_keys(scores: Tensor) -> Tensor:
    """int64 keys whose signed order is the float order (-0.0 just below +0.0, NaN on top).

    float64 uses its 64 bits as they are; narrower floats their exact float32 upcast's 32 bits
    (sign-extended). Flipping every bit but the sign of a negative float reverses the order of
    the negatives (a larger magnitude has larger bits) and keeps them below the positives.
    """
    width = _key_width(scores.dtype)
    if width == 64:
        bits = scores.view(torch.int64)
    else:
        bits = scores.to(torch.float32).view(torch.int32).to(torch.int64)
    magnitude = (1 << (width - 1)) - 1
    keys = bits ^ ((bits >> (width - 1)) & magnitude)
    return torch.where(torch.isnan(scores), magnitude, keys)


def keys_to_floats(keys: Tensor, dtype: torch.dtype) -> Tensor:
    """Inverse of :func:`ordered_keys` (float32 for dtypes narrower than float64)."""
    width = _key_width(dtype)
    bits = keys ^ ((keys >> (width - 1)) & ((1 << (width - 1)) - 1))
    if width == 64:
        return bits.view(torch.float64)
    return bits.to(torch.int32).view(torch.float32)


def _unsigned(keys: Tensor, width: int) -> Tensor:
    """The keys' bit patterns in unsigned order (digits are read off these).

    32-bit keys stay in int32 (their flipped sign bit wraps, digits only read bits): half the
    memory traffic of int64 in every round.
    """
    if width == 64:
        return keys ^ _INT64_MIN
    return keys.to(torch.int32) ^ -(1 << 31)


def _signed(prefix: Tensor, width: int) -> Tensor:
    return prefix ^ _INT64_MIN if width == 64 else prefix - (1 << 31)


def _check_locally(
    blocks: Sequence[Tensor], quantile: float, interpolation: str, bits: int
) -> str | None:
    """This rank's complaint about its arguments, if any (raised on every rank after agreeing).

    Every check that could fail on one rank alone happens here, before the agreement
    collective: an error raised after it on one rank would leave the others waiting in the
    next round.
    """
    if not blocks or any(b.dim() != 2 or b.shape[1] != blocks[0].shape[1] for b in blocks):
        shapes = [tuple(b.shape) for b in blocks]
        return f"scores must be [n, C] blocks with equal C, got shapes {shapes}"
    dtypes = {b.dtype for b in blocks}
    if len(dtypes) != 1 or not blocks[0].is_floating_point():
        return f"scores must be floating point blocks of one dtype, got {sorted(map(str, dtypes))}"
    devices = {b.device for b in blocks}
    if len(devices) != 1:
        return f"scores must be blocks on one device, got {sorted(map(str, devices))}"
    if blocks[0].device.type == "meta":
        return "scores must hold data, got blocks on the meta device"
    if not isinstance(quantile, Real) or isinstance(quantile, bool):
        return f"quantile must be a real number in [0, 1], got {quantile!r}"
    if not 0.0 <= quantile <= 1.0:
        return f"quantile must be in [0, 1], got {quantile!r}"
    if interpolation not in INTERPOLATIONS:
        return f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}"
    if bits not in RADIX_BITS:
        return f"bits must be one of {RADIX_BITS}, got {bits!r}"
    return None


_QUANTILE_PARTS = 4  # 16-bit parts of the float64 bits: exact in int64 sums and squares


def _quantile_parts(quantile: float) -> list[int]:
    """The exact float64 bits of ``quantile`` as four 16-bit parts (two ranks whose quantiles
    differ in the last bit differ here; a scaled ``int(quantile * 2**20)`` would not)."""
    (bits,) = struct.unpack("<Q", struct.pack("<d", float(quantile)))
    return [(bits >> (16 * i)) & 0xFFFF for i in range(_QUANTILE_PARTS)]


def _agree(
    blocks: Sequence[Tensor], quantile: float, interpolation: str, bits: int, group: Group
) -> int:
    """Check the arguments on every rank at once; return the global row count.

    One fixed-size SUM: each rank adds its row count, a failure flag, and the settings that must
    match together with their squares (they all match iff ``W * sum(x^2) == sum(x)^2``), so a bad
    argument on one rank raises on every rank instead of hanging the others in the next round.
    """
    problem = _check_locally(blocks, quantile, interpolation, bits)
    rows = 0 if problem else sum(b.shape[0] for b in blocks)
    shared = [0] * (4 + _QUANTILE_PARTS)
    if problem is None:
        shared = [
            blocks[0].shape[1],
            _key_width(blocks[0].dtype),
            INTERPOLATIONS.index(interpolation),
            bits,
            *_quantile_parts(quantile),
        ]
    local = torch.tensor(
        [1, int(problem is not None), rows, *shared, *(x * x for x in shared)], dtype=torch.int64
    )
    size, failed, total, *sums = all_reduce_sum(local, group).tolist()  # the one host read
    if failed:
        raise ValueError(problem or f"{failed} other rank(s) of the group rejected their scores")
    names: tuple[str, ...] = ("columns", "key width (float64 vs narrower)", "interpolation", "bits")
    names = names + ("quantile",) * _QUANTILE_PARTS
    half = len(shared)
    for name, s, sq in zip(names, sums[:half], sums[half:]):
        if size * sq != s * s:
            raise ValueError(f"ranks disagree on the {name} of the sharded threshold")
    if total == 0:
        raise ValueError("scores must hold at least one row (on some rank) to define a quantile")
    return int(total)


def sharded_quantile_threshold(
    scores: Tensor | Sequence[Tensor],
    quantile: float,
    interpolation: str = "higher",
    *,
    group: Group = None,
    bits: int = 8,
    total: int | None = None,
) -> Tensor:
    """Per-column ``(1 - quantile)`` quantile of the union of every rank's rows; returns ``[C]``.

    ``scores``: this rank's ``[n, C]`` rows (``n`` may differ by rank, and be 0), or a sequence
    of such blocks (e.g. live rows and the queue shard). Every rank of ``group`` must call it
    with the same ``C``, dtype width, ``quantile``, ``interpolation`` and ``bits``; every rank
    returns the same value, that of ``functional.quantile_threshold`` on the rank-ordered
    concatenation of all rows. Collectives (none without a group of 2+ ranks): one check (19
    int64: 152 bytes), ``key width / bits`` rounds of ``C * 2**bits`` counts (int32 below 2**31
    global rows; the first round also carries C NaN counts), plus ``C`` int64 minima for
    "linear"/"midpoint" when the position is fractional. No gradient: a stop-gradient target.

    ``total``: the global row count, for a caller whose own agreement already established it
    and every argument above (the sharded loss: its metadata exchange); the check collective
    and its host read are then skipped, so the selection adds no host sync.
    """
    blocks = [scores] if isinstance(scores, Tensor) else list(scores)
    if total is None:
        total = _agree(blocks, quantile, interpolation, bits, group)
    elif total <= 0:
        raise ValueError(f"total must be the global row count (> 0), got {total!r}")
    dtype, device, columns = blocks[0].dtype, blocks[0].device, blocks[0].shape[1]
    width = _key_width(dtype)
    below, above, weight = _order_statistic_positions(total, 1.0 - quantile, interpolation, dtype)

    keys = [ordered_keys(b.detach()) for b in blocks]
    codes = [_unsigned(k, width) for k in keys]
    bins = 1 << bits
    dump = columns * bins  # the slot that counts the rows off the prefix, dropped before sending
    slot_dtype = torch.int32 if dump < (1 << 31) - 1 else torch.int64
    bin_of_column = torch.arange(columns, dtype=slot_dtype, device=device) * bins
    ones = torch.ones(max(c.numel() for c in codes), dtype=torch.int64, device=device)
    alive: list[Tensor | None] = [None] * len(codes)  # rows whose digits so far are the prefix
    count_dtype = torch.int32 if total < (1 << 31) else torch.int64
    prefix = torch.zeros(columns, dtype=torch.int64, device=device)  # digits found so far
    rank = torch.full((columns,), below, dtype=torch.int64, device=device)  # within the prefix
    for step in range(width // bits):
        shift = width - bits * (step + 1)
        local = torch.zeros(dump + 1, dtype=torch.int64, device=device)
        digits = []
        for code, live in zip(codes, alive):
            digits.append((code >> shift) & (bins - 1))
            slot = digits[-1] + bin_of_column
            if live is not None:
                slot.masked_fill_(~live, dump)
            local.index_add_(0, slot.flatten(), ones[: slot.numel()])
        local = local[:dump].view(columns, bins)
        if step == 0:  # whether a rank holds a NaN in a column rides along with the first round
            nans = torch.zeros(columns, dtype=torch.int64, device=device)
            for b in blocks:
                if b.shape[0]:
                    nans += torch.isnan(b.detach().amax(0)).long()  # max propagates NaN
            local = torch.cat([local, nans[:, None]], 1)
        counts = all_reduce_sum(local.to(count_dtype), group).long()
        if step == 0:
            has_nan, counts = counts[:, -1] > 0, counts[:, :-1]
        below_bin = counts.cumsum(1) - counts  # rows in lower bins
        digit = ((below_bin + counts) <= rank[:, None]).sum(1).clamp_max(bins - 1)
        rank = rank - below_bin.gather(1, digit[:, None]).squeeze(1)
        ties = counts.gather(1, digit[:, None]).squeeze(1)  # rows with this prefix
        prefix = (prefix << bits) | digit
        chosen = digit.to(codes[0].dtype)
        alive = [d == chosen if a is None else a & (d == chosen) for a, d in zip(alive, digits)]
    low_key = _signed(prefix, width)
    high_key = low_key
    if above != below:
        # The next order statistic repeats this key while ties remain, else is the least key above.
        least_above = torch.full((columns,), _INT64_MAX, dtype=torch.int64, device=device)
        for k in keys:
            if k.shape[0]:
                above_low = torch.where(k > low_key, k, _INT64_MAX)
                least_above = torch.minimum(least_above, above_low.amin(0))
        high_key = torch.where(rank + 1 < ties, low_key, all_reduce_min(least_above, group))
    wide = _at_least_float32(dtype)
    low = keys_to_floats(low_key, dtype).to(wide)
    if interpolation in ("linear", "midpoint"):
        theta = torch.lerp(low, keys_to_floats(high_key, dtype).to(wide), weight)
    else:
        theta = low
    return theta.masked_fill(has_nan, float("nan"))


__all__ = ["sharded_quantile_threshold", "ordered_keys", "keys_to_floats"]
