"""``SmoothAPLoss(sharded=True)`` through the loss's forward on real gloo ranks (1-4): step after
step, each rank's loss, per-class values, valid classes and gradient of its own logits (/ W, the
DDP average) equal one process fed the concatenated global batch (float64, 1e-12), whenever the
union of the shards is the gathered pool: equal per-rank batches (padding rows included, the
same number on every rank) and ``queue_size`` a multiple of the global batch. Binary and
multi-class, weights, an eval step; each rank keeps ``queue_size // W`` rows."""

from __future__ import annotations

import pytest
import torch

from imbalanced_losses import SmoothAPLoss, _distributed
from imbalanced_losses.testing import run_ranks

STEPS = 5
PER_RANK = 7  # rows per rank and step, PADDED of them padding
PADDED = 2
EVAL_STEP = 3  # run in eval(): no queue write


def _batches(world_size: int, num_classes: int, weighted: bool) -> list[tuple]:
    """Every step's global batch (rank r holds rows [r * PER_RANK, (r + 1) * PER_RANK))."""
    gen = torch.Generator().manual_seed(19 + 10 * world_size + num_classes)
    out = []
    for _ in range(STEPS):
        n = PER_RANK * world_size
        logits = torch.randn(n, num_classes, generator=gen, dtype=torch.float64) * 2
        high = 2 if num_classes == 1 else num_classes
        targets = torch.randint(0, high, (n,), generator=gen)
        for r in range(world_size):  # the same number of padding rows on every rank
            pad = torch.randperm(PER_RANK, generator=gen)[:PADDED] + r * PER_RANK
            targets[pad] = -100
        weights = None
        if weighted:
            weights = 2 * torch.rand(n, generator=gen, dtype=torch.float64)
            weights[::5] = 0.0
        out.append((logits, targets, weights))
    return out


def _options(num_classes: int, world_size: int, reduction: str) -> dict:
    kept = (PER_RANK - PADDED) * world_size  # the global batch the queue holds
    return {
        "num_classes": num_classes,
        "temperature": 0.4,
        "queue_size": 2 * kept,
        "reduction": reduction,
    }


def _run(loss_fn, batches, rows: slice, scale: float) -> list[dict]:
    """Each step's output and gradient of this block of rows (times ``scale``)."""
    out = []
    for step, (logits, targets, weights) in enumerate(batches):
        loss_fn.train(step != EVAL_STEP)
        x = logits[rows].clone().requires_grad_()
        w = None if weights is None else weights[rows]
        loss, per_class, valid = loss_fn(x, targets[rows], sample_weight=w, return_per_class=True)
        objective = loss if loss.dim() == 0 else torch.where(valid, loss, 0.0).sum()
        objective.backward()
        grad = torch.zeros_like(x) if x.grad is None else x.grad
        out.append(
            {"loss": loss.detach(), "per_class": per_class.detach(), "valid": valid, "grad": grad}
        )
        out[-1]["grad"] = out[-1]["grad"] * scale
    return out


def _sharded_rank(rank: int, world_size: int, num_classes: int, weighted: bool, reduction: str):
    loss_fn = SmoothAPLoss(**_options(num_classes, world_size, reduction), sharded=True).double()
    batches = _batches(world_size, num_classes, weighted)
    rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    _distributed.reset_traffic()
    steps = _run(loss_fn, batches, rows, 1.0 / world_size)  # DDP's average over W ranks
    return {"steps": steps, "shard": (loss_fn.queue.capacity, loss_fn.queue.count)}


@pytest.mark.parametrize(
    "world_size,num_classes,weighted,reduction",
    [
        (1, 3, True, "mean"),
        (2, 1, False, "mean"),
        (2, 4, True, "none"),
        (3, 1, True, "sum"),
        (3, 3, False, "mean"),
        (4, 2, True, "none"),
    ],
)
def test_sharded_smooth_ap_equals_one_process_on_the_global_batch(
    world_size, num_classes, weighted, reduction
):
    results = run_ranks(
        _sharded_rank,
        world_size,
        args=(world_size, num_classes, weighted, reduction),
        timeout_s=300,
    )
    oracle = SmoothAPLoss(**_options(num_classes, world_size, reduction)).double()
    want = _run(oracle, _batches(world_size, num_classes, weighted), slice(None), 1.0)
    queue_size = _options(num_classes, world_size, reduction)["queue_size"]
    for rank, got in enumerate(results):
        assert got["shard"] == (queue_size // world_size,) * 2, "each rank keeps queue_size // W"
        for step, (g, w) in enumerate(zip(got["steps"], want)):
            where = f"rank {rank}, step {step}"
            assert torch.equal(g["valid"], w["valid"]), where
            for key in ("loss", "per_class"):
                torch.testing.assert_close(
                    g[key], w[key], rtol=1e-12, atol=1e-12, equal_nan=True, msg=f"{where} {key}"
                )
            mine = w["grad"][rank * PER_RANK : (rank + 1) * PER_RANK]
            torch.testing.assert_close(g["grad"], mine, rtol=1e-12, atol=1e-12, msg=where)
    # Some step had a valid class with a gradient (else the comparison would prove little).
    assert any(s["valid"].any() and s["grad"].abs().sum() > 0 for s in want)
