"""SmoothAPLoss equals the plain full-matrix Smooth-AP (float64): value and gradient over random
class counts, queue histories, padding, weights, ties, eval steps, subsamples and chunk sizes."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from _support import REDUCTIONS, TIGHT, assert_same_queue, objective, random_batch
from hypothesis import given
from hypothesis import strategies as st

from imbalanced_losses import SmoothAPLoss, _pair_tiles
from imbalanced_losses.testing.reference import ReferenceSmoothAPLoss, reference_smooth_ap_loss

# Tile sizes (elements): one pair, tiles that straddle row and column boundaries, several rows
# of a whole block, and the default (every pair of these small pools in one tile).
BUFFERS = [1, 3, 7, 40, _pair_tiles.TILE_ELEMENTS]


@st.composite
def histories(draw):
    num_classes = draw(st.integers(1, 5))
    steps = draw(st.integers(1, 4))
    return dict(
        num_classes=num_classes,
        reduction=draw(st.sampled_from(REDUCTIONS)),
        temperature=draw(st.sampled_from([0.05, 0.3, 1.0, 3.0])),
        queue_size=draw(st.sampled_from([0, 1, 5, 16])),
        ignore_index=draw(st.sampled_from([-100, -1, num_classes + 2])),
        update_queue_in_eval=draw(st.booleans()),
        batch_sizes=draw(st.lists(st.integers(0, 24), min_size=steps, max_size=steps)),
        train_flags=draw(st.lists(st.booleans(), min_size=steps, max_size=steps)),
        ties=draw(st.booleans()),
        weighted=draw(st.booleans()),
        pad_frac=draw(st.sampled_from([0.0, 0.3, 1.0])),
        pos_rate=draw(st.sampled_from([0.05, 0.3, 0.9])),
        buffer=draw(st.sampled_from(BUFFERS)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _grad(value, x):
    """Gradient of ``value`` on ``x``; zero when ``value`` is not connected to it."""
    if not value.requires_grad:
        return torch.zeros_like(x)
    (grad,) = torch.autograd.grad(value, x, allow_unused=True)
    return torch.zeros_like(x) if grad is None else grad


def run_history(h):
    c = h["num_classes"]
    options = {
        k: h[k]
        for k in ("queue_size", "temperature", "reduction", "ignore_index", "update_queue_in_eval")
    }
    lib = SmoothAPLoss(c, **options).double()
    ref = ReferenceSmoothAPLoss(c, **options)
    gen = torch.Generator().manual_seed(h["seed"])
    for step, (n, train) in enumerate(zip(h["batch_sizes"], h["train_flags"])):
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
        lib.train(train)
        ref.train(train)
        x_lib = logits.clone().requires_grad_()
        x_ref = logits.clone().requires_grad_()
        with mock.patch.object(_pair_tiles, "TILE_ELEMENTS", h["buffer"]):
            got = lib(x_lib, targets, sample_weight=weights, return_per_class=True)
            want = ref(x_ref, targets, sample_weight=weights, return_per_class=True)
            assert torch.equal(got[2], want[2]), f"step {step}: valid classes differ"
            torch.testing.assert_close(got[1], want[1], equal_nan=True, **TIGHT)
            torch.testing.assert_close(got[0], want[0], equal_nan=True, **TIGHT)
            if n:
                torch.testing.assert_close(
                    _grad(objective(got[0], got[2]), x_lib),
                    _grad(objective(want[0], want[2]), x_ref),
                    **TIGHT,
                )
        assert_same_queue(lib, ref)


@given(histories())
def test_value_gradient_and_queue_match_the_plain_reference(h):
    run_history(h)


@pytest.mark.parametrize("buffer", BUFFERS)
@pytest.mark.parametrize("num_classes", [1, 4])
def test_chunked_sums_match_at_every_chunk_size(buffer, num_classes):
    """A fixed case per chunk size, so each chunking is always exercised (not only by chance)."""
    run_history(
        dict(
            num_classes=num_classes, reduction="mean", temperature=0.3, queue_size=9,
            ignore_index=-100, update_queue_in_eval=False, batch_sizes=[13, 11, 17],
            train_flags=[True, True, True], ties=True, weighted=True, pad_frac=0.3,
            pos_rate=0.3, buffer=buffer, seed=5,
        )
    )  # fmt: skip


@given(
    num_classes=st.integers(1, 4),
    max_pool_size=st.integers(1, 30),
    buffer=st.sampled_from(BUFFERS),
    seed=st.integers(0, 2**31 - 1),
    pad_fracs=st.lists(st.sampled_from([0.2, 1.0]), min_size=3, max_size=3),
)
def test_subsampled_sums_are_the_sample_scaled_to_the_pool(
    num_classes, max_pool_size, buffer, seed, pad_fracs
):
    """With ``max_pool_size`` the j-sums run over the library's own sample, times pool/sample.

    Steps whose batch is all padding sample from the queue alone.
    """
    lib = SmoothAPLoss(num_classes, queue_size=12, temperature=0.5, max_pool_size=max_pool_size)
    lib = lib.double()
    ref = ReferenceSmoothAPLoss(num_classes, queue_size=12, temperature=0.5)
    gen = torch.Generator().manual_seed(seed)
    drawn = []
    original = lib._subsample

    def recording(size):
        rows = original(size)
        drawn.append(rows)
        return rows

    for pad_frac in pad_fracs:
        logits, targets, weights = random_batch(
            gen, 15, num_classes, weighted=True, pad_frac=pad_frac
        )
        x_lib, x_ref = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        drawn.clear()
        with (
            mock.patch.object(lib, "_subsample", recording),
            mock.patch.object(_pair_tiles, "TILE_ELEMENTS", buffer),
        ):
            got = lib(x_lib, targets, sample_weight=weights)
        sample = drawn[0] if drawn else None
        want = ref(x_ref, targets, sample_weight=weights, sample=sample)
        torch.testing.assert_close(got, want, **TIGHT)
        (g_lib,) = torch.autograd.grad(got, x_lib)
        (g_ref,) = torch.autograd.grad(want, x_ref)
        torch.testing.assert_close(g_lib, g_ref, **TIGHT)


def test_gradient_pushes_negatives_down_and_positives_up():
    """Unlike a detached threshold, every live row gets a gradient: negatives above a positive
    are pushed down (positive gradient on the loss), positives pushed up."""
    logits = torch.tensor([[2.0], [1.0], [0.5], [-1.0]], dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 1, 0, 1])
    loss = SmoothAPLoss(1, queue_size=0, temperature=1.0).double()(logits, targets)
    (grad,) = torch.autograd.grad(loss, logits)
    assert grad[0, 0] > 0 and grad[2, 0] > 0  # negatives: lowering them lowers the loss
    assert grad[1, 0] < 0 and grad[3, 0] < 0  # positives: raising them lowers the loss


def test_perfect_ranking_at_small_temperature_gives_zero_loss_and_reversed_gives_high():
    scores = torch.tensor([[5.0], [4.0], [-4.0], [-5.0], [-6.0]], dtype=torch.float64)
    targets = torch.tensor([1, 1, 0, 0, 0])
    loss_fn = SmoothAPLoss(1, queue_size=0, temperature=0.01).double()
    assert float(loss_fn(scores, targets)) == pytest.approx(0.0, abs=1e-12)
    # Positives ranked 4th and 5th: AP = (1/4 + 2/5) / 2.
    assert float(loss_fn(-scores, targets)) == pytest.approx(1 - (1 / 4 + 2 / 5) / 2, abs=1e-12)


def test_class_without_a_negative_or_without_positive_weight_is_not_valid():
    scores = torch.randn(4, 3, dtype=torch.float64)
    targets = torch.tensor([0, 0, 1, 1])
    weights = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    loss_fn = SmoothAPLoss(3, queue_size=0, reduction="none").double()
    _, per_class, valid = loss_fn(scores, targets, sample_weight=weights, return_per_class=True)
    assert valid.tolist() == [True, False, False]  # class 1 weightless, class 2 absent
    only_positives = SmoothAPLoss(1, queue_size=0).double()
    _, _, valid = only_positives(
        scores[:, :1], torch.ones(4, dtype=torch.long), return_per_class=True
    )
    assert valid.tolist() == [False]


def test_reference_oracle_agrees_with_a_hand_computed_case():
    """The oracle itself, on two positives and two negatives, against the formula by hand."""
    s = torch.tensor([[1.0], [0.0], [2.0], [-1.0]], dtype=torch.float64)
    y = torch.tensor([1, 1, 0, 0])
    tau = 0.5
    sig = lambda d: 1 / (1 + torch.exp(torch.tensor(-d / tau, dtype=torch.float64)))  # noqa: E731
    r0 = 1 + sig(0 - 1) + sig(2 - 1) + sig(-1 - 1)
    r0p = 1 + sig(0 - 1)
    r1 = 1 + sig(1 - 0) + sig(2 - 0) + sig(-1 - 0)
    r1p = 1 + sig(1 - 0)
    expected = 1 - (r0p / r0 + r1p / r1) / 2
    loss, _, _ = reference_smooth_ap_loss(s, y, num_classes=1, temperature=tau)
    assert float(loss) == pytest.approx(float(expected), abs=1e-15)


@pytest.mark.parametrize("max_pool_size", [None, 5])
def test_double_backward_says_the_loss_is_once_differentiable(max_pool_size):
    """A gradient penalty through the loss stops with PyTorch's clear message, not a crash."""
    loss_fn = SmoothAPLoss(3, queue_size=8, temperature=0.5, max_pool_size=max_pool_size)
    gen = torch.Generator().manual_seed(0)
    loss_fn(*random_batch(gen, 6, 3)[:2])  # fill part of the queue
    logits, targets, _ = random_batch(gen, 6, 3)
    logits.requires_grad_()
    (grad,) = torch.autograd.grad(loss_fn(logits, targets), logits, create_graph=True)
    # Also alongside a term that needs no second derivative: never a silently dropped Hessian.
    penalty = grad.square().sum() + logits.sum()
    with pytest.raises(RuntimeError, match="once_differentiable: SmoothAPLoss .* not twice"):
        penalty.backward()
