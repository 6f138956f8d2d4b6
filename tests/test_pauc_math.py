"""The PAUC math (``_pauc_math``) and its tiled pair kernel (``_pair_tiles``).

Three independent oracles: values frozen from the reference library (imbalanced-losses 0.6.0,
``scripts/freeze_pauc_reference.py``), our plain float64 reference
(``imbalanced_losses.testing.reference.pauc``) and ``torch.quantile`` / the dense pair matrix.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from imbalanced_losses._pair_tiles import pair_sigmoid_row_sums
from imbalanced_losses._pauc_math import (
    PAUCOptions,
    grad_pos_count,
    masked_column_quantiles,
    pauc_per_class,
    quantile_levels,
)
from imbalanced_losses.functional import INTERPOLATIONS, reduce_per_class
from imbalanced_losses.testing import SyncCounter
from imbalanced_losses.testing._host_syncs import DEVICE_TO_HOST
from imbalanced_losses.testing.reference.pauc import PlainPAUCLoss, plain_pauc_per_class

FROZEN = json.loads((Path(__file__).parent / "data" / "pauc_reference_0_6_0.json").read_text())
REPO = Path(__file__).resolve().parents[1]
TOL = {"rtol": 1e-9, "atol": 1e-9}


def _tensor(values: list[Any]) -> torch.Tensor:
    return torch.tensor([math.nan if v is None else v for v in values], dtype=torch.float64)


def _options(frozen: dict[str, Any]) -> PAUCOptions:
    keys = (
        "alpha",
        "beta",
        "surrogate",
        "n_knots",
        "tau_scale",
        "pos_numerator",
        "budget_basis",
        "temperature",
    )
    return PAUCOptions(
        **{k: frozen[k] for k in keys}, interpolation=frozen["quantile_interpolation"]
    )


def _replay(case: dict[str, Any], tile_elements: int | None) -> None:
    """Run the frozen steps through our math, pooled by the plain reference's queue."""
    scenario = FROZEN["scenarios"][case["scenario"]]
    num_classes = scenario["num_classes"]
    options = _options(case["options"])
    reduction = case["options"]["reduction"]
    queue = PlainPAUCLoss(num_classes, queue_size=scenario["queue_size"])
    warned = False
    for index, (step, expected) in enumerate(zip(scenario["steps"], case["steps"])):
        where = f"{case['scenario']} {case['options']} step {index}"
        logits = torch.tensor(step["logits"], dtype=torch.float64, requires_grad=True)
        targets = torch.tensor(step["targets"])
        n = logits.shape[0]
        iid = torch.tensor(step.get("iid_mask", [True] * n))
        weights = torch.tensor(step.get("sample_weight", [1.0] * n), dtype=torch.float64)
        scores, pooled_t, pooled_w, pooled_iid, live = queue.pool(logits, targets, iid, weights)
        result = pauc_per_class(
            scores,
            pooled_t,
            pooled_w,
            pooled_iid,
            live,
            options,
            diagnostics=True,
            tile_elements=tile_elements,
        )
        queue.enqueue(logits, targets, iid, weights)
        loss = reduce_per_class(result.loss, result.valid, reduction, anchor=logits)
        per_class = result.loss.masked_fill(~result.valid, math.nan)
        assert result.valid.tolist() == expected["valid"], where
        torch.testing.assert_close(
            per_class, _tensor(expected["per_class"]), **TOL, equal_nan=True, msg=where
        )
        torch.testing.assert_close(
            loss.detach().reshape(-1), _tensor(expected["loss"]), **TOL, equal_nan=True
        )
        assert result.diagnostics is not None
        diag = dict(result.diagnostics, grad_pos_count=grad_pos_count(targets, num_classes))
        assert sorted(diag) == sorted(expected["diagnostics"]), where
        for key, value in diag.items():
            want = expected["diagnostics"][key]
            if key.endswith("count"):
                assert value.tolist() == want, f"{where}: {key}"
            else:
                torch.testing.assert_close(
                    value, _tensor(want), **TOL, equal_nan=True, msg=f"{where}: {key}"
                )
        total = loss if reduction != "none" else (loss[result.valid].sum() + logits.sum() * 0.0)
        total.backward()
        grad = logits.grad if logits.grad is not None else torch.zeros_like(logits)
        torch.testing.assert_close(grad.reshape(-1), _tensor(expected["grad"]), **TOL, msg=where)
        fires = bool(result.degenerate.any()) and not warned
        warned = warned or fires
        assert fires == expected["dispersion_warning"], where


