"""Differentiating a gradient through a gather across ranks raises a clear error on every rank.

The gathers' backwards are the replicated rule (or an all-reduce): a second derivative would
need the other ranks' terms, another collective. Without the mark, ``create_graph=True``
followed by a gradient penalty ran and silently dropped those terms. The first derivative,
built with ``create_graph=True``, is unchanged.
"""

from __future__ import annotations

import pytest
import torch

from imbalanced_losses import _distributed
from imbalanced_losses.testing import run_ranks

SIZES = [3, 5]


def _gathered(kind: str, x: torch.Tensor) -> torch.Tensor:
    if kind == "gather_rows":
        return _distributed.gather_rows(x, SIZES)
    if kind == "gather_own_column":
        column = torch.arange(x.shape[0]) % x.shape[1]
        return _distributed.gather_own_column(x, column, x.new_zeros(x.shape[0], 1), SIZES)[2]
    return _distributed.all_gather_with_grad(x)


def _second_derivative(rank: int, kind: str) -> tuple[bool, str]:
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(SIZES[rank], 2, generator=gen, dtype=torch.float64, requires_grad=True)
    (plain,) = torch.autograd.grad(_gathered(kind, x).pow(3).sum(), x)
    (grad,) = torch.autograd.grad(_gathered(kind, x).pow(3).sum(), x, create_graph=True)
    same_first_derivative = torch.equal(grad.detach(), plain)
    try:
        (grad.square().sum() + x.sum()).backward()
    except RuntimeError as error:
        return same_first_derivative, str(error)
    return same_first_derivative, "no error"


@pytest.mark.parametrize(
    ("kind", "named"),
    [
        ("gather_rows", "gather of rows across ranks"),
        ("gather_own_column", "gather of own-class scores across ranks"),
        ("all_gather_with_grad", "all_gather_with_grad"),
    ],
)
def test_a_gradient_penalty_through_a_gather_raises_on_every_rank(kind, named):
    results = run_ranks(_second_derivative, 2, args=(kind,), timeout_s=60)
    for rank, (same_first_derivative, message) in enumerate(results):
        assert same_first_derivative, f"rank {rank}: create_graph changed the gradient"
        assert "once_differentiable" in message and named in message, f"rank {rank}: {message}"
        assert "not twice differentiable" in message, f"rank {rank}: {message}"
