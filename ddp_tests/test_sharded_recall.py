"""``RecallAtQuantileLoss(sharded=True)`` on real gloo ranks, checked directly (no DDP model):
each rank's loss, per-class values and gradient of its own logits equal a single process fed the
concatenated global batch, step after step, whenever the union of the shards is the gathered
pool (equal per-rank batches, ``queue_size`` a multiple of the global batch); no rows travel,
and the bytes per step do not depend on the batch size or the world size.

The harness checks (DDP, parameters, uneven ranks against an oracle of the same shards) are in
``test_sharded_ddp.py``.
"""

from __future__ import annotations

import pytest
import torch

from imbalanced_losses import RecallAtQuantileLoss, _distributed
from imbalanced_losses.testing import run_ranks

STEPS = 5


def _batches(world_size: int, per_rank: int, num_classes: int, weighted: bool):
    """The global batches of every step (rank r holds rows [r * per_rank, (r + 1) * per_rank))."""
    gen = torch.Generator().manual_seed(7 + world_size)
    out = []
    for _ in range(STEPS):
        n = per_rank * world_size
        logits = torch.randn(n, num_classes, generator=gen, dtype=torch.float64)
        high = 2 if num_classes == 1 else num_classes
        targets = torch.randint(0, high, (n,), generator=gen)
        weights = 2 * torch.rand(n, generator=gen, dtype=torch.float64) if weighted else None
        out.append((logits, targets, weights))
    return out


def _options(num_classes: int, per_rank: int, world_size: int, interpolation: str) -> dict:
    return {
        "num_classes": num_classes,
        "quantile": 0.3,
        "temperature": 0.5,
        "queue_size": 2 * per_rank * world_size,
        "quantile_interpolation": interpolation,
        "reduction": "none",
        # The live positives only (the queue sets the threshold) in one case of each world.
        "positives": "live" if interpolation in ("linear", "lower") else "pool",
    }


def _run(loss_fn, batches, rows: slice, scale: float) -> list[dict]:
    """Each step's output and gradient of this block of rows (times ``scale``)."""
    out = []
    for logits, targets, weights in batches:
        x = logits[rows].clone().requires_grad_()
        w = None if weights is None else weights[rows]
        loss, per_class, valid = loss_fn(x, targets[rows], sample_weight=w, return_per_class=True)
        torch.where(valid, loss, 0.0).sum().backward()
        out.append({"loss": loss.detach(), "valid": valid, "grad": x.grad * scale})
    return out


def _no_rows_travel(*args, **kwargs):
    raise AssertionError("sharded mode gathered rows")


def _sharded_rank(rank: int, world_size: int, per_rank: int, num_classes: int, weighted, interp):
    for name in ("gather_rows", "gather_own_column", "_gather_padded"):
        setattr(_distributed, name, _no_rows_travel)  # this process only (a spawned rank)
    loss_fn = RecallAtQuantileLoss(
        **_options(num_classes, per_rank, world_size, interp), sharded=True
    ).double()
    batches = _batches(world_size, per_rank, num_classes, weighted)
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    _distributed.reset_traffic()
    steps = _run(loss_fn, batches, rows, 1.0 / world_size)  # the replicated rule's factor W
    traffic = _distributed.traffic()
    return {
        "steps": steps,
        "shard": (loss_fn.queue.capacity, loss_fn.queue.count),
        "bytes": traffic.reduced,  # the statistics (all-reduces)
        "metadata": traffic.gathered - traffic.rows,  # the agreed row of every rank
        "rows": traffic.rows,
        "calls": traffic.calls,
    }