def _case_id(case: dict[str, Any]) -> str:
    o = case["options"]
    return "-".join(
        [case["scenario"], o["surrogate"], o["budget_basis"], o["tau_scale"], o["pos_numerator"],
         o["quantile_interpolation"], o["reduction"]]
    )  # fmt: skip


@pytest.mark.parametrize("case", FROZEN["cases"], ids=_case_id)
def test_values_gradients_and_diagnostics_equal_the_frozen_reference_library(
    case: dict[str, Any],
) -> None:
    _replay(case, tile_elements=None)


@pytest.mark.parametrize(
    "case", [c for c in FROZEN["cases"] if c["options"]["surrogate"] == "pairwise"], ids=_case_id
)
def test_pairwise_tiles_smaller_than_the_pool_still_equal_the_frozen_reference(
    case: dict[str, Any],
) -> None:
    _replay(case, tile_elements=5)


@pytest.mark.parametrize("case", FROZEN["cases"], ids=_case_id)
def test_the_plain_reference_loss_equals_the_frozen_reference_library(case: dict[str, Any]) -> None:
    """The plain reference is an oracle for later tests: it must match the library too."""
    scenario = FROZEN["scenarios"][case["scenario"]]
    options = {k: v for k, v in case["options"].items() if k != "quantile_interpolation"}
    options["interpolation"] = case["options"]["quantile_interpolation"]
    reduction = options.pop("reduction")
    plain = PlainPAUCLoss(
        scenario["num_classes"], queue_size=scenario["queue_size"], reduction=reduction, **options
    )
    for index, (step, expected) in enumerate(zip(scenario["steps"], case["steps"])):
        where = f"{_case_id(case)} step {index}"
        logits = torch.tensor(step["logits"], dtype=torch.float64, requires_grad=True)
        iid = torch.tensor(step["iid_mask"]) if "iid_mask" in step else None
        weight = step.get("sample_weight")
        weight = None if weight is None else torch.tensor(weight, dtype=torch.float64)
        loss, per_class, valid = plain(
            logits,
            torch.tensor(step["targets"]),
            iid_mask=iid,
            sample_weight=weight,
            return_per_class=True,
        )
        diag = plain.diagnostics
        assert valid.tolist() == expected["valid"], where
        torch.testing.assert_close(
            loss.detach().reshape(-1), _tensor(expected["loss"]), **TOL, equal_nan=True, msg=where
        )
        torch.testing.assert_close(
            per_class.detach(), _tensor(expected["per_class"]), **TOL, equal_nan=True, msg=where
        )
        for key, value in diag.items():
            want = expected["diagnostics"][key]
            if key.endswith("count"):
                assert value.tolist() == want, f"{where}: {key}"
            else:
                torch.testing.assert_close(value, _tensor(want), **TOL, equal_nan=True, msg=key)
        total = loss if reduction != "none" else loss[valid].sum() + logits.sum() * 0.0
        total.backward()
        assert logits.grad is not None
        torch.testing.assert_close(
            logits.grad.reshape(-1), _tensor(expected["grad"]), **TOL, msg=where
        )


def test_the_frozen_grid_covers_every_option_value() -> None:
    seen: dict[str, set[Any]] = {}
    for case in FROZEN["cases"]:
        for key, value in case["options"].items():
            seen.setdefault(key, set()).add(value)
    assert seen["quantile_interpolation"] == set(INTERPOLATIONS)
    assert seen["surrogate"] == {"trapezoid", "pairwise"}
    assert seen["budget_basis"] == {"fpr", "population"}
    assert seen["tau_scale"] == {"iqr", "band"}
    assert seen["pos_numerator"] == {"pool", "live"}
    assert seen["reduction"] == {"mean", "sum", "none"}
    steps = [s for c in FROZEN["cases"] for s in c["steps"]]
    assert any(not all(s["valid"]) for s in steps) and any(s["dispersion_warning"] for s in steps)


