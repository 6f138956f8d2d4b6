"""``PAUCAtBudgetLoss``: the loss (queue, options, diagnostics) against two independent oracles.

Values frozen from the reference library (imbalanced-losses 0.6.0,
``scripts/freeze_pauc_reference.py``) and our plain float64 reference
(``imbalanced_losses.testing.reference.PlainPAUCLoss``).
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import imbalanced_losses
from imbalanced_losses import PAUCAtBudgetLoss
from imbalanced_losses.functional import INTERPOLATIONS
from imbalanced_losses.testing.reference import PlainPAUCLoss

FROZEN = json.loads((Path(__file__).parent / "data" / "pauc_reference_0_6_0.json").read_text())
TOL = {"rtol": 1e-9, "atol": 1e-9}


def _tensor(values: list[Any]) -> torch.Tensor:
    return torch.tensor([math.nan if v is None else v for v in values], dtype=torch.float64)


def _case_id(case: dict[str, Any]) -> str:
    o = case["options"]
    return "-".join(
        [case["scenario"], o["surrogate"], o["budget_basis"], o["tau_scale"], o["pos_numerator"],
         o["quantile_interpolation"], o["reduction"]]
    )  # fmt: skip


@pytest.mark.parametrize("case", FROZEN["cases"], ids=_case_id)
def test_the_loss_reproduces_the_frozen_reference_library_step_by_step(
    case: dict[str, Any],
) -> None:
    """Called as the freezing script called the library: positionally, float64, train mode."""
    scenario = FROZEN["scenarios"][case["scenario"]]
    loss_fn = PAUCAtBudgetLoss(
        scenario["num_classes"], queue_size=scenario["queue_size"], **case["options"]
    ).double()
    for index, (step, expected) in enumerate(zip(scenario["steps"], case["steps"])):
        where = f"{_case_id(case)} step {index}"
        logits = torch.tensor(step["logits"], dtype=torch.float64, requires_grad=True)
        targets = torch.tensor(step["targets"])
        iid = torch.tensor(step["iid_mask"]) if "iid_mask" in step else None
        weight = step.get("sample_weight")
        weight = None if weight is None else torch.tensor(weight, dtype=torch.float64)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss, per_class, valid, diag = loss_fn(
                logits, targets, iid, True, True, sample_weight=weight
            )
        fired = any("dispersion" in str(w.message) for w in caught)
        assert fired == expected["dispersion_warning"], where
        assert valid.tolist() == expected["valid"], where
        torch.testing.assert_close(
            loss.detach().reshape(-1), _tensor(expected["loss"]), **TOL, equal_nan=True, msg=where
        )
        torch.testing.assert_close(
            per_class.detach(), _tensor(expected["per_class"]), **TOL, equal_nan=True, msg=where
        )
        assert sorted(diag) == sorted(expected["diagnostics"]), where
        for key, value in diag.items():
            want = expected["diagnostics"][key]
            if key.endswith("count"):
                assert value.tolist() == want, f"{where}: {key}"
            else:
                torch.testing.assert_close(
                    value, _tensor(want), **TOL, equal_nan=True, msg=f"{where}: {key}"
                )
        reduction = case["options"]["reduction"]
        total = loss if reduction != "none" else loss[valid].sum() + logits.sum() * 0.0
        total.backward()
        grad = logits.grad if logits.grad is not None else torch.zeros_like(logits)
        torch.testing.assert_close(grad.reshape(-1), _tensor(expected["grad"]), **TOL, msg=where)


def test_the_return_shapes_follow_the_two_flags_as_in_the_reference() -> None:
    loss_fn = PAUCAtBudgetLoss(2, beta=0.3)
    x, t = torch.randn(12, 2), torch.tensor([0, 1] * 6)
    assert isinstance(loss_fn(x, t), torch.Tensor)
    assert len(loss_fn(x, t, None, True)) == 3
    loss, diag = loss_fn(x, t, None, False, True)
    assert loss.dim() == 0 and "tau_eff" in diag and diag["grad_pos_count"].tolist() == [6, 6]
    assert len(loss_fn(x, t, None, True, True)) == 4
    assert loss_fn._diagnostics is None  # nothing kept between forwards


def test_an_empty_pool_gives_nan_diagnostics_and_a_zero_loss_with_a_gradient() -> None:
    loss_fn = PAUCAtBudgetLoss(2, beta=0.3)
    x = torch.randn(3, 2, requires_grad=True)
    loss, per_class, valid, diag = loss_fn(x, torch.full((3,), -100), None, True, True)
    loss.backward()
    assert float(loss.detach()) == 0.0 and not valid.any() and torch.isnan(per_class).all()
    assert torch.isnan(diag["t_alpha"]).all() and diag["band_neg_count"].tolist() == [0, 0]
    assert diag["grad_pos_count"].tolist() == [0, 0]


def test_the_module_path_of_the_reference_library_imports_the_same_class() -> None:
    from imbalanced_losses.pauc_loss import PAUCAtBudgetLoss as from_module

    assert from_module is imbalanced_losses.PAUCAtBudgetLoss
    assert "PAUCAtBudgetLoss" in imbalanced_losses.__all__


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"alpha": 0.3, "beta": 0.3}, ["alpha must be < beta", "0.3"]),
        ({"alpha": -0.1}, ["alpha", "[0, 1)", "-0.1"]),
        ({"beta": 1.5}, ["beta", "(0, 1]", "1.5"]),
        ({"surrogate": "dense"}, ["surrogate", "'dense'"]),
        ({"n_knots": 1}, ["n_knots", ">= 2", "1"]),
        ({"tau_scale": "std"}, ["tau_scale", "'std'"]),
        ({"pos_numerator": "all"}, ["pos_numerator", "'all'"]),
        ({"budget_basis": "tpr"}, ["budget_basis", "'tpr'"]),
        ({"quantile_interpolation": "cubic"}, ["quantile_interpolation", "'cubic'"]),
        ({"temperature": 0.0}, ["temperature", "0.0"]),
    ],
)
def test_bad_options_are_refused_naming_the_option_and_the_value(
    options: dict[str, Any], words: list[str]
) -> None:
    with pytest.raises(ValueError) as error:
        PAUCAtBudgetLoss(2, **options)
    for word in words:
        assert word in str(error.value)


def test_the_degenerate_scale_warning_fires_once_per_instance_and_reset_rearms_it() -> None:
    loss_fn = PAUCAtBudgetLoss(2, beta=0.3)
    x = torch.randn(16, 2)
    x[:, 1] = 0.25
    t = torch.tensor([0, 1] * 8)
    with pytest.warns(UserWarning, match=r"dispersion.*class\(es\) \[1\]"):
        _, _, valid = loss_fn(x, t, None, True)
    assert valid.tolist() == [True, False]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss_fn(x, t)
    loss_fn.reset_queue()
    with pytest.warns(UserWarning, match="dispersion"):
        loss_fn(x, t)


# --- against the plain float64 reference, over random steps --------------------------------


@st.composite
def runs(draw: st.DrawFn) -> dict[str, Any]:
    num_classes = draw(st.sampled_from([1, 2, 3]))
    alpha, beta = draw(st.sampled_from([(0.0, 0.3), (0.05, 0.4), (0.1, 0.9), (0.0, 0.005)]))
    options = {
        "alpha": alpha,
        "beta": beta,
        "surrogate": draw(st.sampled_from(["trapezoid", "pairwise"])),
        "n_knots": draw(st.integers(2, 4)),
        "tau_scale": draw(st.sampled_from(["iqr", "band"])),
        "pos_numerator": draw(st.sampled_from(["pool", "live"])),
        "budget_basis": draw(st.sampled_from(["fpr", "population"])),
        "temperature": draw(st.sampled_from([0.05, 0.5])),
        "quantile_interpolation": draw(st.sampled_from(INTERPOLATIONS)),
        "reduction": draw(st.sampled_from(["mean", "sum", "none"])),
        "queue_size": draw(st.sampled_from([0, 7, 40])),
    }
    return {
        "num_classes": num_classes,
        "options": options,
        "seed": draw(st.integers(0, 2**31 - 1)),
        "steps": draw(st.integers(1, 3)),
        "iid": draw(st.sampled_from([None, 0.6])),
        "weights": draw(st.booleans()),
        "grid": draw(st.sampled_from([0.0, 0.5])),
    }


def _plain(num_classes: int, options: dict[str, Any]) -> PlainPAUCLoss:
    opts = dict(options)
    opts["interpolation"] = opts.pop("quantile_interpolation")
    return PlainPAUCLoss(
        num_classes, queue_size=opts.pop("queue_size"), reduction=opts.pop("reduction"), **opts
    )


@settings(max_examples=40, deadline=None)
@given(run=runs())
def test_the_loss_equals_the_plain_reference_over_steps_in_value_gradient_and_diagnostics(
    run: dict[str, Any],
) -> None:
    num_classes, options = run["num_classes"], run["options"]
    ours = PAUCAtBudgetLoss(num_classes, **options).double()
    plain = _plain(num_classes, options)
    gen = torch.Generator().manual_seed(run["seed"])
    for _ in range(run["steps"]):
        n = int(torch.randint(0, 14, (1,), generator=gen))
        x = torch.randn(n, num_classes, generator=gen, dtype=torch.float64)
        if run["grid"]:
            x = (x / run["grid"]).round() * run["grid"]
        top = 2 if num_classes == 1 else num_classes
        t = torch.randint(0, top, (n,), generator=gen)
        t[torch.rand(n, generator=gen) < 0.1] = -100
        iid = None if run["iid"] is None else torch.rand(n, generator=gen) < run["iid"]
        w = torch.rand(n, generator=gen, dtype=torch.float64) if run["weights"] else None
        a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss, per_class, valid, diag = ours(a, t, iid, True, True, sample_weight=w)
        want, want_pc, want_valid = plain(
            b, t, iid_mask=iid, sample_weight=w, return_per_class=True
        )
        assert valid.tolist() == want_valid.tolist()
        torch.testing.assert_close(per_class, want_pc, **TOL, equal_nan=True)
        torch.testing.assert_close(loss, want, **TOL, equal_nan=True)
        for key, value in plain.diagnostics.items():
            torch.testing.assert_close(diag[key], value, **TOL, equal_nan=True, msg=key)
        reduce = (lambda v, ok: v[ok].sum()) if options["reduction"] == "none" else None
        (loss if reduce is None else reduce(loss, valid) + a.sum() * 0).backward()
        (want if reduce is None else reduce(want, want_valid) + b.sum() * 0).backward()
        assert a.grad is not None and b.grad is not None
        torch.testing.assert_close(a.grad, b.grad, **TOL)


def _rows(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(40, 2, generator=gen, dtype=torch.float64)
    return x, torch.randint(0, 2, (40,), generator=gen)


@pytest.mark.parametrize("surrogate", ["trapezoid", "pairwise"])
def test_no_iid_mask_and_an_all_true_iid_mask_give_the_same_steps(surrogate: str) -> None:
    """Absent means every row is iid, through the queue as well."""
    absent = PAUCAtBudgetLoss(2, beta=0.3, surrogate=surrogate, queue_size=50).double()
    given_ = PAUCAtBudgetLoss(2, beta=0.3, surrogate=surrogate, queue_size=50).double()
    for seed in range(3):
        x, t = _rows(seed)
        a, b = (
            absent(x, t, None, True, True),
            given_(x, t, torch.ones(40, dtype=torch.bool), True, True),
        )
        torch.testing.assert_close(a[0], b[0], **TOL)
        for key in a[3]:
            torch.testing.assert_close(a[3][key], b[3][key], **TOL, equal_nan=True)


@pytest.mark.parametrize("surrogate", ["trapezoid", "pairwise"])
def test_non_iid_rows_leave_the_band_edges_also_once_they_are_queued(surrogate: str) -> None:
    """Densified (non-iid) rows with extreme scores move nothing of the band, now or later."""
    x, t = _rows(0)
    base = PAUCAtBudgetLoss(2, beta=0.3, surrogate=surrogate, queue_size=200).double()
    dense = PAUCAtBudgetLoss(2, beta=0.3, surrogate=surrogate, queue_size=200).double()
    extra = torch.full((10, 2), 9.0, dtype=torch.float64)  # non-iid negatives of both classes
    extra_t = torch.tensor([0, 1] * 5)
    iid = torch.cat([torch.ones(40, dtype=torch.bool), torch.zeros(10, dtype=torch.bool)])
    base(x, t, None, False, True)
    dense(torch.cat([x, extra]), torch.cat([t, extra_t]), iid, False, True)
    x2, t2 = _rows(1)
    _, want = base(x2, t2, None, False, True)
    _, got = dense(x2, t2, None, False, True)  # the non-iid rows are in the queue now
    for key in ("t_alpha", "t_beta", "tau_eff", "band_neg_count"):
        torch.testing.assert_close(got[key], want[key], **TOL, msg=key)
