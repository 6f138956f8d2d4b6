"""functional.quantile_threshold is torch.quantile(scores, 1 - q, dim=0, interpolation) bit for
bit (float32 and float64, ties, NaN, ±inf), and keeps working past torch.quantile's 2^24 rows."""

from __future__ import annotations

import math

import pytest
import torch
from _support import INTERPOLATIONS
from hypothesis import given
from hypothesis import strategies as st

from imbalanced_losses.functional import quantile_threshold

QUANTILES = st.one_of(
    st.sampled_from([0.5, 0.3, 0.1, 0.05, 0.01, 0.005, 0.001, 1e-4, 0.9, 0.995, 0.999]),
    st.floats(1e-6, 1 - 1e-6),
)


def assert_identical(got, expected):
    """Same dtype, shape, NaN positions, and equal values everywhere else."""
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert torch.equal(torch.isnan(got), torch.isnan(expected)), (got, expected)
    keep = ~torch.isnan(expected)
    assert torch.equal(got[keep], expected[keep]), (got, expected)


def torch_reference(scores, quantile, interpolation):
    return torch.quantile(scores, 1.0 - quantile, dim=0, interpolation=interpolation)


@given(
    rows=st.integers(1, 400),
    columns=st.integers(1, 4),
    quantile=QUANTILES,
    interpolation=st.sampled_from(INTERPOLATIONS),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    ties=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_equals_torch_quantile_on_finite_scores(
    rows, columns, quantile, interpolation, dtype, ties, seed
):
    gen = torch.Generator().manual_seed(seed)
    if ties:
        scores = torch.randint(-3, 4, (rows, columns), generator=gen).to(dtype)
    else:
        scores = torch.randn(rows, columns, generator=gen, dtype=dtype) * 10
    assert_identical(
        quantile_threshold(scores, quantile, interpolation),
        torch_reference(scores, quantile, interpolation),
    )


@given(
    rows=st.integers(1, 200),
    quantile=QUANTILES,
    interpolation=st.sampled_from(INTERPOLATIONS),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**31 - 1),
)
def test_equals_torch_quantile_with_nan_and_inf(rows, quantile, interpolation, dtype, seed):
    # Column 0 finite, column 1 with +inf/-inf mixed in, column 2 also holding a NaN.
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(rows, 3, generator=gen, dtype=dtype)
    special = torch.tensor([float("inf"), -float("inf")], dtype=dtype)
    pick = torch.randint(0, 2, (rows,), generator=gen)
    where = torch.rand(rows, generator=gen) < 0.3
    scores[:, 1] = torch.where(where, special[pick], scores[:, 1])
    scores[:, 2] = scores[:, 1]
    scores[torch.randint(0, rows, (1,), generator=gen), 2] = float("nan")
    assert_identical(
        quantile_threshold(scores, quantile, interpolation),
        torch_reference(scores, quantile, interpolation),
    )


@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
def test_all_infinite_column_matches_torch_quantile(interpolation):
    # torch.quantile's lerp turns inf - inf into NaN for linear/midpoint; "exactly what it
    # means for torch.quantile" includes that.
    inf = float("inf")
    for column in ([1.0, inf, inf, inf], [1.0, inf, inf, inf, inf], [-inf, -inf, -inf, 2.0, 3.0]):
        scores = torch.tensor(column)[:, None]
        for quantile in (0.25, 0.5, 0.4, 0.75):  # fractional and integer ranks
            assert_identical(
                quantile_threshold(scores, quantile, interpolation),
                torch_reference(scores, quantile, interpolation),
            )


@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nan_column_gives_nan_and_leaves_other_columns_alone(interpolation, dtype):
    scores = torch.randn(100, 2, generator=torch.Generator().manual_seed(0), dtype=dtype)
    scores[17, 1] = float("nan")
    got = quantile_threshold(scores, 0.1, interpolation)
    assert torch.isnan(got[1])
    assert torch.equal(got[0], torch_reference(scores[:, :1], 0.1, interpolation)[0])


def test_threshold_carries_no_gradient():
    scores = torch.randn(50, 2, dtype=torch.float64, requires_grad=True)
    assert not quantile_threshold(scores, 0.1, "linear").requires_grad


@pytest.mark.parametrize("rows", [1, 2, 3, 19, 20, 21, 199, 200, 201, 1000, 1001])
@pytest.mark.parametrize("quantile", [0.005, 0.05, 0.0501, 0.5, 0.95])
def test_row_counts_at_rank_boundaries(rows, quantile):
    # Sizes where q * (n - 1) falls on or next to an integer in float32 / float64.
    for dtype in (torch.float32, torch.float64):
        scores = torch.randn(rows, 2, generator=torch.Generator().manual_seed(rows), dtype=dtype)
        for interpolation in INTERPOLATIONS:
            assert_identical(
                quantile_threshold(scores, quantile, interpolation),
                torch_reference(scores, quantile, interpolation),
            )