# --- our plain float64 reference ------------------------------------------------------------

OPTION_STRATEGY = st.fixed_dictionaries(
    {
        "band": st.sampled_from([(0.0, 0.3), (0.05, 0.4), (0.0, 0.005), (0.1, 0.9), (1 / 3, 0.9)]),
        "surrogate": st.sampled_from(["trapezoid", "pairwise"]),
        "n_knots": st.integers(2, 5),
        "tau_scale": st.sampled_from(["iqr", "band"]),
        "pos_numerator": st.sampled_from(["pool", "live"]),
        "budget_basis": st.sampled_from(["fpr", "population"]),
        "temperature": st.sampled_from([0.05, 0.3, 1.0]),
        "interpolation": st.sampled_from(INTERPOLATIONS),
    }
)


@st.composite
def pools(draw: st.DrawFn) -> dict[str, Any]:
    """A float64 pool (scores on a grid for ties at band edges, some inf/NaN), targets, weights."""
    num_classes = draw(st.sampled_from([1, 2, 3]))
    rows = draw(st.integers(0, 40))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    grid = draw(st.sampled_from([0.0, 0.25, 1.0]))  # 0: continuous scores
    scores = torch.randn(rows, num_classes, generator=gen, dtype=torch.float64)
    if grid:
        scores = (scores / grid).round() * grid
    special = draw(st.sampled_from([None, float("inf"), float("-inf"), float("nan")]))
    if special is not None and rows:
        scores[torch.rand(rows, num_classes, generator=gen) < 0.1] = special
    top = 2 if num_classes == 1 else num_classes
    targets = torch.randint(0, top, (rows,), generator=gen)
    weights = torch.rand(rows, generator=gen, dtype=torch.float64)
    weights[torch.rand(rows, generator=gen) < draw(st.sampled_from([0.0, 0.3]))] = 0.0
    iid = torch.rand(rows, generator=gen) < draw(st.sampled_from([1.0, 0.6]))
    live = torch.rand(rows, generator=gen) < 0.5
    return {"scores": scores, "targets": targets, "weights": weights, "iid": iid, "live": live}


@given(pool=pools(), opts=OPTION_STRATEGY, tile=st.sampled_from([None, 1, 3, 7]))
def test_our_math_equals_the_plain_reference_in_value_gradient_and_diagnostics(
    pool: dict[str, Any], opts: dict[str, Any], tile: int | None
) -> None:
    alpha, beta = opts.pop("band")
    options = PAUCOptions(alpha=alpha, beta=beta, **opts)
    ours_in = pool["scores"].clone().requires_grad_(True)
    plain_in = pool["scores"].clone().requires_grad_(True)
    args = (pool["targets"], pool["weights"], pool["iid"], pool["live"])
    ours = pauc_per_class(ours_in, *args, options, diagnostics=True, tile_elements=tile)
    plain_opts = dict(opts, alpha=alpha, beta=beta)
    plain_loss, plain_valid, plain_diag = plain_pauc_per_class(plain_in, *args, **plain_opts)
    assert ours.valid.tolist() == plain_valid.tolist()
    torch.testing.assert_close(
        ours.loss.masked_fill(~ours.valid, math.nan), plain_loss, **TOL, equal_nan=True
    )
    assert ours.diagnostics is not None
    for key, value in plain_diag.items():
        torch.testing.assert_close(ours.diagnostics[key], value, **TOL, equal_nan=True, msg=key)
    if bool(ours.valid.any()):
        ours.loss[ours.valid].sum().backward()
        plain_loss[plain_valid].sum().backward()
        ours_grad = torch.zeros_like(ours_in) if ours_in.grad is None else ours_in.grad
        plain_grad = torch.zeros_like(plain_in) if plain_in.grad is None else plain_in.grad
        torch.testing.assert_close(ours_grad, plain_grad, **TOL, equal_nan=True)


