"""`process_group=`: 4 gloo ranks as two data-parallel groups {0, 1} and {2, 3}.

Each group trains its own DDP model (DDP(process_group=group)) with the loss on the same group.
Every step of every rank is compared with a float64 single-process oracle written here: the same
loss class without distribution, fed that group's concatenated batch. The loss on each rank,
the DDP gradient, the queue and the parameters must match the oracle of the rank's own group.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from imbalanced_losses import (
    RecallAtQuantileLoss,
    all_gather_no_grad,
    all_gather_with_grad,
    recall_at_quantile,
)
from imbalanced_losses.testing import run_ranks

NUM_CLASSES, FEATURES, LR = 3, 5, 0.5
LOSS_KW = dict(quantile=0.3, queue_size=9, temperature=0.5)
# Per step, per group, the rows of its two ranks: uneven, empty ranks, an empty group step.
PLAN = [
    ((3, 2), (1, 4)),
    ((0, 5), (2, 2)),
    ((4, 1), (0, 0)),
    ((2, 3), (3, 1)),
    ((1, 1), (5, 0)),
]


def _group_batch(group: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of one data-parallel group at one step (different for each group)."""
    n = sum(PLAN[step][group])
    gen = torch.Generator().manual_seed(1000 * group + step)
    x = torch.randn(n, FEATURES, generator=gen, dtype=torch.float64)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    return x, y


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(FEATURES, NUM_CLASSES).double()


def _snapshot(loss_fn, model, loss) -> dict:
    q = loss_fn.queue
    return {
        "loss": loss.detach().clone(),
        "grads": [p.grad.detach().clone() for p in model.parameters()],
        "queue": (q.scores[: q.count].clone(), q.targets[: q.count].clone(), q.ptr, q.count),
    }


def _train_in_groups(rank: int) -> dict:
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    group_id, local_rank = divmod(rank, 2)
    group = groups[group_id]
    model = DDP(_model(), process_group=group)
    loss_fn = RecallAtQuantileLoss(NUM_CLASSES, **LOSS_KW, process_group=group).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    steps = []
    for step in range(len(PLAN)):
        x, y = _group_batch(group_id, step)
        sizes = PLAN[step][group_id]
        start = sum(sizes[:local_rank])
        mine = slice(start, start + sizes[local_rank])
        optimizer.zero_grad()
        loss = loss_fn(model(x[mine]), y[mine])
        loss.backward()
        steps.append(_snapshot(loss_fn, model.module, loss))
        optimizer.step()

    # The gather helpers and the metric on the same group: rows of the group only, in its order.
    x, y = _group_batch(group_id, 0)
    sizes = PLAN[0][group_id]
    start = sum(sizes[:local_rank])
    mine = x[start : start + sizes[local_rank]].clone().requires_grad_(True)
    gathered = all_gather_with_grad(mine, process_group=group)
    (float(rank + 1) * gathered.sum()).backward()
    helpers = {
        "gathered": gathered.detach(),
        "no_grad": all_gather_no_grad(mine, process_group=group),
        "grad": mine.grad,
        "metric": recall_at_quantile(
            mine.detach()[:, :NUM_CLASSES],
            y[start : start + sizes[local_rank]],
            0.3,
            process_group=group,
        ),
    }

    # Ranks of one group that disagree on a call option or a setting raise on every rank.
    errors = {}
    xs, ys = x[:2], y[:2]
    for name, call in {
        "update_queue": lambda: loss_fn(model(xs), ys, update_queue=local_rank == 0),
        "positives": lambda: RecallAtQuantileLoss(
            NUM_CLASSES, **LOSS_KW, process_group=group, positives=("pool", "live")[local_rank]
        ).double()(model(xs), ys),
    }.items():
        try:
            call()
            errors[name] = None
        except ValueError as exc:
            errors[name] = str(exc)
    return {"steps": steps, "helpers": helpers, "errors": errors}


def _oracle(group_id: int) -> list[dict]:
    """One process, no distribution, fed the group's concatenated batch at every step."""
    model = _model()
    loss_fn = RecallAtQuantileLoss(NUM_CLASSES, **LOSS_KW, gather_distributed=False).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    steps = []
    for step in range(len(PLAN)):
        x, y = _group_batch(group_id, step)
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        steps.append(_snapshot(loss_fn, model, loss))
        optimizer.step()
    return steps


@pytest.mark.filterwarnings("ignore:the pool holds .* too few for quantile")
def test_two_data_parallel_groups_each_match_their_own_single_process_oracle():
    results = run_ranks(_train_in_groups, 4, timeout_s=240)
    oracles = [_oracle(0), _oracle(1)]
    close = dict(rtol=1e-10, atol=1e-12)
    for rank, result in enumerate(results):
        group_id, local_rank = divmod(rank, 2)
        for step, (got, want) in enumerate(zip(result["steps"], oracles[group_id])):
            where = f"rank {rank} (group {group_id}), step {step}"
            torch.testing.assert_close(got["loss"], want["loss"], **close, msg=where + ": loss")
            for g, w in zip(got["grads"], want["grads"]):
                torch.testing.assert_close(g, w, **close, msg=where + ": DDP gradient")
            g_scores, g_targets, g_ptr, g_count = got["queue"]
            w_scores, w_targets, w_ptr, w_count = want["queue"]
            assert (g_ptr, g_count) == (w_ptr, w_count), where + ": queue pointer/count"
            assert torch.equal(g_targets, w_targets), where + ": queue targets"
            torch.testing.assert_close(g_scores, w_scores, **close, msg=where + ": queue")
        assert any(s["grads"][0].abs().max() > 1e-3 for s in oracles[group_id]), "tiny grads"

        x, y = _group_batch(group_id, 0)
        helpers = result["helpers"]
        assert torch.equal(helpers["gathered"], x), f"rank {rank}: not the group's rows in order"
        assert torch.equal(helpers["no_grad"], x)
        group_weight = sum(r + 1 for r in (2 * group_id, 2 * group_id + 1))
        sizes = PLAN[0][group_id]
        start = sum(sizes[:local_rank])
        expected_grad = torch.full_like(x[start : start + sizes[local_rank]], group_weight)
        torch.testing.assert_close(helpers["grad"], expected_grad, rtol=0, atol=0)
        expected_metric = recall_at_quantile(x[:, :NUM_CLASSES], y, 0.3, gather_distributed=False)
        torch.testing.assert_close(helpers["metric"], expected_metric, equal_nan=True)

        for name, message in result["errors"].items():
            assert message is not None and "disagree" in message, f"rank {rank} {name}: {message}"
