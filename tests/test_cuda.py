"""The loss on CUDA: same values as on CPU, and host syncs that do not grow with the classes.

Contract §7: "On CUDA: no host synchronisation per class". The loss does a small, fixed number of
syncs per forward (the metadata row it reads back with ``.tolist()``, row counts for
``nonzero``), so the honest check is that the *number* of syncs of a forward + backward is the
same for C=2 and C=100, counted with ``torch.cuda.set_sync_debug_mode("warn")``. The backward
alone must not sync at all (checked under ``"error"``).

Skipped, with the reason, on machines without CUDA. ``scripts/gpu_check.sh`` runs this file.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from imbalanced_losses import RecallAtQuantileLoss, SmoothAPLoss

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA device (torch.cuda.is_available() is False); "
    "run scripts/gpu_check.sh on a GPU machine",
)

DEVICE = "cuda"


def _batch(gen: torch.Generator, n: int, num_classes: int, dtype: torch.dtype, pad: bool):
    logits = (torch.randn(n, num_classes, generator=gen, dtype=torch.float64) * 2).to(dtype)
    if num_classes == 1:
        targets = (torch.rand(n, generator=gen) < 0.05).long()
    else:
        targets = torch.randint(0, num_classes, (n,), generator=gen)
    if pad:
        targets[torch.rand(n, generator=gen) < 0.1] = -100
    weights = torch.rand(n, generator=gen, dtype=torch.float64).to(dtype)
    return logits, targets, weights


CONFIGS = [
    # (num_classes, batch, queue_size, quantile, interpolation, weighted, padded)
    (1, 5000, 0, 0.1, "higher", False, False),
    (1, 3000, 8192, 0.1, "linear", True, True),
    (16, 4096, 8192, 0.1, "higher", False, True),
    (100, 4096, 16384, 0.05, "midpoint", True, False),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"C{c[0]}-q{c[2]}-{c[4]}")
def test_cuda_matches_cpu(config, dtype):
    num_classes, batch, queue, quantile, interp, weighted, padded = config
    kwargs = dict(
        quantile=quantile, queue_size=queue, quantile_interpolation=interp, temperature=0.05
    )
    cpu = RecallAtQuantileLoss(num_classes, **kwargs).to(dtype)
    gpu = RecallAtQuantileLoss(num_classes, **kwargs).to(dtype).to(DEVICE)
    gen = torch.Generator().manual_seed(num_classes * 1000 + batch)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    for _ in range(4):  # several steps: the queue fills and wraps
        logits, targets, weights = _batch(gen, batch, num_classes, dtype, padded)
        sw = weights if weighted else None
        x_cpu = logits.clone().requires_grad_(True)
        x_gpu = logits.to(DEVICE).requires_grad_(True)
        loss_cpu, per_cpu, valid_cpu = cpu(x_cpu, targets, return_per_class=True, sample_weight=sw)
        loss_gpu, per_gpu, valid_gpu = gpu(
            x_gpu,
            targets.to(DEVICE),
            return_per_class=True,
            sample_weight=None if sw is None else sw.to(DEVICE),
        )
        loss_cpu.backward()
        loss_gpu.backward()
        torch.testing.assert_close(loss_gpu.cpu(), loss_cpu, **tol)
        torch.testing.assert_close(per_gpu.cpu(), per_cpu, equal_nan=True, **tol)
        assert torch.equal(valid_gpu.cpu(), valid_cpu)
        torch.testing.assert_close(x_gpu.grad.cpu(), x_cpu.grad, **tol)
        n = cpu.queue.count
        assert gpu.queue.count == n and gpu.queue.ptr == cpu.queue.ptr
        # The queue stores detached inputs: exactly equal, whatever the device.
        assert torch.equal(gpu.queue.scores[:n].cpu(), cpu.queue.scores[:n])
        assert torch.equal(gpu.queue.targets[:n].cpu(), cpu.queue.targets[:n])


def _count_syncs(num_classes: int, batch: int = 8192, queue: int = 65536) -> int:
    """Host syncs during one steady-state forward + backward, counted by sync-debug warnings."""
    loss_fn = RecallAtQuantileLoss(num_classes, quantile=0.01, queue_size=queue).to(DEVICE)
    gen = torch.Generator().manual_seed(0)
    logits, targets, _ = _batch(gen, batch, num_classes, torch.float32, pad=True)
    logits, targets = logits.to(DEVICE), targets.to(DEVICE)
    for _ in range(3):  # warm-up: first-call paths, queue filled
        loss_fn(logits.clone().requires_grad_(True), targets).backward()
    torch.cuda.synchronize()
    x = logits.clone().requires_grad_(True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            loss_fn(x, targets).backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return sum("synchroniz" in str(w.message) for w in caught)


def test_host_syncs_do_not_grow_with_classes():
    few, many = _count_syncs(2), _count_syncs(100)
    print(f"host syncs per forward+backward: C=2 -> {few}, C=100 -> {many}")
    assert many == few, f"syncs grow with the number of classes: C=2 {few}, C=100 {many}"
    assert many <= 8, f"{many} host syncs per step is more than a small fixed number"


def test_backward_does_not_sync():
    loss_fn = RecallAtQuantileLoss(100, quantile=0.01, queue_size=16384).to(DEVICE)
    gen = torch.Generator().manual_seed(1)
    logits, targets, _ = _batch(gen, 8192, 100, torch.float32, pad=True)
    x = logits.to(DEVICE).requires_grad_(True)
    targets = targets.to(DEVICE)
    loss_fn(x.detach().clone().requires_grad_(True), targets).backward()  # warm-up
    loss = loss_fn(x, targets)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("max_pool_size", [None, 1000])
@pytest.mark.parametrize("num_classes", [1, 5])
def test_smooth_ap_matches_cpu_syncs_at_most_twice_per_forward_and_never_in_backward(
    num_classes, max_pool_size
):
    """Positives are selected with host-known counts (``nonzero_static``): one sync for the
    metadata, one more for a binary pool's queued/sampled positive count, none in backward."""

    def make(device: str) -> SmoothAPLoss:
        loss_fn = SmoothAPLoss(num_classes, queue_size=2048, max_pool_size=max_pool_size)
        return loss_fn.to(device)

    on_cpu, on_cuda = make("cpu"), make(DEVICE)
    gen = torch.Generator().manual_seed(2)
    batches = [_batch(gen, 1024, num_classes, torch.float64, pad=True) for _ in range(4)]
    for logits, targets, _ in batches[:3]:  # warm-up: the queue fills
        for device, loss_fn in (("cpu", on_cpu), (DEVICE, on_cuda)):
            loss_fn(logits.to(device).requires_grad_(True), targets.to(device)).backward()
    logits, targets, _ = batches[3]
    x_cpu = logits.clone().requires_grad_(True)
    want = on_cpu(x_cpu, targets)
    want.backward()
    x = logits.to(DEVICE).requires_grad_(True)
    targets = targets.to(DEVICE)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            loss = on_cuda(x, targets)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    forward_syncs = sum("synchroniz" in str(w.message) for w in caught)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert forward_syncs <= 2, f"{forward_syncs} host syncs in one forward"
    torch.testing.assert_close(loss.cpu(), want, rtol=1e-9, atol=1e-12)
    assert x.grad is not None and x_cpu.grad is not None
    torch.testing.assert_close(x.grad.cpu(), x_cpu.grad, rtol=1e-9, atol=1e-12)