def test_trapezoid_gradient_reaches_positives_only() -> None:
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(30, 1, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = (torch.arange(30) % 3 == 0).long()
    ones = torch.ones(30, dtype=torch.bool)
    options = PAUCOptions(alpha=0.0, beta=0.4, surrogate="trapezoid", n_knots=3)
    result = pauc_per_class(scores, targets, None, ones, ones, options)
    result.loss.sum().backward()
    assert scores.grad is not None
    assert bool((scores.grad[targets == 0] == 0).all())
    assert bool((scores.grad[targets == 1] != 0).all())


@pytest.mark.parametrize("surrogate", ["trapezoid", "pairwise"])
def test_rows_of_an_invalid_class_get_zero_gradient_even_when_their_score_is_inf(
    surrogate: str,
) -> None:
    """Class 0 has no iid negative (invalid); its positive at +inf must not make a NaN gradient."""
    scores = torch.tensor(
        [[math.inf, -0.29], [-2.18, 0.57], [-1.08, -1.40], [0.3, -0.8]], dtype=torch.float64
    ).requires_grad_(True)
    targets = torch.tensor([0, 1, 0, 0])
    iid = torch.tensor([True, False, True, True])
    live = torch.ones(4, dtype=torch.bool)
    options = PAUCOptions(alpha=0.0, beta=0.5, surrogate=surrogate, interpolation="linear")
    result = pauc_per_class(scores, targets, None, iid, live, options)
    assert result.valid.tolist() == [False, True]
    result.loss[result.valid].sum().backward()
    assert scores.grad is not None and bool(torch.isfinite(scores.grad).all())
    assert scores.grad[targets == 0, 0].eq(0).all()


# --- the masked quantile --------------------------------------------------------------------


@given(
    seed=st.integers(0, 2**31 - 1),
    rows=st.integers(1, 60),
    columns=st.integers(1, 4),
    grid=st.sampled_from([0.0, 0.5]),
    share=st.sampled_from([1.0, 0.7, 0.1]),
    interpolation=st.sampled_from(INTERPOLATIONS),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    specials=st.booleans(),
)
def test_masked_column_quantiles_equal_torch_quantile_bit_for_bit(
    seed: int, rows: int, columns: int, grid: float, share: float, interpolation: str,
    dtype: torch.dtype, specials: bool,
) -> None:  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(rows, columns, generator=gen).to(dtype)
    if grid:
        scores = (scores / grid).round() * grid
    if specials:
        scores[torch.rand(rows, columns, generator=gen) < 0.1] = float("inf")
        scores[torch.rand(rows, columns, generator=gen) < 0.1] = float("-inf")
    member = torch.rand(rows, columns, generator=gen) < share
    for surrogate in ("trapezoid", "pairwise"):
        opts = PAUCOptions(alpha=1 / 3, beta=0.9, surrogate=surrogate, n_knots=5)
        levels, _ = quantile_levels(opts, dtype, scores.device)
        levels = torch.cat([levels, torch.tensor([0.0, 1.0, 0.005, 0.5], dtype=dtype)])
        got = masked_column_quantiles(scores, member, levels, interpolation)
        for c in range(columns):
            if not bool(member[:, c].any()):
                continue
            want = torch.quantile(scores[member[:, c], c], levels, interpolation=interpolation)
            assert torch.equal(got[:, c].isnan(), want.isnan()), (c, got[:, c], want)
            assert torch.equal(got[:, c].nan_to_num(), want.nan_to_num()), (c, got[:, c], want)


@pytest.mark.parametrize(
    "interpolation,members,alpha,beta",
    [  # float32 knife edges: level * (n - 1) rounds onto an integer in float32, not in float64
        ("higher", 11, 0.0, 0.9),
        ("higher", 22, 0.0, 3 / 7),
        ("higher", 101, 0.0, 0.85),
        ("nearest", 6, 0.0, 0.9),
        ("midpoint", 11, 0.0, 0.9),
        ("lower", 7, 1 / 3, 0.9),
        ("linear", 5, 0.0, 0.85),
    ],
)
def test_float32_levels_resolve_the_order_statistic_torch_quantile_does(
    interpolation: str, members: int, alpha: float, beta: float
) -> None:
    """Ranks are computed in the scores' dtype, as ``torch.quantile`` does, not in float64."""
    values = torch.arange(members, dtype=torch.float32)
    # Column 0: the members, then non-members; column 1: the members among three non-members.
    half = members // 2
    outside = torch.tensor([-50.0, 60.0, 1.5])
    column_1 = torch.cat([outside[:1], values[:half], outside[1:2], values[half:], outside[2:]])
    column_0 = torch.cat([values, torch.full((3,), 7.5)])
    scores = torch.stack([column_0, column_1], dim=1)
    member = torch.ones(members + 3, 2, dtype=torch.bool)
    member[members:, 0] = False
    member[[0, half + 1, members + 2], 1] = False
    for surrogate in ("trapezoid", "pairwise"):
        opts = PAUCOptions(alpha=alpha, beta=beta, surrogate=surrogate, n_knots=3)
        levels, n_knots = quantile_levels(opts, torch.float32, scores.device)
        # The band edges take the Python-float route, and the end knots are the edges' bits.
        edges = torch.tensor([1.0 - alpha, 1.0 - beta], dtype=torch.float32)
        assert torch.equal(levels[n_knots : n_knots + 2], edges)
        if n_knots:
            assert torch.equal(levels[[0, n_knots - 1]], edges)
        got = masked_column_quantiles(scores, member, levels, interpolation)
        want = torch.quantile(values, levels, interpolation=interpolation)
        assert torch.equal(got[:, 0], want) and torch.equal(got[:, 1], want), (got, want)


def test_masked_column_quantiles_take_nan_from_members_only() -> None:
    scores = torch.tensor([[1.0, 1.0], [math.nan, 2.0], [3.0, math.nan]], dtype=torch.float64)
    member = torch.tensor([[True, True], [False, True], [True, False]])
    got = masked_column_quantiles(
        scores, member, torch.tensor([0.5], dtype=torch.float64), "linear"
    )
    torch.testing.assert_close(got, torch.tensor([[2.0, 1.5]], dtype=torch.float64))


# --- the tiled pair kernel ------------------------------------------------------------------


def _dense(
    x: torch.Tensor, cls: torch.Tensor, tau: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    rows = keys[cls] if keys.shape[0] > 1 else keys.expand(x.shape[0], -1)
    mask = valid[cls] if valid.shape[0] > 1 else valid.expand(x.shape[0], -1)
    pairs = torch.sigmoid((x[:, None] - rows) / tau[:, None])
    return torch.where(mask, pairs, 0.0).sum(1)


@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 23),
    m=st.integers(1, 31),
    classes=st.sampled_from([1, 3]),
    tile=st.sampled_from([1, 2, 5, 8, 64, 10_000]),
    mask=st.sampled_from(["shared valid", "per-class valid", "key_class", "none"]),
    float_tau=st.sampled_from([None, 0.7, -0.3]),
)
def test_tiled_pair_sums_equal_the_dense_formula_in_value_and_gradient(
    seed: int, n: int, m: int, classes: int, tile: int, mask: str, float_tau: float | None
) -> None:
    """Every form of the arguments: a per-query or one float temperature (either sign), keys
    masked by a shared or per-class ``valid``, by ``key_class``, or not at all."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen, dtype=torch.float64, requires_grad=True)
    keys = torch.randn(classes, m, generator=gen, dtype=torch.float64, requires_grad=True)
    cls = torch.randint(0, classes, (n,), generator=gen)
    tau = (torch.rand(n, generator=gen, dtype=torch.float64) + 0.1) * torch.where(
        torch.rand(n, generator=gen) < 0.3, -1.0, 1.0
    ).double()
    key_class = torch.randint(0, classes, (m,), generator=gen)
    valid = torch.rand(1 if mask == "shared valid" else classes, m, generator=gen) < 0.7
    upstream = torch.randn(n, generator=gen, dtype=torch.float64)
    if float_tau is not None:
        tau = torch.full((n,), float_tau, dtype=torch.float64)
    got = pair_sigmoid_row_sums(
        x,
        cls,
        tau if float_tau is None else float_tau,
        keys,
        valid if mask.endswith("valid") else None,
        key_class=key_class if mask == "key_class" else None,
        tile_elements=tile,
    )
    if mask == "key_class":
        valid = key_class[None, :] == torch.arange(classes)[:, None]
    elif mask == "none":
        valid = torch.ones(1, m, dtype=torch.bool)
    want = _dense(x, cls, tau, keys, valid)
    torch.testing.assert_close(got, want, **TOL)
    got_grads = torch.autograd.grad(got, (x, keys), upstream)
    want_grads = torch.autograd.grad(want, (x, keys), upstream)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("masked", [False, True])
def test_a_second_derivative_through_the_pair_kernel_raises_naming_the_caller(
    masked: bool,
) -> None:
    """The backward is once differentiable (both its paths); ``create_graph=True`` leaves the
    first derivative as it was."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, generator=gen, dtype=torch.float64, requires_grad=True)
    keys = torch.randn(2, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    cls = torch.tensor([0, 1, 1, 0, 1])
    key_class = torch.tensor([0, 1, 0, 0, 1, 1, 0]) if masked else None

    def sums() -> torch.Tensor:
        out = pair_sigmoid_row_sums(x, cls, 0.5, keys, key_class=key_class, what="MyPairLoss")
        return out.pow(2).sum()

    plain = torch.autograd.grad(sums(), (x, keys))
    grads = torch.autograd.grad(sums(), (x, keys), create_graph=True)
    for a, b in zip(grads, plain):
        assert torch.equal(a.detach(), b)
    with pytest.raises(RuntimeError, match="once_differentiable: MyPairLoss is not twice"):
        (grads[0].square().sum() + grads[1].sum() + x.sum()).backward()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(tau=0.0), "tau must be a finite non-zero float or an \\[n\\] tensor, got 0.0"),
        (dict(tau=math.nan), "tau must be a finite non-zero float or an \\[n\\] tensor, got nan"),
        (dict(key_class=torch.zeros(3, dtype=torch.long)), "key_class must be \\[m\\] = \\[4\\]"),
        (
            dict(
                key_class=torch.zeros(4, dtype=torch.long), valid=torch.ones(1, 4, dtype=torch.bool)
            ),
            "replaces valid \\(pass one of the two\\), got key_class \\(4,\\) with valid given",
        ),
    ],
)
def test_pair_kernel_rejects_a_zero_temperature_and_a_misshapen_or_doubled_key_mask(
    kwargs: dict[str, Any], message: str
) -> None:
    args: dict[str, Any] = dict(tau=1.0, valid=None, key_class=None) | kwargs
    with pytest.raises(ValueError, match=message):
        pair_sigmoid_row_sums(
            torch.zeros(2), torch.zeros(2, dtype=torch.long), args["tau"], torch.zeros(1, 4),
            args["valid"], key_class=args["key_class"],
        )  # fmt: skip


