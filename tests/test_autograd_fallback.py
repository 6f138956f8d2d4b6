"""``once_differentiable`` without torch's private ``DelayedError``: the package still imports and
a double backward still stops with the clear message (the pure-Python fallback node)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from imbalanced_losses import SmoothAPLoss, _autograd
from imbalanced_losses._autograd import once_differentiable


class _Square(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    @once_differentiable("the test square")
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


@pytest.fixture(params=["private", "fallback"])
def delayed_error(request, monkeypatch):
    """Both paths: torch's private node, and the fallback forced by hiding it."""
    if request.param == "fallback":
        monkeypatch.setattr(_autograd, "_TorchDelayedError", None)
    elif _autograd._TorchDelayedError is None:
        pytest.skip("this torch has no private DelayedError; the fallback case covers it")
    return request.param


def test_a_double_backward_raises_the_clear_message_on_either_path(delayed_error):
    x = torch.randn(4, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(_Square.apply(x).sum(), x, create_graph=True)
    torch.testing.assert_close(grad, 2 * x.detach())  # first-order gradient unchanged
    with pytest.raises(RuntimeError, match="once_differentiable: the test square is not twice"):
        (grad.square().sum() + x.sum()).backward()


def test_a_single_backward_is_untouched_on_either_path(delayed_error):
    x = torch.randn(4, dtype=torch.float64, requires_grad=True)
    _Square.apply(x).sum().backward()
    torch.testing.assert_close(x.grad, 2 * x.detach())


def test_a_loss_says_it_is_once_differentiable_through_the_fallback(monkeypatch):
    monkeypatch.setattr(_autograd, "_TorchDelayedError", None)
    gen = torch.Generator().manual_seed(0)
    loss_fn = SmoothAPLoss(3, queue_size=8, temperature=0.5)
    logits = torch.randn(6, 3, generator=gen, requires_grad=True)
    targets = torch.tensor([0, 1, 2, 0, 1, 2])
    (grad,) = torch.autograd.grad(loss_fn(logits, targets), logits, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable: SmoothAPLoss .* not twice"):
        grad.square().sum().backward()


def test_the_package_imports_when_torch_lacks_the_private_node():
    code = (
        "from torch._C import _functions as f\n"
        "del f.DelayedError\n"
        "import imbalanced_losses\n"
        "from imbalanced_losses import _autograd\n"
        "assert _autograd._TorchDelayedError is None\n"
        "print('imported')\n"
    )
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "imported" in done.stdout
