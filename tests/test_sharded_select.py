"""The sharded threshold in one process (no process group): the ordered float keys keep the
float order and invert exactly, and the radix select over row blocks equals
``functional.quantile_threshold`` of their concatenation, bit for bit, for any radix width.
(Several ranks: ddp_tests/test_sharded_select.py.)"""

from __future__ import annotations

import math

import pytest
import torch
from _support import INTERPOLATIONS
from hypothesis import given, settings
from hypothesis import strategies as st

from imbalanced_losses import _distributed
from imbalanced_losses._sharded_select import (
    keys_to_floats,
    ordered_keys,
    sharded_quantile_threshold,
)
from imbalanced_losses.functional import quantile_threshold

FLOATS = st.floats(allow_nan=False, allow_infinity=True, allow_subnormal=True)
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def assert_identical(got, expected):
    assert got.dtype == expected.dtype and got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)


@given(values=st.lists(FLOATS, min_size=2, max_size=40), dtype=st.sampled_from(sorted(DTYPES)))
def test_ordered_keys_sort_like_the_floats_and_invert_exactly(values, dtype):
    x = torch.tensor(values, dtype=torch.float64).to(DTYPES[dtype])
    keys = ordered_keys(x)
    order = torch.argsort(keys, stable=True)
    assert torch.equal(x[order], torch.sort(x, stable=True).values)  # -0.0 == 0.0 here
    bits = torch.int64 if x.dtype == torch.float64 else torch.int32
    assert torch.equal(keys_to_floats(keys, x.dtype).view(bits), x.view(bits))  # -0.0 stays -0.0


def test_negative_floats_get_smaller_keys_the_larger_their_magnitude():
    for dtype in DTYPES.values():
        x = torch.tensor([-math.inf, -1e30, -2.0, -1.0, -1e-30, -0.0, 0.0, 1e-30, 1.0], dtype=dtype)
        keys = ordered_keys(x)
        assert bool((keys[1:] > keys[:-1]).all()), (dtype, keys)
        assert bool((ordered_keys(torch.tensor([math.nan], dtype=dtype)) > keys.max()).all())


@settings(deadline=None, max_examples=150)
@given(
    sizes=st.lists(st.integers(0, 30), min_size=1, max_size=4).filter(lambda s: sum(s) > 0),
    columns=st.integers(1, 3),
    quantile=st.one_of(st.sampled_from([0.0, 1e-6, 1e-3, 0.5, 0.999, 1.0]), st.floats(0, 1)),
    interpolation=st.sampled_from(INTERPOLATIONS),
    dtype=st.sampled_from(["float32", "float64", "float16", "bfloat16"]),
    ties=st.booleans(),
    special=st.sampled_from(["none", "inf", "nan", "negative"]),
    bits=st.sampled_from([4, 8, 16]),
    seed=st.integers(0, 2**31 - 1),
)
def test_radix_select_over_blocks_equals_the_threshold_of_their_concatenation(
    sizes, columns, quantile, interpolation, dtype, ties, special, bits, seed
):
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(sum(sizes), columns, generator=gen, dtype=torch.float64)
    if ties:
        rows = rows.mul(2).round()
    if special == "inf":
        rows[torch.rand(rows.shape, generator=gen) < 0.2] = math.inf
        rows[torch.rand(rows.shape, generator=gen) < 0.2] = -math.inf
    elif special == "nan":
        rows[0, -1] = math.nan
    elif special == "negative":
        rows = -rows.abs() - 1e-3
    rows = rows.to(getattr(torch, dtype))
    blocks = list(rows.split(sizes))
    got = sharded_quantile_threshold(blocks, quantile, interpolation, bits=bits)
    assert_identical(got, quantile_threshold(rows, quantile, interpolation))


def test_without_a_process_group_nothing_is_sent_and_no_gradient_flows():
    scores = torch.randn(50, 3, dtype=torch.float64, requires_grad=True)
    _distributed.reset_traffic()
    theta = sharded_quantile_threshold(scores, 0.1, "linear")
    assert _distributed.traffic().calls == 0 and _distributed.traffic().bytes == 0
    assert not theta.requires_grad
    assert_identical(theta, quantile_threshold(scores, 0.1, "linear"))


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (lambda: sharded_quantile_threshold(torch.randn(4), 0.1), ["[n, C]", "(4,)"]),
        (lambda: sharded_quantile_threshold(torch.ones(4, 2, dtype=torch.long), 0.1), ["floating"]),
        (lambda: sharded_quantile_threshold(torch.randn(4, 2), -0.5), ["quantile", "-0.5"]),
        (
            lambda: sharded_quantile_threshold(torch.randn(4, 2), 0.1, "mean"),
            ["interpolation", "'mean'"],
        ),
        (lambda: sharded_quantile_threshold(torch.randn(4, 2), 0.1, bits=5), ["bits", "5"]),
        (lambda: sharded_quantile_threshold(torch.empty(0, 2), 0.1), ["at least one row"]),
        (lambda: sharded_quantile_threshold([], 0.1), ["[n, C]"]),
    ],
)
def test_bad_input_names_the_argument_and_the_value(call, words):
    with pytest.raises(ValueError) as info:
        call()
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_blocks_on_two_devices_are_refused_before_any_collective():
    with pytest.raises(ValueError, match="one device"):
        sharded_quantile_threshold([torch.randn(3, 2), torch.empty(1, 2, device="meta")], 0.1)
    with pytest.raises(ValueError, match="meta device"):
        sharded_quantile_threshold(torch.empty(3, 2, device="meta"), 0.1)


@pytest.mark.parametrize("quantile", [torch.tensor(0.1), "0.1", True])
def test_a_quantile_that_is_not_a_real_number_is_refused_by_name(quantile):
    with pytest.raises(ValueError, match="quantile must be a real number"):
        sharded_quantile_threshold(torch.randn(3, 2), quantile)
