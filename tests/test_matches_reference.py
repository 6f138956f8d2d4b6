"""The library equals the plain reference (contract §3/§4) in float64: value and gradient,
over random class counts, interpolations, reductions, quantiles, queue histories, padding and
weights. Tolerances are float64-tight: any formula or selection difference shows up."""

from __future__ import annotations

import pytest
import torch
from _support import (
    INTERPOLATIONS,
    REDUCTIONS,
    TIGHT,
    assert_same_queue,
    make_pair,
    objective,
    random_batch,
)
from hypothesis import given, settings
from hypothesis import strategies as st

QUANTILES = st.one_of(
    st.sampled_from([0.5, 0.3, 0.25, 0.1, 0.05, 0.01, 0.005, 0.001, 1e-4, 0.9, 0.999]),
    st.floats(1e-4, 1 - 1e-4),
)


@st.composite
def histories(draw):
    num_classes = draw(st.integers(1, 7))
    steps = draw(st.integers(1, 5))
    bool_targets = num_classes == 1 and draw(st.booleans())
    return dict(
        num_classes=num_classes,
        interpolation=draw(st.sampled_from(INTERPOLATIONS)),
        reduction=draw(st.sampled_from(REDUCTIONS)),
        quantile=draw(QUANTILES),
        temperature=draw(st.sampled_from([0.01, 0.1, 0.5, 2.0])),
        queue_size=draw(st.sampled_from([0, 1, 2, 5, 16, 64])),
        ignore_index=draw(st.sampled_from([-100, -1, 255, num_classes + 2])),
        update_queue_in_eval=draw(st.booleans()),
        max_pool_size=draw(st.sampled_from([None, 10**6])),  # never smaller than the pool
        batch_sizes=draw(st.lists(st.integers(0, 40), min_size=steps, max_size=steps)),
        train_flags=draw(st.lists(st.booleans(), min_size=steps, max_size=steps)),
        new_temperature=draw(st.sampled_from([None, 0.05, 1.0])),
        ties=draw(st.booleans()),
        weighted=draw(st.booleans()),
        pad_frac=0.0 if bool_targets else draw(st.sampled_from([0.0, 0.2, 0.6, 1.0])),
        targets_2d=draw(st.booleans()),
        targets_dtype=draw(st.sampled_from([torch.int64, torch.int32])),
        bool_targets=bool_targets,
        return_per_class=draw(st.booleans()),
        pos_rate=draw(st.sampled_from([0.05, 0.3, 0.7])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def run_history(h):
    c = h["num_classes"]
    lib, ref = make_pair(
        c,
        quantile=h["quantile"],
        queue_size=h["queue_size"],
        temperature=h["temperature"],
        reduction=h["reduction"],
        ignore_index=h["ignore_index"],
        update_queue_in_eval=h["update_queue_in_eval"],
        quantile_interpolation=h["interpolation"],
        max_pool_size=h["max_pool_size"],
    )
    gen = torch.Generator().manual_seed(h["seed"])
    for step, (n, train) in enumerate(zip(h["batch_sizes"], h["train_flags"])):
        if step == 1 and h["new_temperature"] is not None:  # annealed by hand mid-run
            lib.temperature = h["new_temperature"]
            ref.temperature = h["new_temperature"]
        lib.train(train)
        ref.train(train)
        logits, targets, weights = random_batch(
            gen,
            n,
            c,
            ties=h["ties"],
            pad_frac=h["pad_frac"],
            ignore_index=h["ignore_index"],
            weighted=h["weighted"],
            pos_rate=h["pos_rate"],
        )
        targets = targets.to(h.get("targets_dtype", torch.int64))
        if h["bool_targets"]:
            targets = targets.bool()
        if h["targets_2d"]:
            targets = targets[:, None]
        logits.requires_grad_(True)

        out = lib(logits, targets, return_per_class=h["return_per_class"], sample_weight=weights)
        exp_loss, exp_per_class, exp_valid = ref(
            logits, targets, return_per_class=True, sample_weight=weights
        )
        if h["return_per_class"]:
            loss, per_class, valid = out
            assert valid.dtype == torch.bool
            assert torch.equal(valid, exp_valid)
            torch.testing.assert_close(per_class, exp_per_class.detach(), equal_nan=True, **TIGHT)
        else:
            loss = out
        assert loss.shape == exp_loss.shape
        torch.testing.assert_close(loss, exp_loss, equal_nan=True, **TIGHT)

        if exp_loss.dim() == 0 or bool(exp_valid.any()):
            got_obj = objective(loss, exp_valid, step)
            exp_obj = objective(exp_loss, exp_valid, step)
            assert got_obj.requires_grad, "the loss must stay connected to the graph"
            (got_grad,) = torch.autograd.grad(got_obj, logits)
            (exp_grad,) = torch.autograd.grad(exp_obj, logits)
            torch.testing.assert_close(got_grad, exp_grad, **TIGHT)
        assert_same_queue(lib, ref)


@pytest.mark.filterwarnings("ignore::UserWarning")
@settings(max_examples=150)
@given(histories())
def test_multi_step_history_matches_reference(h):
    run_history(h)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("num_classes", [1, 2, 5])
@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_every_interpolation_and_reduction_with_ties_and_wraparound(
    num_classes, interpolation, reduction
):
    # Integer-valued logits (many ties), a queue smaller than the batches (wrap-around),
    # padding, weights: the fixed grid every combination must pass, not only random draws.
    run_history(
        dict(
            num_classes=num_classes,
            interpolation=interpolation,
            reduction=reduction,
            quantile=0.3,
            temperature=0.5,
            queue_size=7,
            ignore_index=-100,
            update_queue_in_eval=False,
            max_pool_size=None,
            batch_sizes=[12, 9, 0, 15],
            train_flags=[True, True, True, False],
            new_temperature=0.2,
            ties=True,
            weighted=True,
            pad_frac=0.2,
            targets_2d=False,
            bool_targets=False,
            return_per_class=True,
            pos_rate=0.3,
            seed=1234,
        )
    )


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("quantile", [0.9, 0.3, 0.05, 0.003, 1e-5])
@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
def test_large_and_tiny_quantiles_on_a_large_pool(quantile, interpolation):
    lib, ref = make_pair(
        3,
        quantile=quantile,
        queue_size=3000,
        temperature=0.1,
        quantile_interpolation=interpolation,
    )
    gen = torch.Generator().manual_seed(7)
    for _ in range(3):
        logits, targets, _ = random_batch(gen, 2000, 3, pos_rate=0.01)
        logits.requires_grad_(True)
        loss = lib(logits, targets)
        exp = ref(logits, targets)
        torch.testing.assert_close(loss, exp, **TIGHT)
        torch.testing.assert_close(
            torch.autograd.grad(loss, logits)[0], torch.autograd.grad(exp, logits)[0], **TIGHT
        )
    assert_same_queue(lib, ref)


def test_default_constructor_matches_reference_defaults():
    # Defaults of §2: quantile=0.005, queue_size=1024, temperature=0.01, mean, -100, 'higher'.
    from imbalanced_losses import RecallAtQuantileLoss
    from imbalanced_losses.testing.reference import ReferenceRecallAtQuantileLoss

    lib = RecallAtQuantileLoss(4).double()
    ref = ReferenceRecallAtQuantileLoss(4, dtype=torch.float64)
    assert lib.quantile == 0.005 and lib.temperature == 0.01 and lib.reduction == "mean"
    assert lib.ignore_index == -100 and lib.quantile_interpolation == "higher"
    assert lib.queue.scores.shape[0] == 1024 and lib.max_pool_size is None
    gen = torch.Generator().manual_seed(3)
    for _ in range(6):
        logits, targets, _ = random_batch(gen, 300, 4)
        torch.testing.assert_close(lib(logits, targets), ref(logits, targets), **TIGHT)
    assert_same_queue(lib, ref)


def test_binary_bool_targets_equal_integer_targets():
    gen = torch.Generator().manual_seed(11)
    logits, targets, _ = random_batch(gen, 50, 1)
    a, _ = make_pair(1, quantile=0.2, queue_size=0, temperature=0.3)
    b, _ = make_pair(1, quantile=0.2, queue_size=0, temperature=0.3)
    assert torch.equal(a(logits, targets.bool()), b(logits, targets[:, None]))


def test_padding_rows_with_garbage_logits_do_not_count():
    # Padding rows are excluded from theta and recall even when their logits are NaN/inf.
    gen = torch.Generator().manual_seed(5)
    logits, targets, _ = random_batch(gen, 30, 3)
    pad = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=torch.float64)
    padded_logits = torch.cat([logits, pad.expand(4, 3)]).requires_grad_(True)
    padded_targets = torch.cat([targets, torch.full((4,), -100)])
    lib, ref = make_pair(3, quantile=0.2, queue_size=64, temperature=0.2)
    loss = lib(padded_logits, padded_targets)
    exp = ref(logits.requires_grad_(True), targets)
    torch.testing.assert_close(loss, exp, **TIGHT)
    (grad,) = torch.autograd.grad(loss, padded_logits)
    assert torch.equal(grad[30:], torch.zeros(4, 3, dtype=torch.float64))
    torch.testing.assert_close(grad[:30], torch.autograd.grad(exp, logits)[0], **TIGHT)
    assert_same_queue(lib, ref)


@pytest.mark.parametrize(
    "interpolation,theta",
    [("higher", 2.0), ("lower", 1.0), ("linear", 1.5), ("midpoint", 1.5), ("nearest", 2.0)],
)
def test_hand_computed_binary_example(interpolation, theta):
    # Pool scores 0, 1, 2, 3; quantile 0.5 -> rank 1.5 of the sorted pool; positives at 2 and 3.
    import math

    from imbalanced_losses import RecallAtQuantileLoss
    from imbalanced_losses.testing.reference import reference_recall_at_quantile_loss

    logits = torch.tensor([[0.0], [1.0], [2.0], [3.0]], dtype=torch.float64)
    targets = torch.tensor([0, 0, 1, 1])
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    expected = 1 - (sig((2 - theta) / 0.5) + sig((3 - theta) / 0.5)) / 2
    lib = RecallAtQuantileLoss(
        1, quantile=0.5, temperature=0.5, queue_size=0, quantile_interpolation=interpolation
    ).double()
    ref, _, _ = reference_recall_at_quantile_loss(
        logits, targets, num_classes=1, quantile=0.5, temperature=0.5, interpolation=interpolation
    )
    assert abs(lib(logits, targets).item() - expected) < 1e-15
    assert abs(ref.item() - expected) < 1e-15


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_many_classes_and_non_contiguous_inputs():
    lib, ref = make_pair(
        50, quantile=0.05, queue_size=300, temperature=0.2, quantile_interpolation="linear"
    )
    gen = torch.Generator().manual_seed(9)
    for _ in range(4):
        base, targets, weights = random_batch(gen, 120, 50, weighted=True, pad_frac=0.1)
        logits = base.t().contiguous().t().requires_grad_(True)  # column-major view
        assert not logits.is_contiguous()
        weights = torch.stack([weights, weights], 1)[:, 0]  # strided weights
        loss = lib(logits, targets, sample_weight=weights)
        exp = ref(logits, targets, sample_weight=weights)
        torch.testing.assert_close(loss, exp, **TIGHT)
        torch.testing.assert_close(
            torch.autograd.grad(loss, logits)[0], torch.autograd.grad(exp, logits)[0], **TIGHT
        )
    assert_same_queue(lib, ref)