def _torch_quantile_on_sorted(sorted_col, prob, interpolation):
    """torch.quantile's own algorithm (aten Sorting.cpp) applied to an already sorted column:
    the fractional rank prob * (n - 1) is computed in the column's dtype, floored / ceiled /
    rounded half-to-even, and linear/midpoint use torch.lerp."""
    n = sorted_col.numel()
    rank = torch.tensor(prob, dtype=sorted_col.dtype) * (n - 1)
    if interpolation == "lower":
        rank = rank.floor()
    elif interpolation == "higher":
        rank = rank.ceil()
    elif interpolation == "nearest":
        rank = rank.round()
    below = rank.long()
    value = sorted_col[below]
    if interpolation in ("linear", "midpoint"):
        weight = torch.full_like(rank, 0.5) if interpolation == "midpoint" else rank - below
        value = torch.lerp(value, sorted_col[rank.ceil().long()], weight)
    return value


def test_sorted_column_oracle_agrees_with_torch_quantile():
    # Validates the oracle used by the >2^24-row test on sizes torch.quantile accepts.
    gen = torch.Generator().manual_seed(1)
    for rows in (1, 2, 5, 999, 4097, 100_001):
        col = torch.randn(rows, generator=gen)
        for quantile in (0.005, 0.3, 0.5, 0.999):
            for interpolation in INTERPOLATIONS:
                assert torch.equal(
                    _torch_quantile_on_sorted(col.sort().values, 1 - quantile, interpolation),
                    torch.quantile(col, 1 - quantile, interpolation=interpolation),
                )


def test_more_than_2_pow_24_rows():
    # torch.quantile refuses this many rows; the library must not. n - 1 = 2^24 + 2^20 is exact
    # in float32, and the chosen quantiles put the rank where float32 and float64 agree (an exact
    # even rank near the top, a middle one, and a fractional one near the bottom so that
    # linear/midpoint really interpolate), so the expected order statistic is unambiguous.
    rows = 2**24 + 2**20 + 1
    col = torch.randn(rows, generator=torch.Generator().manual_seed(2))
    with pytest.raises(RuntimeError):
        torch.quantile(col, 0.5)
    sorted_col = col.sort().values
    scores = col[:, None]
    del col
    for quantile, interpolations in (
        (2.0**-8, ("higher", "linear")),
        (0.25, ("lower",)),
        (0.99, INTERPOLATIONS),
    ):
        exact_rank = (1 - quantile) * (rows - 1)
        rank32 = float(torch.tensor(1 - quantile, dtype=torch.float32) * (rows - 1))
        assert math.floor(exact_rank) == math.floor(rank32)
        assert math.ceil(exact_rank) == math.ceil(rank32)
        for interpolation in interpolations:
            got = quantile_threshold(scores, quantile, interpolation)
            expected = _torch_quantile_on_sorted(sorted_col, 1 - quantile, interpolation)
            assert got.shape == (1,)
            assert torch.equal(got[0], expected), (quantile, interpolation, got, expected)


def _split_rows(scores, cuts):
    """Row blocks of ``scores`` at ``cuts`` (empty blocks included), as live rows + queue."""
    edges = [0, *cuts, scores.shape[0]]
    return [scores[a:b] for a, b in zip(edges, edges[1:])]


@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
@pytest.mark.parametrize(
    ("quantile", "path"),
    [
        (0.01, "top"),
        (0.04, "top"),
        (0.0501, "quickselect"),
        (0.3, "quickselect"),
        (0.5, "quickselect"),
        (0.97, "quickselect"),
    ],
)
@pytest.mark.parametrize("columns", [1, 3, 7, 17])
def test_blocks_and_chunk_boundaries_match_torch_quantile(
    monkeypatch, interpolation, quantile, path, columns
):
    # Tiny chunk sizes put chunk boundaries inside every block and leave a short last chunk:
    # quickselect chunks of 3 columns (17 = 3+3+3+3+3+2), top-k row chunks of 16 * needed rows.
    from imbalanced_losses import functional

    rows = 401
    monkeypatch.setattr(functional, "_KTH_CHUNK_ELEMENTS", 3 * rows)
    monkeypatch.setattr(functional, "_TOPK_CHUNK_ROWS", 1)
    taken = []
    for name in ("_select_from_top", "_select_by_quickselect"):
        original = getattr(functional, name)
        monkeypatch.setattr(
            functional, name, lambda *a, _f=original, _n=name: taken.append(_n) or _f(*a)
        )
    gen = torch.Generator().manual_seed(columns * 1000 + int(quantile * 1e4))
    for dtype in (torch.float32, torch.float64):
        scores = torch.randn(rows, columns, generator=gen, dtype=dtype)
        scores[::5] = scores[::5].round()  # ties
        if columns > 2:  # a NaN column and a column with infinities, among finite ones
            scores[13, 1] = float("nan")
            scores[::7, 2] = float("inf")
            scores[1::11, 2] = -float("inf")
        for cuts in ([], [64], [0, 64], [64, 64, 400], [401]):
            got = quantile_threshold(_split_rows(scores, cuts), quantile, interpolation)
            assert_identical(got, torch_reference(scores, quantile, interpolation))
    expected = "_select_from_top" if path == "top" else "_select_by_quickselect"
    assert set(taken) == {expected}
