"""The recall loss in float64 and its gradient: a float64 module keeps float64 resolution (scores
1e-12 apart); the gradient is the sigmoid's w.r.t. positives only (gradcheck, threshold fixed).
Every loss's fp16/bf16/fp32/fp64 answers are checked in ``test_family_contract.py``."""

from __future__ import annotations

import pytest
import torch
from _support import TIGHT, assert_same_queue, make_pair

from imbalanced_losses import RecallAtQuantileLoss

pytestmark = pytest.mark.filterwarnings("ignore:.*pool.*:UserWarning")


def test_float64_module_keeps_float64_resolution():
    # Scores 1e-12 apart with tau = 1e-11: any trip through float32 (1 ulp ~ 1.2e-7) merges them.
    n = 40
    logits = (1.0 + torch.arange(n, dtype=torch.float64) * 1e-12)[:, None].repeat(1, 2)
    logits[:, 1] = logits[:, 1].flip(0)
    targets = torch.arange(n) % 2
    lib, ref = make_pair(
        2, quantile=0.25, queue_size=64, temperature=1e-11, quantile_interpolation="linear"
    )
    x = logits.clone().requires_grad_(True)
    loss = lib(x, targets)
    expected = ref(logits.clone().requires_grad_(True), targets)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, expected, **TIGHT)
    assert 0.05 < loss.item() < 0.95
    assert torch.equal(lib.queue.scores[:n], logits)
    assert lib.queue.scores.dtype == lib.queue.weights.dtype == torch.float64
    loss2 = lib(logits, targets)
    torch.testing.assert_close(loss2, ref(logits, targets), **TIGHT)
    assert_same_queue(lib, ref)


def _gradcheck_setup(num_classes, reduction, seed=0):
    """An eval-mode loss whose thresholds sit on queued rows at integers, with live scores at
    half-integers: a small perturbation of a live score never moves a threshold, so the
    numerical derivative sees exactly the analytic (threshold held fixed) one."""
    lib = RecallAtQuantileLoss(
        num_classes,
        quantile=0.2,
        queue_size=100,
        temperature=0.7,
        reduction=reduction,
        quantile_interpolation="higher",
    ).double()
    gen = torch.Generator().manual_seed(seed)
    queued = torch.randint(-6, 7, (100, num_classes), generator=gen).double()
    queued_targets = torch.randint(0, 2 if num_classes == 1 else num_classes, (100,), generator=gen)
    lib.queue.push(queued, queued_targets)
    lib.eval()
    n = 8
    logits = (
        torch.randint(-4, 4, (n, num_classes), generator=gen).double()
        + 0.5
        + 0.01 * torch.rand(n, num_classes, generator=gen, dtype=torch.float64)
    )
    targets = torch.arange(n) % (2 if num_classes == 1 else num_classes)
    weights = torch.rand(n, generator=gen, dtype=torch.float64) + 0.1
    return lib, logits.requires_grad_(True), targets, weights


@pytest.mark.parametrize("num_classes", [1, 3])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck_with_fixed_threshold(num_classes, reduction):
    lib, logits, targets, weights = _gradcheck_setup(num_classes, reduction)
    before = lib.queue.count
    assert torch.autograd.gradcheck(
        lambda x: lib(x, targets, sample_weight=weights), (logits,), eps=1e-6, atol=1e-8
    )
    assert lib.queue.count == before  # eval mode: gradcheck's many calls did not write


@pytest.mark.parametrize("num_classes", [1, 3])
def test_gradient_is_the_sigmoid_derivative_on_positives_only(num_classes):
    lib, logits, targets, weights = _gradcheck_setup(num_classes, "sum")
    loss = lib(logits, targets, sample_weight=weights)
    (grad,) = torch.autograd.grad(loss, logits)
    pool = torch.cat([logits.detach(), lib.queue.scores])
    pool_targets = torch.cat([targets, lib.queue.targets])
    pool_weights = torch.cat([weights, lib.queue.weights])
    expected = torch.zeros_like(grad)
    for c in range(num_classes):
        label = 1 if num_classes == 1 else c
        theta = torch.quantile(pool[:, c], 0.8, interpolation="higher")
        mass = pool_weights[pool_targets == label].sum()
        pos = targets == label
        z = torch.sigmoid((logits.detach()[pos, c] - theta) / 0.7)
        expected[pos, c] = -weights[pos] * z * (1 - z) / 0.7 / mass
    torch.testing.assert_close(grad, expected, **TIGHT)