@pytest.mark.parametrize(
    "world_size,num_classes,weighted,interpolation",
    [
        (2, 3, False, "higher"),
        (2, 1, True, "linear"),
        (3, 4, True, "midpoint"),
        (4, 2, False, "lower"),
    ],
)
def test_sharded_loss_and_gradient_equal_one_process_on_the_global_batch(
    world_size, num_classes, weighted, interpolation
):
    per_rank = 6
    results = run_ranks(
        _sharded_rank,
        world_size,
        args=(world_size, per_rank, num_classes, weighted, interpolation),
        timeout_s=300,
    )
    oracle = RecallAtQuantileLoss(**_options(num_classes, per_rank, world_size, interpolation))
    batches = _batches(world_size, per_rank, num_classes, weighted)
    want = _run(oracle.double(), batches, slice(None), 1.0)
    for rank, got in enumerate(results):
        assert got["shard"] == (2 * per_rank, 2 * per_rank), "each rank keeps queue_size // W"
        for step, (g, w) in enumerate(zip(got["steps"], want)):
            where = f"rank {rank}, step {step}"
            assert torch.equal(g["valid"], w["valid"]), where
            torch.testing.assert_close(
                g["loss"], w["loss"], rtol=1e-12, atol=1e-12, equal_nan=True, msg=where
            )
            mine = w["grad"][rank * per_rank : (rank + 1) * per_rank]
            torch.testing.assert_close(g["grad"], mine, rtol=1e-12, atol=1e-12, msg=where)
        assert torch.equal(got["steps"][-1]["loss"], results[0]["steps"][-1]["loss"])


def _expected_bytes_per_step(num_classes: int) -> int:
    """float64 scores: 8 radix rounds of [C, 256] int32 counts (the first with C NaN counts),
    then the [3, C] float64 sums; "higher" needs no second order statistic."""
    rounds = 4 * num_classes * 257 + 7 * 4 * num_classes * 256
    return rounds + 3 * num_classes * 8


@pytest.mark.parametrize("world_size", [2, 3])
def test_bytes_per_step_depend_on_the_classes_only_not_on_the_batch_or_the_world(world_size):
    metadata = set()
    for per_rank in (4, 32):
        results = run_ranks(
            _sharded_rank, world_size, args=(world_size, per_rank, 3, True, "higher"), timeout_s=300
        )
        for got in results:
            # 8 rounds + 1 sum + the metadata gather per step, nothing else
            assert got["calls"] == STEPS * 10
            assert got["bytes"] == STEPS * _expected_bytes_per_step(3), (per_rank, got["bytes"])
            assert got["rows"] == 0
            # the metadata all_gather: one row per rank, whatever the batch
            assert got["metadata"] % (STEPS * world_size) == 0, got["metadata"]
            metadata.add(got["metadata"] // (STEPS * world_size))
    assert len(metadata) == 1 and metadata.pop() > 0


def _misconfigured_rank(rank: int) -> dict:
    """Each case must raise on every rank (none may wait in a collective the others skipped)."""
    out = {}
    cases = {
        "sharded": dict(queue_size=8, sharded=rank == 0),
        "queue_size": dict(queue_size=2, sharded=True),  # 3 ranks: shards of 2 // 3 = 0 rows
    }
    for name, options in cases.items():
        loss_fn = RecallAtQuantileLoss(3, quantile=0.3, **options).double()
        try:
            loss_fn(torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 0]))
            out[name] = (None, loss_fn.queue.count)
        except ValueError as exc:
            out[name] = (str(exc), loss_fn.queue.count)
    # The group still works: a good sharded step on every rank, one rank without rows.
    good = RecallAtQuantileLoss(3, quantile=0.3, queue_size=6, sharded=True).double()
    rows = 0 if rank == 1 else 4
    out["good"] = good(torch.randn(rows, 3, dtype=torch.float64), torch.arange(rows) % 3)
    return out


def test_a_sharded_misconfiguration_raises_on_every_rank_before_any_state_changes():
    results = run_ranks(_misconfigured_rank, 3, timeout_s=300)
    for out in results:
        message, count = out["sharded"]
        assert message is not None and "sharded (rank 0: True, rank 1: False" in message, message
        assert count == 0
        message, count = out["queue_size"]
        assert message is not None and "queue_size=2 with sharded=True over 3 ranks" in message
        assert "expected queue_size >= 3" in message and count == 0
        assert torch.equal(out["good"], results[0]["good"])


