"""The sharded threshold on real gloo ranks (1-4): every rank returns exactly what
``functional.quantile_threshold`` gives on the rank-ordered concatenation of all ranks' rows, in
every interpolation, float32/float64/float16, with uneven and empty ranks, ties, duplicates, ±0,
±inf, NaN and quantiles at and near 0 and 1; the bytes per call depend on C and the dtype only;
bad or disagreeing input raises on every rank instead of hanging."""

from __future__ import annotations

import math

import pytest
import torch

from imbalanced_losses import _distributed
from imbalanced_losses._sharded_select import sharded_quantile_threshold
from imbalanced_losses.functional import INTERPOLATIONS, quantile_threshold
from imbalanced_losses.testing import run_ranks

QUANTILES = (0.0, 1e-6, 1e-3, 0.3, 0.5, 0.999, 1 - 1e-6, 1.0)
CHECK_BYTES = 152  # the agreement all_reduce: 19 int64


def _column_kinds(rows: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Columns that each stress one part of the selection (float64; cast per case)."""
    randn = torch.randn(rows, generator=gen, dtype=torch.float64) * 1e3
    randn[::5] = 0.0
    randn[1::5] = -0.0
    ties = torch.randint(-3, 4, (rows,), generator=gen).double()
    negatives = -torch.rand(rows, generator=gen, dtype=torch.float64) * 1e-3 - 1e-40
    negatives[::7] = float("-inf")
    negatives[3::11] = float("inf")
    with_nan = torch.randn(rows, generator=gen, dtype=torch.float64)
    with_nan[rows // 2] = float("nan")
    constant = torch.full((rows,), -2.5, dtype=torch.float64)
    mostly_inf = torch.full((rows,), float("-inf"), dtype=torch.float64)
    mostly_inf[::6] = torch.randn(len(mostly_inf[::6]), generator=gen, dtype=torch.float64)
    tiny = torch.randn(rows, generator=gen, dtype=torch.float64) * 1e-310  # float32: ±0, subnormal
    return [randn, ties, negatives, with_nan, constant, mostly_inf, tiny]


def _cases(world_size: int) -> list[tuple[torch.Tensor, list[int]]]:
    """``(global rows [N, C], per-rank row counts)``; the same list on every rank and the parent."""
    gen = torch.Generator().manual_seed(19)
    uneven = [(7 * r + 3) % 11 for r in range(world_size)]
    uneven[0] = 0  # an empty rank (W == 1: all rows on it come from the last pattern)
    uneven[-1] += 1
    on_last = [0] * (world_size - 1) + [13]
    cases = []
    for dtype in (torch.float32, torch.float64):
        for sizes in (uneven, on_last):
            rows = sum(sizes)
            kinds = _column_kinds(rows, gen)
            cases.append((torch.stack(kinds, 1).to(dtype), sizes))  # C = 7
            cases.append((kinds[0][:, None].to(dtype), sizes))  # C = 1
            cases.append((torch.stack(kinds[1:3], 1).to(dtype), sizes))  # negatives and ties
    half = torch.randint(-20, 20, (sum(uneven), 2), generator=gen).to(torch.float16) / 8
    cases.append((half, uneven))
    return cases


def _my_rows(rank: int, rows: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    start = sum(sizes[:rank])
    return rows[start : start + sizes[rank]]


def _thresholds_on_rank(rank: int, world_size: int) -> list[dict]:
    out = []
    for rows, sizes in _cases(world_size):
        mine = _my_rows(rank, rows, sizes)
        for quantile in QUANTILES:
            for interpolation in INTERPOLATIONS:
                _distributed.reset_traffic()
                # Live rows and a queue shard as two blocks, as the sharded loss will pass them.
                half = mine.shape[0] // 2
                theta = sharded_quantile_threshold(
                    [mine[:half], mine[half:]], quantile, interpolation
                )
                traffic = _distributed.traffic()
                out.append({"theta": theta, "bytes": list(traffic.recent)})
    return out


def _expected_bytes(
    columns: int, dtype: torch.dtype, fractional: bool, world_size: int
) -> list[int]:
    """One check, 4 (float64: 8) rounds of C x 256 int32 counts (+ C NaN counts), C int64 minima."""
    if world_size == 1:
        return []
    rounds = 8 if dtype == torch.float64 else 4
    counts = [4 * columns * 257] + [4 * columns * 256] * (rounds - 1)
    return [CHECK_BYTES, *counts, *([8 * columns] if fractional else [])]


def _is_fractional(num_rows: int, quantile: float, interpolation: str, dtype: torch.dtype) -> bool:
    """Whether torch.quantile's rank ``(1 - q)(n - 1)``, in at least float32, is not whole."""
    if interpolation not in ("linear", "midpoint"):
        return False
    wide = torch.promote_types(dtype, torch.float32)
    position = torch.tensor(1.0 - quantile, dtype=wide) * (num_rows - 1)
    return bool(position != position.floor()) and int(position.ceil()) <= num_rows - 1


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_every_rank_gets_the_threshold_of_the_concatenated_rows(world_size):
    results = run_ranks(_thresholds_on_rank, world_size, args=(world_size,), timeout_s=300)
    expected = []
    for rows, _ in _cases(world_size):
        for quantile in QUANTILES:
            for interpolation in INTERPOLATIONS:
                theta = quantile_threshold(rows, quantile, interpolation)
                fractional = _is_fractional(rows.shape[0], quantile, interpolation, rows.dtype)
                traffic = _expected_bytes(rows.shape[1], rows.dtype, fractional, world_size)
                expected.append((theta, traffic, (rows.dtype, rows.shape, quantile, interpolation)))
    for rank, got in enumerate(results):
        assert len(got) == len(expected)
        for out, (theta, traffic, case) in zip(got, expected):
            assert out["theta"].dtype == theta.dtype, (rank, case)
            torch.testing.assert_close(
                out["theta"], theta, rtol=0, atol=0, equal_nan=True, msg=f"rank {rank} {case}"
            )
            assert out["bytes"] == traffic, (rank, case, out["bytes"])


def _bad_input_on_rank(rank: int) -> list[str | None]:
    """Each bad call, made on one rank or on all, must raise on every rank (and not hang)."""
    messages: list[str | None] = []
    ok = torch.randn(3 + rank, 2)
    calls = [
        lambda: sharded_quantile_threshold(torch.randn(4, 2 + (rank == 1)), 0.1),
        lambda: sharded_quantile_threshold(ok, 1.5 if rank == 2 else 0.1),
        lambda: sharded_quantile_threshold(ok.double() if rank == 0 else ok, 0.1),
        lambda: sharded_quantile_threshold(ok, 0.1, "linear" if rank == 1 else "higher"),
        lambda: sharded_quantile_threshold(torch.empty(0, 2), 0.1),  # a class with no rows
        lambda: sharded_quantile_threshold(ok, 0.1, bits=3),
        # Quantiles one float64 step apart (once equal as int(q * 2**20)) select differently.
        lambda: sharded_quantile_threshold(ok, math.nextafter(0.3, 1.0) if rank == 1 else 0.3),
        lambda: sharded_quantile_threshold(ok, 0.3 + 1e-7 if rank == 2 else 0.3),
        # Blocks on two devices fail on this rank alone: it must say so before the collective.
        lambda: sharded_quantile_threshold(
            [ok, torch.empty(1, 2, device="meta")] if rank == 0 else ok, 0.1
        ),
        lambda: sharded_quantile_threshold(torch.empty(3, 2, device="meta") if rank else ok, 0.1),
    ]
    for call in calls:
        try:
            call()
            messages.append(None)
        except ValueError as exc:
            messages.append(str(exc))
    # The group still works after every refusal: one good call, all ranks agree.
    messages.append(str(sharded_quantile_threshold(ok, 0.5).tolist()))
    return messages


def test_bad_or_disagreeing_input_raises_on_every_rank_and_leaves_the_group_usable():
    results = run_ranks(_bad_input_on_rank, 3, timeout_s=300)
    words = ["columns", "quantile", "key width", "interpolation", "at least one row", "bits"]
    words += ["quantile", "quantile", "one device", "meta device"]
    for rank, messages in enumerate(results):
        for word, message in zip(words, messages):
            assert message is not None, f"rank {rank}: no error for the {word} case"
            assert word in message or "other rank" in message, (rank, word, message)
        assert messages[-1] == results[0][-1]
    # The rank that saw the bad quantile names the value it got.
    assert "1.5" in results[2][1]
