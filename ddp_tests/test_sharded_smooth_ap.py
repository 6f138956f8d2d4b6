"""Sharded Smooth-AP on real gloo ranks (1-4), pools built by hand: each rank holds a slice of
one global batch and one slice of one queue, and its sharded ``per_class_loss`` must equal the
gathered ``per_class_loss`` of the whole pool in one process (float64, 1e-12): per-class values,
valid classes, and the gradient (each rank's gradient of its rows / W == the single-process
gradient). Binary and multi-class, uneven and empty ranks, weights (zeros too), ties, positives
on one rank only, a class without positives, no positive at all, no queue, no live rows, and a
forward without gradient; the bytes per call grow with the positives only."""

from __future__ import annotations

import pytest
import torch

from imbalanced_losses import SmoothAPLoss, _distributed
from imbalanced_losses._pool import Pool, Rows
from imbalanced_losses.testing import run_ranks

TIGHT = dict(rtol=1e-12, atol=1e-12)


def _split(total: int, world_size: int, pattern: str) -> list[int]:
    """Per-rank row counts summing to ``total``: even, uneven with rank 0 empty, or all on one."""
    if pattern == "even" or world_size == 1:
        base = [total // world_size] * world_size
        base[-1] += total - sum(base)
        return base
    if pattern == "last":
        return [0] * (world_size - 1) + [total]
    weights = [0] + [r + 1 for r in range(1, world_size)]  # rank 0 empty, the rest uneven
    sizes = [total * w // sum(weights) for w in weights]
    sizes[-1] += total - sum(sizes)
    return sizes


def _cases(world_size: int) -> list[dict]:
    """The same list of global pools on every rank and in the parent (seeded)."""
    gen = torch.Generator().manual_seed(1900 + world_size)
    cases = []
    # (C, live rows, queue rows, split of live, split of queue, kind, temperature, grad)
    plans = [
        (1, 6 * world_size, 4 * world_size, "even", "even", "plain", 0.3, True),
        (4, 6 * world_size, 4 * world_size, "even", "even", "plain", 0.3, True),
        (1, 11, 7, "uneven", "uneven", "weighted", 1.0, True),
        (5, 11, 7, "uneven", "last", "weighted", 0.05, True),
        (1, 9, 5, "uneven", "even", "positives on one rank", 0.5, True),
        (4, 9, 5, "even", "uneven", "positives on one rank", 0.5, True),
        (4, 10, 6, "uneven", "uneven", "class without positive", 0.3, True),
        (1, 8, 4, "even", "uneven", "no positive", 0.3, True),
        (1, 8, 4, "even", "even", "all positive", 0.3, True),
        (3, 10, 0, "uneven", "even", "ties", 1.0, True),  # no queue
        (1, 10, 0, "even", "even", "ties", 0.2, True),
        (3, 0, 9, "even", "uneven", "plain", 0.3, False),  # queue only: nothing to differentiate
        (3, 12, 6, "last", "last", "weighted", 0.3, True),  # every row on the last rank
        (4, 7, 5, "uneven", "even", "weighted", 0.3, False),  # under no_grad
    ]
    for c, n, m, live_split, queue_split, kind, temperature, grad in plans:
        scores = torch.randn(n + m, c, generator=gen, dtype=torch.float64) * 2
        if kind == "ties":
            scores = torch.randint(-2, 3, (n + m, c), generator=gen).double()
        if c == 1:
            targets = (torch.rand(n + m, generator=gen) < 0.4).long()
        else:
            targets = torch.randint(0, c, (n + m,), generator=gen)
        weights = torch.ones(n + m, dtype=torch.float64)
        if kind == "weighted":
            weights = torch.rand(n + m, generator=gen, dtype=torch.float64) * 3
            weights[::4] = 0.0
        live_sizes = _split(n, world_size, live_split)
        queue_sizes = _split(m, world_size, queue_split)
        if kind == "positives on one rank":  # the positives (of class 3) live on the last rank
            others = torch.ones(n + m, dtype=torch.bool)
            others[n - live_sizes[-1] : n] = False
            if c == 1:
                targets = torch.where(others, 0, targets)
            else:
                targets = torch.where(others & (targets == 3), 0, targets)
        if kind == "class without positive":
            targets = torch.where(targets == 2, 1, targets)
        if kind == "no positive":
            targets = torch.zeros_like(targets)
        if kind == "all positive":
            targets = torch.ones_like(targets)
        coef = torch.rand(c, generator=gen, dtype=torch.float64) + 0.5
        cases.append(
            dict(
                num_classes=c,
                temperature=temperature,
                scores=scores,
                targets=targets,
                weights=weights,
                n=n,
                live_sizes=live_sizes,
                queue_sizes=queue_sizes,
                coef=coef,
                grad=grad,
                kind=kind,
            )
        )
    return cases


def _objective(per_class: torch.Tensor, valid: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """A reduction with unequal class weights, so every class's gradient is checked."""
    return (coef * torch.where(valid, per_class, torch.zeros_like(per_class))).sum()


def _rows(case: dict, start: int, stop: int) -> Rows:
    return Rows(
        case["scores"][start:stop].clone(),
        case["targets"][start:stop].clone(),
        case["weights"][start:stop].clone(),
    )


def _sharded_on_rank(rank: int, world_size: int) -> list[dict]:
    out = []
    for case in _cases(world_size):
        live_sizes, queue_sizes, n = case["live_sizes"], case["queue_sizes"], case["n"]
        a, b = sum(live_sizes[:rank]), sum(live_sizes[: rank + 1])
        live = _rows(case, a, b)
        live.scores.requires_grad_(case["grad"])
        queued = _rows(case, n + sum(queue_sizes[:rank]), n + sum(queue_sizes[: rank + 1]))
        pool = Pool(
            live,
            queued,
            case["num_classes"],
            sharded=True,
            global_size=case["scores"].shape[0],
        )
        loss_fn = SmoothAPLoss(case["num_classes"], temperature=case["temperature"]).double()
        _distributed.reset_traffic()
        with torch.set_grad_enabled(case["grad"]):
            per_class, valid = loss_fn.per_class_loss(pool)
        grad = None
        if case["grad"]:
            objective = _objective(per_class, valid, case["coef"])
            grad = torch.zeros_like(live.scores)
            if objective.requires_grad:  # not when no rank holds a positive
                (grad,) = torch.autograd.grad(objective, live.scores, allow_unused=True)
                grad = torch.zeros_like(live.scores) if grad is None else grad
        traffic = _distributed.traffic()
        out.append(
            dict(per_class=per_class.detach(), valid=valid, grad=grad, bytes=list(traffic.recent))
        )
    return out


def _gathered(case: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The oracle: the gathered path on the whole pool, one process."""
    n = case["n"]
    live = _rows(case, 0, n)
    live.scores.requires_grad_(case["grad"])
    pool = Pool(live, _rows(case, n, case["scores"].shape[0]), case["num_classes"])
    loss_fn = SmoothAPLoss(case["num_classes"], temperature=case["temperature"]).double()
    with torch.set_grad_enabled(case["grad"]):
        per_class, valid = loss_fn.per_class_loss(pool)
    if not case["grad"]:
        return per_class, valid, None
    objective = _objective(per_class, valid, case["coef"])
    if not objective.requires_grad:
        return per_class.detach(), valid, torch.zeros_like(live.scores)
    (grad,) = torch.autograd.grad(objective, live.scores, allow_unused=True)
    return per_class.detach(), valid, torch.zeros_like(live.scores) if grad is None else grad


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_sharded_smooth_ap_equals_the_gathered_pool_in_value_and_gradient(world_size):
    results = run_ranks(_sharded_on_rank, world_size, args=(world_size,), timeout_s=300)
    for index, case in enumerate(_cases(world_size)):
        per_class, valid, grad = _gathered(case)
        what = f"case {index} ({case['num_classes']} classes, {case['kind']})"
        for rank in range(world_size):
            got = results[rank][index]
            assert torch.equal(got["valid"], valid), f"{what}, rank {rank}: valid classes"
            torch.testing.assert_close(
                got["per_class"].masked_fill(~valid, 0.0),
                per_class.masked_fill(~valid, 0.0),
                **TIGHT,
                msg=f"{what}, rank {rank}: per-class loss",
            )
        if grad is None:
            continue
        # DDP averages: each rank's gradient of its own rows, / W, is the single-process one.
        sharded = torch.cat([results[rank][index]["grad"] for rank in range(world_size)])
        torch.testing.assert_close(sharded / world_size, grad, **TIGHT, msg=f"{what}: gradient")


def _traffic_on_rank(rank: int, rows: int, positives: int, queued_positives: int) -> list[int]:
    """Bytes of each collective of one forward and backward (binary, float64, 2 equal ranks)."""
    gen = torch.Generator().manual_seed(rank)
    scores = torch.randn(2 * rows, 1, generator=gen, dtype=torch.float64)
    targets = torch.zeros(2 * rows, dtype=torch.long)
    targets[:positives] = 1
    targets[rows : rows + queued_positives] = 1
    weights = torch.ones(2 * rows, dtype=torch.float64)
    live = Rows(scores[:rows].clone().requires_grad_(), targets[:rows], weights[:rows])
    queued = Rows(scores[rows:], targets[rows:], weights[rows:])
    pool = Pool(live, queued, 1, sharded=True, global_size=4 * rows)
    _distributed.reset_traffic()
    per_class, _ = SmoothAPLoss(1).double().per_class_loss(pool)
    per_class.sum().backward()
    return list(_distributed.traffic().recent)


def test_bytes_per_step_grow_with_the_positives_not_the_rows():
    """Counts (W x 3 int64), the positives (W x P_r x 3 float64), [2, P] sums, and backward
    the live positives' gradient only."""
    for rows, positives, queued_positives in ((40, 3, 2), (400, 3, 2), (400, 5, 0)):
        args = (rows, positives, queued_positives)
        got = run_ranks(_traffic_on_rank, 2, args=args, timeout_s=300)
        total = 2 * (positives + queued_positives)
        expected = [2 * 3 * 8, total * 3 * 8, 2 * total * 8, 2 * positives * 8]
        assert got == [expected, expected], (rows, positives, got)


def _one_rank_without_gradient(rank: int, world_size: int) -> dict:
    """Rank 0's rows carry no gradient (its live block is a constant); the others' do."""
    case = _cases(world_size)[2]  # binary, weighted, uneven, rank 0 empty
    case["live_sizes"] = _split(case["n"], world_size, "even")
    live_sizes, queue_sizes, n = case["live_sizes"], case["queue_sizes"], case["n"]
    live = _rows(case, sum(live_sizes[:rank]), sum(live_sizes[: rank + 1]))
    live.scores.requires_grad_(rank > 0)
    queued = _rows(case, n + sum(queue_sizes[:rank]), n + sum(queue_sizes[: rank + 1]))
    pool = Pool(live, queued, 1, sharded=True, global_size=case["scores"].shape[0])
    per_class, valid = (
        SmoothAPLoss(1, temperature=case["temperature"]).double().per_class_loss(pool)
    )
    objective = _objective(per_class, valid, case["coef"])
    # Every rank's loss reaches the backward's collective, this one's too (else: a hang).
    assert objective.requires_grad
    objective.backward()
    return dict(per_class=per_class.detach(), grad=live.scores.grad, case=case)


def test_a_rank_whose_rows_carry_no_gradient_still_joins_the_backward():
    world_size = 3
    results = run_ranks(_one_rank_without_gradient, world_size, args=(world_size,), timeout_s=60)
    case = results[0]["case"]
    per_class, valid, grad = _gathered(case)
    assert grad is not None
    sizes = case["live_sizes"]
    assert results[0]["grad"] is None
    for rank in range(1, world_size):
        torch.testing.assert_close(results[rank]["per_class"], per_class, **TIGHT)
        start = sum(sizes[:rank])
        want = grad[start : start + sizes[rank]]
        torch.testing.assert_close(results[rank]["grad"] / world_size, want, **TIGHT)
