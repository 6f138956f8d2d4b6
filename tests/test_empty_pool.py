"""An empty pool (no live row counts, empty queue) still gives a result that back-propagates."""

from __future__ import annotations

import pytest
import torch

from imbalanced_losses import RecallAtQuantileLoss


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("rows", [0, 4])  # an empty batch, or a batch of padding rows only
def test_empty_pool_result_is_connected_to_the_graph(reduction, rows):
    loss_fn = RecallAtQuantileLoss(3, quantile=0.3, queue_size=0, reduction=reduction).double()
    logits = torch.randn(rows, 3, dtype=torch.float64, requires_grad=True)
    targets = torch.full((rows,), -100)
    out = loss_fn(logits, targets)
    assert out.requires_grad
    if reduction == "none":
        assert out.shape == (3,) and torch.isnan(out).all()
    else:
        assert out.item() == 0.0
    (grad,) = torch.autograd.grad(out.sum(), logits)
    assert grad.shape == logits.shape and torch.equal(grad, torch.zeros_like(logits))
