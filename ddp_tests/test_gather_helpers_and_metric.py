"""The public DDP helpers on real ranks: the gathers (values and gradients, uneven and empty
ranks) and the metric (every rank returns the single-process value of the global data)."""

from __future__ import annotations

import torch

from imbalanced_losses import all_gather_no_grad, all_gather_with_grad, recall_at_quantile
from imbalanced_losses.testing import run_ranks

SIZES = (3, 0, 5)


def _global_rows() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    n = sum(SIZES)
    scores = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, 3, (n,), generator=gen)
    targets[::4] = -100  # padding
    return scores, targets


def _my_rows(rank: int, tensor: torch.Tensor) -> torch.Tensor:
    start = sum(SIZES[:rank])
    return tensor[start : start + SIZES[rank]]


def _gather_and_metric_on_rank(rank: int) -> dict:
    scores, targets = _global_rows()
    mine = _my_rows(rank, scores).clone().requires_grad_(True)
    gathered = all_gather_with_grad(mine)
    # Every rank uses the gathered rows differently: the gradient of rank r's rows must be the
    # sum over ranks of each rank's loss gradient (DDP then averages the parameters' share).
    (float(rank + 1) * (gathered**2).sum()).backward()
    my_targets = _my_rows(rank, targets)
    return {
        "gathered": gathered.detach(),
        "no_grad": all_gather_no_grad(mine),
        "grad": mine.grad,
        "recall": recall_at_quantile(mine.detach(), my_targets, 0.3),
        "recall_mean": recall_at_quantile(mine.detach(), my_targets, 0.3, reduction="mean"),
        "recall_binary": recall_at_quantile(mine.detach()[:, 0], (my_targets == 0).long(), 0.3),
    }


def _metric_with_a_different_width_on_rank_1(rank: int) -> str | None:
    scores = torch.randn(4, 2 + (rank == 1), dtype=torch.float64)
    try:
        recall_at_quantile(scores, torch.tensor([0, 1, 1, 0]), 0.3)
    except ValueError as exc:
        return str(exc)
    return None


def test_gathers_and_metric_on_uneven_ranks_match_one_process():
    results = run_ranks(_gather_and_metric_on_rank, len(SIZES), timeout_s=120)
    scores, targets = _global_rows()
    rank_weight_sum = sum(r + 1 for r in range(len(SIZES)))
    expected = {
        "recall": recall_at_quantile(scores, targets, 0.3),
        "recall_mean": recall_at_quantile(scores, targets, 0.3, reduction="mean"),
        "recall_binary": recall_at_quantile(scores[:, 0], (targets == 0).long(), 0.3),
    }
    for rank, out in enumerate(results):
        assert torch.equal(out["gathered"], scores), f"rank {rank}: rows not in rank order"
        assert torch.equal(out["no_grad"], scores)
        torch.testing.assert_close(
            out["grad"], 2 * rank_weight_sum * _my_rows(rank, scores), rtol=1e-12, atol=0
        )
        for key, value in expected.items():
            torch.testing.assert_close(out[key], value, rtol=0, atol=0, equal_nan=True)


def test_metric_with_ranks_disagreeing_on_width_raises_on_every_rank():
    messages = run_ranks(_metric_with_a_different_width_on_rank_1, 2, timeout_s=120)
    for rank, message in enumerate(messages):
        assert message is not None and "columns" in message, f"rank {rank}: {message!r}"