def _warnings_on_rank(rank: int, quantile: float, rows: int, positives_on_rank_0: bool) -> list:
    """One step; the warnings this rank shows (pool size and positive fraction)."""
    import warnings

    loss_fn = RecallAtQuantileLoss(1, quantile=quantile, queue_size=0, sharded=True).double()
    targets = torch.full((rows,), int(positives_on_rank_0 and rank == 0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss_fn(torch.randn(rows, 1, dtype=torch.float64), targets)
    return [str(w.message) for w in caught]


@pytest.mark.parametrize(
    "quantile,rows,expected",
    [
        (0.4, 40, "positives make up 50.00% of the 80 pooled rows"),  # rank 1 alone: 0%
        (0.6, 40, None),  # rank 0 alone: 100%, above the quantile; globally 50%, below
    ],
)
def test_the_positive_fraction_warning_judges_the_global_pool_on_every_rank(
    quantile, rows, expected
):
    results = run_ranks(_warnings_on_rank, 2, args=(quantile, rows, True), timeout_s=300)
    for rank, messages in enumerate(results):
        fraction = [m for m in messages if "positives make up" in m]
        if expected is None:
            assert fraction == [], (rank, fraction)
        else:
            assert len(fraction) == 1 and expected in fraction[0], (rank, messages)


def test_the_small_pool_warning_judges_the_global_pool():
    """3 ranks x 8 rows at quantile 0.05: 24 * 0.05 >= 1 globally (no warning), although each
    rank's own 8 rows would be too few; at 2 rows per rank, 6 * 0.05 < 1 warns on every rank."""
    for rows, warned in ((8, False), (2, True)):
        results = run_ranks(_warnings_on_rank, 3, args=(0.05, rows, False), timeout_s=300)
        for rank, messages in enumerate(results):
            small = [m for m in messages if "too few for quantile" in m]
            assert bool(small) == warned, (rows, rank, messages)
            if warned:
                assert f"the pool holds {3 * rows} rows" in small[0]


def _float32_rank(rank: int) -> list[torch.Tensor]:
    """The default float32 loss and queue, sharded over 2 ranks, equal batches of 16."""
    gen = torch.Generator().manual_seed(11)
    loss_fn = RecallAtQuantileLoss(4, quantile=0.2, temperature=0.3, queue_size=64, sharded=True)
    out = []
    for _ in range(5):
        logits = torch.randn(32, 4, generator=gen)
        targets = torch.randint(0, 4, (32,), generator=gen)
        x = logits[16 * rank : 16 * rank + 16].clone().requires_grad_()
        loss = loss_fn(x, targets[16 * rank : 16 * rank + 16])
        loss.backward()
        out.append(torch.cat([loss.detach()[None], x.grad.flatten() / 2]))
    return out


def test_the_float32_sharded_loss_matches_one_process_to_float32_rounding():
    """The thresholds are exact order statistics in any dtype; only the sums' order differs."""
    results = run_ranks(_float32_rank, 2, timeout_s=300)
    gen = torch.Generator().manual_seed(11)
    oracle = RecallAtQuantileLoss(4, quantile=0.2, temperature=0.3, queue_size=64)
    for step in range(5):
        logits = torch.randn(32, 4, generator=gen).requires_grad_()
        loss = oracle(logits, torch.randint(0, 4, (32,), generator=gen))
        loss.backward()
        for rank, got in enumerate(results):
            grad = logits.grad[16 * rank : 16 * rank + 16].flatten()
            want = torch.cat([loss.detach()[None], grad])
            torch.testing.assert_close(got[step], want, rtol=1e-5, atol=1e-6)
