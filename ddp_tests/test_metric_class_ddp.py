"""RecallAtQuantile on real gloo ranks: every rank's compute() equals recall_at_quantile on the
global concatenation of every update of every rank, computed in one process.

Ranks see uneven numbers of updates and rows, including a rank with no update at all and an
update with no rows; padding rows are mixed in.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("torchmetrics", reason='pip install "imbalanced-losses[metrics]"')

from imbalanced_losses import RecallAtQuantile, recall_at_quantile  # noqa: E402
from imbalanced_losses.testing import run_ranks  # noqa: E402

# world size -> the row count of each update on each rank
PLANS = {
    2: [[30, 0, 17], []],
    3: [[5], [40, 12], [0]],
}
# (score columns, 0 = binary [N]; quantile; interpolation; reduction; dtype)
CONFIGS = [
    (3, 0.2, "higher", "none", torch.float64),
    (3, 0.1, "linear", "mean", torch.float32),
    (0, 0.3, "midpoint", "none", torch.float32),
    (1, 0.05, "nearest", "none", torch.bfloat16),
]


def _updates(world_size: int, config_index: int, round_: int) -> list[list[tuple]]:
    """Every rank's updates, by rank; the same on every process (seeded)."""
    columns, *_, dtype = CONFIGS[config_index]
    gen = torch.Generator().manual_seed(1000 * world_size + 10 * config_index + round_)
    per_rank = []
    for sizes in PLANS[world_size]:
        updates = []
        for n in sizes:
            scores = torch.randn(n, max(columns, 1), generator=gen, dtype=torch.float64).to(dtype)
            targets = torch.randint(0, 2 if columns <= 1 else columns, (n,), generator=gen)
            targets[torch.rand(n, generator=gen) < 0.25] = -100
            updates.append((scores[:, 0] if columns == 0 else scores, targets))
        per_rank.append(updates)
    return per_rank


def _expected(world_size: int, config_index: int, round_: int) -> torch.Tensor:
    _, quantile, interpolation, reduction, _ = CONFIGS[config_index]
    updates = [u for rank in _updates(world_size, config_index, round_) for u in rank]
    scores = torch.cat([s for s, _ in updates])
    targets = torch.cat([t for _, t in updates])
    return recall_at_quantile(
        scores, targets, quantile, interpolation=interpolation, reduction=reduction
    ).squeeze()  # torchmetrics returns one-element results as 0-d tensors


def _metric_on_rank(rank: int, world_size: int) -> dict:
    out: dict = {}
    for index, (_, quantile, interpolation, reduction, _) in enumerate(CONFIGS):
        metric = RecallAtQuantile(quantile, interpolation=interpolation, reduction=reduction)
        for round_ in range(2):  # the second round checks that reset() forgets the first
            for scores, targets in _updates(world_size, index, round_)[rank]:
                metric.update(scores, targets)
            out[index, round_] = metric.compute()
            metric.reset()
    # Ranks that disagree on the score columns: every rank raises, none hangs.
    metric = RecallAtQuantile(0.2)
    metric.update(torch.randn(4, 2 + (rank == 1)), torch.tensor([0, 1, 1, 0]))
    try:
        metric.compute()
    except ValueError as exc:
        out["mismatch"] = str(exc)
    return out


@pytest.mark.parametrize("world_size", sorted(PLANS))
def test_compute_on_every_rank_equals_one_process_on_the_global_rows(world_size):
    results = run_ranks(_metric_on_rank, world_size, args=(world_size,), timeout_s=120)
    for rank, out in enumerate(results):
        for index in range(len(CONFIGS)):
            for round_ in range(2):
                expected = _expected(world_size, index, round_)
                torch.testing.assert_close(
                    out[index, round_],
                    expected,
                    rtol=0,
                    atol=0,
                    equal_nan=True,
                    msg=lambda m, r=rank, i=index, k=round_: f"rank {r} config {i} round {k}: {m}",
                )
        assert "disagree on the score columns" in out.get("mismatch", ""), f"rank {rank}"
