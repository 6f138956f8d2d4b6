"""Contract §4: fp16/bf16 logits work (computed in float32 or better); a float64 module is exact
to float64; the gradient is the sigmoid's w.r.t. positives only (gradcheck, threshold fixed)."""

from __future__ import annotations

import pytest
import torch
from _support import TIGHT, assert_same_queue, make_pair, random_batch

from imbalanced_losses import RecallAtQuantileLoss
from imbalanced_losses.testing.reference import ReferenceRecallAtQuantileLoss

pytestmark = pytest.mark.filterwarnings("ignore:.*pool.*:UserWarning")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_classes", [1, 4])
def test_half_precision_logits_are_computed_in_float32(dtype, num_classes):
    lib = RecallAtQuantileLoss(num_classes, quantile=0.1, queue_size=64, temperature=0.01)
    ref = ReferenceRecallAtQuantileLoss(
        num_classes, quantile=0.1, queue_size=64, temperature=0.01, dtype=torch.float32
    )
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        logits, targets, _ = random_batch(gen, 40, num_classes, dtype=dtype)
        logits.requires_grad_(True)
        loss = lib(logits, targets)
        assert loss.dtype in (torch.float32, torch.float64), loss.dtype
        # Same numbers as the float32 reference on the (exactly representable) upcast logits;
        # a half-precision computation with tau = 0.01 would be off by far more.
        wide = logits.detach().float().requires_grad_(True)
        expected = ref(wide, targets)
        torch.testing.assert_close(loss.float(), expected, rtol=1e-6, atol=1e-6)
        (grad,) = torch.autograd.grad(loss, logits)
        assert grad.dtype == dtype and torch.isfinite(grad).all()
        torch.testing.assert_close(
            grad.float(),
            torch.autograd.grad(expected, wide)[0].to(dtype).float(),
            rtol=1e-2,
            atol=1e-3,
        )
    assert lib.queue.scores.dtype == torch.float32
    assert_same_queue(lib, ref)


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


def test_float32_logits_into_a_float64_module_compute_in_float64():
    lib, ref = make_pair(3, quantile=0.2, queue_size=32, temperature=0.05)
    gen = torch.Generator().manual_seed(4)
    for _ in range(3):
        logits, targets, _ = random_batch(gen, 20, 3, dtype=torch.float32)
        loss = lib(logits, targets)
        assert loss.dtype == torch.float64
        torch.testing.assert_close(loss, ref(logits, targets), **TIGHT)
    assert_same_queue(lib, ref)