def test_void_keys_add_nothing_even_when_they_hold_inf_or_nan() -> None:
    x = torch.tensor([0.0, math.inf], dtype=torch.float64, requires_grad=True)
    keys = torch.tensor([[1.0, math.inf, math.nan]], dtype=torch.float64, requires_grad=True)
    valid = torch.tensor([[True, False, False]])
    out = pair_sigmoid_row_sums(
        x, torch.zeros(2, dtype=torch.long), torch.ones(2, dtype=torch.float64), keys, valid
    )
    torch.testing.assert_close(
        out, torch.tensor([torch.sigmoid(torch.tensor(-1.0)).item(), 1.0], dtype=torch.float64)
    )
    out.sum().backward()
    assert keys.grad is not None and bool(torch.isfinite(keys.grad).all())
    assert keys.grad[0, 1:].eq(0).all()


def test_a_query_whose_keys_are_all_void_gets_zero_gradient_even_with_a_nan_temperature() -> None:
    """E.g. a class with no band: its rows may carry any tau, and must stay out of the gradient."""
    x = torch.tensor([0.5, 0.25], dtype=torch.float64, requires_grad=True)
    keys = torch.tensor([[1.0, 2.0], [math.nan, math.inf]], dtype=torch.float64, requires_grad=True)
    valid = torch.tensor([[True, True], [False, False]])
    tau = torch.tensor([1.0, math.nan], dtype=torch.float64)
    out = pair_sigmoid_row_sums(x, torch.tensor([0, 1]), tau, keys, valid, tile_elements=1)
    assert out[1].item() == 0.0
    out.sum().backward()
    assert x.grad is not None and keys.grad is not None
    assert x.grad[1].item() == 0.0 and bool(keys.grad[1].eq(0).all())
    assert bool(torch.isfinite(x.grad).all()) and bool(torch.isfinite(keys.grad).all())


