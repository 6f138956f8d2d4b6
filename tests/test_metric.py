"""recall_at_quantile (hard recall, score >= theta counts) equals the plain reference metric."""

from __future__ import annotations

import pytest
import torch
from _support import INTERPOLATIONS, TIGHT
from hypothesis import given
from hypothesis import strategies as st

from imbalanced_losses import recall_at_quantile
from imbalanced_losses.testing.reference import reference_recall_at_quantile


@given(
    n=st.integers(1, 120),
    num_classes=st.integers(0, 5),  # 0 means scores of shape [N] (binary)
    quantile=st.one_of(st.sampled_from([0.5, 0.3, 0.1, 0.01, 0.001]), st.floats(1e-4, 0.9999)),
    interpolation=st.sampled_from(INTERPOLATIONS),
    reduction=st.sampled_from(["none", "mean"]),
    ties=st.booleans(),
    pad=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_reference_metric(
    n, num_classes, quantile, interpolation, reduction, ties, pad, dtype, seed
):
    gen = torch.Generator().manual_seed(seed)
    width = max(num_classes, 1)
    if ties:
        scores = torch.randint(-2, 3, (n, width), generator=gen).to(dtype)
    else:
        scores = torch.randn(n, width, generator=gen, dtype=dtype)
    labels = 2 if num_classes <= 1 else num_classes
    targets = torch.randint(0, labels, (n,), generator=gen)
    if pad:
        targets[torch.rand(n, generator=gen) < 0.3] = -100
    if num_classes == 0:
        scores = scores[:, 0]
    if (targets != -100).sum() == 0:
        return
    kwargs = dict(interpolation=interpolation, reduction=reduction)
    got = recall_at_quantile(scores, targets, quantile, **kwargs)
    expected = reference_recall_at_quantile(scores, targets, quantile, **kwargs)
    assert got.shape == expected.shape
    torch.testing.assert_close(got.double(), expected, equal_nan=True, **TIGHT)


def test_shapes_and_no_gradient():
    scores = torch.randn(50, requires_grad=True)
    targets = (torch.arange(50) % 5 == 0).long()
    out = recall_at_quantile(scores, targets, 0.2)
    assert out.shape == () and not out.requires_grad
    assert recall_at_quantile(scores[:, None], targets, 0.2).shape == (1,)
    multi = recall_at_quantile(torch.randn(50, 3), torch.arange(50) % 2, 0.2)
    assert multi.shape == (3,) and torch.isnan(multi[2]) and not torch.isnan(multi[:2]).any()
    assert (
        recall_at_quantile(torch.randn(50, 3), torch.arange(50) % 2, 0.2, reduction="mean").shape
        == ()
    )


def test_positive_at_threshold_counts():
    # Hard recall uses score >= theta: a positive exactly at theta is a hit.
    scores = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0])
    targets = torch.tensor([0, 0, 0, 1, 0])
    # theta = quantile(scores, 0.75, 'higher') = 3.0 -> the positive at 3.0 is recalled.
    assert recall_at_quantile(scores, targets, 0.25).item() == 1.0
    assert recall_at_quantile(scores, targets, 0.1).item() == 0.0  # theta = 4.0


@pytest.mark.parametrize("bad", [torch.tensor([0, 1, 3, 0]), torch.tensor([0.0, 1.0, 0.0, 1.0])])
def test_bad_targets_raise(bad):
    with pytest.raises((ValueError, TypeError), match="targets"):
        recall_at_quantile(torch.randn(4), bad, 0.3)
