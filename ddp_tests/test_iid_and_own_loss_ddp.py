"""Under DDP: ``iid_mask`` travels with the rows through the gather and the queue, ranks agree
on whether it is given, and the docs' own-loss example (an options table plus
``per_class_loss``) passes the harness.
"""

from __future__ import annotations

import re
from functools import partial

import pytest
import torch

from imbalanced_losses import Pool, RecallAtQuantileLoss, SmoothAPLoss, recall_at_quantile
from imbalanced_losses.testing import Step, assert_ddp_exact, run_ranks
from imbalanced_losses.testing._example_loss import TopQuantileHingeLoss

START_UP_S = 180.0
SIZES = (5, 0, 3)  # uneven, one rank empty


def _rank_batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(10 * step + rank)
    n = SIZES[rank]
    targets = torch.randint(0, 3, (n,), generator=gen)
    targets[::4] = -100  # padding rows leave with their flags
    return torch.randn(n, 3, generator=gen), targets, torch.rand(n, generator=gen) < 0.5


class _Probe:
    """Keeps the flags of the pool each forward ranked."""

    def per_class_loss(self, pool: Pool):
        self.seen = (pool.live.iid.tolist(), pool.queued.iid.tolist())
        return super().per_class_loss(pool)  # type: ignore[misc]


class RecallProbe(_Probe, RecallAtQuantileLoss):
    pass


class SmoothAPProbe(_Probe, SmoothAPLoss):
    pass


def _flags_seen(rank: int, name: str) -> list:
    cls = {"recall": RecallProbe, "smooth_ap": SmoothAPProbe}[name]
    loss_fn = cls(3, queue_size=32, temperature=0.5)
    seen = []
    for step in range(2):
        logits, targets, mask = _rank_batch(rank, step)
        loss_fn(logits.requires_grad_(True), targets, mask).backward()
        seen.append(loss_fn.seen)
    return [seen, loss_fn.queue.iid_rows().tolist()]


@pytest.mark.parametrize("name", ["recall", "smooth_ap"])
def test_iid_flags_are_gathered_in_rank_order_and_queued_like_the_rows(name):
    results = run_ranks(_flags_seen, 3, args=(name,), start_timeout_s=START_UP_S)
    expected_live = []
    for step in range(2):  # every rank's kept rows' flags, in rank order
        flags = []
        for rank in range(3):
            _, targets, mask = _rank_batch(rank, step)
            flags += mask[targets != -100].tolist()
        expected_live.append(flags)
    for seen, queued in results:
        assert [live for live, _ in seen] == expected_live
        assert seen[1][1] == expected_live[0]  # the second step ranks the first one's queue
        assert queued == expected_live[0] + expected_live[1]


def _one_rank_without_mask(rank: int) -> str:
    loss_fn = RecallAtQuantileLoss(3, quantile=0.3, queue_size=8)
    logits, targets = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    mask = None if rank == 1 else torch.ones(4, dtype=torch.bool)
    try:
        loss_fn(logits, targets, mask)
    except ValueError as error:
        assert loss_fn.queue.count == 0
        return str(error)
    return "no error"


def test_ranks_that_disagree_on_passing_iid_mask_raise_the_same_error_everywhere():
    messages = run_ranks(_one_rank_without_mask, 2, start_timeout_s=START_UP_S)
    assert messages[0] == messages[1]
    assert re.search(r"iid_mask given \(1\) or not \(0\) \(rank 0: 1, rank 1: 0\)", messages[0])


def test_the_docs_own_loss_example_is_exact_under_ddp():
    plan = [
        Step((6, 2)),
        Step((0, 5), pad_frac=0.3),
        Step((4, 4), weighted=True, kwargs={"return_per_class": True}),
        Step((3, 1, 2)),
        Step((2, 2, 2), train=False),
        Step((5, 3, 4)),
    ]
    assert_ddp_exact(
        partial(TopQuantileHingeLoss, 3, queue_size=8, max_pool_size=10, margin=0.3),
        plan,
        timeout_s=START_UP_S,
    )


def _host_problem_on_rank_one(rank: int) -> list[str]:
    """Rank 1 passes inputs whose shape or dtype is wrong; rank 0's are good."""
    bad = rank == 1
    attempts = [
        lambda: RecallAtQuantileLoss(3, quantile=0.3)(
            torch.randn(4, 2 if bad else 3), torch.tensor([0, 1, 2, 0])
        ),
        lambda: RecallAtQuantileLoss(3, quantile=0.3)(
            torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), torch.ones(3 if bad else 4).bool()
        ),
        lambda: recall_at_quantile(
            torch.randn(4, 3), torch.rand(4) if bad else torch.tensor([0, 1, 2, 0]), 0.3
        ),
    ]
    errors = []
    for attempt in attempts:
        try:
            attempt()
            errors.append("no error")
        except ValueError as error:
            errors.append(str(error))
    return errors


def test_a_rank_whose_inputs_fail_a_host_check_still_joins_and_every_rank_raises():
    """The placeholder: the bad rank joins the metadata exchange with no rows, so the others
    raise too instead of waiting for it in the collective."""
    good, bad = run_ranks(_host_problem_on_rank_one, 2, timeout_s=30, start_timeout_s=START_UP_S)
    assert all(m.startswith("invalid input on rank(s) [1] (see their error)") for m in good)
    assert bad[0].startswith("rank 1: logits must have shape [N, 3]")
    assert bad[1].startswith("rank 1: iid_mask must be [N] matching logits dim-0")
    assert bad[2].startswith("rank 1: targets must be an integer or bool tensor")