@pytest.mark.parametrize("num_classes", [1, 3])
def test_the_pair_kernel_also_computes_smooth_ap(num_classes: int) -> None:
    """The kernel is meant to be shared: Smooth-AP's soft ranks, composed by autograd, match
    ``SmoothAPLoss`` in value and gradient (no queue, float64)."""
    from imbalanced_losses import SmoothAPLoss

    gen = torch.Generator().manual_seed(num_classes)
    scores = torch.randn(37, num_classes, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, max(num_classes, 2), (37,), generator=gen)
    loss_fn = SmoothAPLoss(num_classes, queue_size=0, temperature=0.3, reduction="none")
    want = loss_fn.double()(scores, targets)
    (want_grad,) = torch.autograd.grad(want.nansum(), scores)

    column = targets if num_classes > 1 else torch.where(targets == 1, 0, -1)
    rows = (column >= 0).nonzero().squeeze(1)
    cls = column[rows]
    own = scores[rows, cls]
    tau = torch.full_like(own, -0.3)  # sigmoid((s_j - s_i) / 0.3): row j ranked above i
    same_class = cls[None, :] == torch.arange(num_classes)[:, None]
    # Each sum includes the pair j == i, sigmoid(0) = 1/2: R = 1 + sum - 1/2.
    rank = 0.5 + pair_sigmoid_row_sums(own, cls, tau, scores.t(), tile_elements=4)
    rank_pos = 0.5 + pair_sigmoid_row_sums(own, cls, tau, own[None, :], same_class, tile_elements=4)
    ap = torch.zeros(num_classes, dtype=torch.float64).index_add(0, cls, rank_pos / rank)
    got = 1.0 - ap / torch.bincount(cls, minlength=num_classes)
    (got_grad,) = torch.autograd.grad(got.sum(), scores)
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(got_grad, want_grad, **TOL)


def test_pair_kernel_peak_memory_stays_linear_in_the_pool() -> None:
    """1,000 queries x 100,000 keys: dense pairs would take 400 MB; the kernel adds < 32 MB."""
    script = textwrap.dedent(
        """
        import resource, torch
        torch.set_num_threads(1)
        from imbalanced_losses._pair_tiles import pair_sigmoid_row_sums
        n, m = 1_000, 100_000
        x = torch.randn(n, requires_grad=True)
        keys = torch.randn(1, m, requires_grad=True)
        cls = torch.zeros(n, dtype=torch.long)
        tau = torch.full((n,), 0.5)
        valid = torch.rand(1, m) < 0.5
        small = pair_sigmoid_row_sums(x[:8], cls[:8], tau[:8], keys, valid, tile_elements=1 << 16)
        small.sum().backward()  # warm up allocator and autograd
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = pair_sigmoid_row_sums(x, cls, tau, keys, valid, tile_elements=1 << 16)
        out.sum().backward()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) // 1024)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    grew_mib = int(done.stdout.split()[-1])
    dense_mib = 1_000 * 100_000 * 4 // 2**20
    assert grew_mib < 32, f"peak RSS grew {grew_mib} MiB (dense pairs: {dense_mib} MiB)"


def test_grad_pos_count_counts_this_ranks_live_positives_without_padding() -> None:
    targets = torch.tensor([0, 2, 2, -100, 1, 2])
    assert grad_pos_count(targets, 3).tolist() == [1, 1, 3]
    assert grad_pos_count(torch.tensor([1, 0, 1, -100]), 1).tolist() == [2]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
def test_half_precision_quantiles_rank_in_float32_like_their_exact_upcast(
    dtype: torch.dtype, interpolation: str
) -> None:
    """Contract §17: ranks in float32 or wider. Scores and levels exact in both dtypes give
    torch.quantile's float32 answer (rounded once to the dtype); a half-precision rank would
    round ``level * (n - 1)`` onto another order statistic past 256 (bf16) / 2048 (fp16) rows."""
    gen = torch.Generator().manual_seed(3)
    rows, columns = 3000, 3
    scores = (torch.randint(-255, 256, (rows, columns), generator=gen) / 8).to(dtype)
    member = torch.rand(rows, columns, generator=gen) < torch.tensor([1.0, 0.8, 0.3])
    levels = torch.tensor([0.995, 0.9, 0.7, 0.75, 0.25, 0.5, 0.0, 1.0], dtype=dtype)
    got = masked_column_quantiles(scores, member, levels, interpolation)
    assert got.dtype == dtype
    for c in range(columns):
        want = torch.quantile(
            scores[member[:, c], c].float(), levels.float(), interpolation=interpolation
        )
        assert torch.equal(got[:, c], want.to(dtype)), (c, got[:, c], want)


def test_a_float16_pool_of_70k_members_selects_like_its_float32_upcast() -> None:
    """float16 cannot hold ``n - 1`` = 69,999 (it overflows to inf): ranks must be float32."""
    gen = torch.Generator().manual_seed(4)
    rows = 70_000
    scores = (torch.randint(-1024, 1025, (rows, 2), generator=gen) / 64).to(torch.float16)
    member = torch.ones(rows, 2, dtype=torch.bool)
    member[: rows // 3, 1] = False
    levels = torch.tensor([0.995, 0.75, 0.25], dtype=torch.float16)
    for interpolation in ("higher", "linear"):
        got = masked_column_quantiles(scores, member, levels, interpolation)
        for c in range(2):
            want = torch.quantile(
                scores[member[:, c], c].float(), levels.float(), interpolation=interpolation
            )
            assert torch.equal(got[:, c], want.to(torch.float16)), (c, got[:, c], want)


@pytest.mark.parametrize("surrogate,syncs", [("trapezoid", 1), ("pairwise", 2)])
@pytest.mark.parametrize("num_classes", [1, 5])
def test_the_math_reads_the_host_once_per_selection_and_once_for_the_band(
    surrogate: str, syncs: int, num_classes: int
) -> None:
    """One read for the quantiles of every class; the pairwise band packing adds one more (its
    sizes), not a nonzero, bincount and max each. Counted as they would be on CUDA."""
    gen = torch.Generator().manual_seed(5)
    rows = 300
    scores = torch.randn(rows, num_classes, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, max(num_classes, 2), (rows,), generator=gen)
    iid = torch.rand(rows, generator=gen) < 0.8
    live = torch.rand(rows, generator=gen) < 0.5
    options = PAUCOptions(alpha=0.05, beta=0.4, surrogate=surrogate, n_knots=3)
    with SyncCounter(scores, targets, iid, live) as counter:
        result = pauc_per_class(scores, targets, None, iid, live, options)
    assert bool(result.valid.all())
    assert counter.total == syncs, dict(counter.counts)
    assert counter.counts == Counter({DEVICE_TO_HOST: syncs}), counter.counts
