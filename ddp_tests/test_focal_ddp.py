"""The focal losses under real DDP: with ``gather_distributed`` (auto) every step equals one
process fed the rank-ordered global batch, also with uneven and empty ranks, padding, weights,
``mean_positive`` and ``reduction="none"``; without it (a per-rank mean) the harness must see
the difference on uneven ranks."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from test_ddp_exactness import SIZES

from imbalanced_losses import SigmoidFocalLoss, SoftmaxFocalLoss
from imbalanced_losses.testing import Case, Step, check_ddp_exactness, check_many, run_ranks

START_UP_S = 180.0  # also covers the ranks' start-up on a busy 2-core machine


class SigmoidOnLabels(SigmoidFocalLoss):
    """The sigmoid loss on one-hot labels, so that the harness's integer labels can drive it."""

    num_classes = 3

    def forward(self, inputs, targets, *, sample_weight=None):
        onehot = F.one_hot(targets, self.num_classes).to(inputs.dtype)
        weight = None if sample_weight is None else sample_weight[:, None]
        return super().forward(inputs, onehot, sample_weight=weight)


def plan() -> list[Step]:
    """Two ranks, then a checkpoint resumed by three: uneven, empty, padded, weighted, eval."""
    two, three = SIZES[2], SIZES[3]
    return [
        Step(two[0]),
        Step(two[1], pad_frac=0.3),
        Step(two[2], weighted=True),
        Step(two[4], train=False),
        Step(three[1], pad_frac=0.2, weighted=True),
        Step(three[2]),
        Step(three[5], weighted=True),
    ]


def test_every_focal_option_is_exact_under_ddp_against_one_process():
    cases = {
        f"softmax {reduction}": Case(
            partial(SoftmaxFocalLoss, reduction=reduction, alpha=[0.5, 1.0, 2.0]),
            plan(),
            num_classes=3,
        )
        for reduction in ("mean", "mean_positive", "sum", "none")
    }
    cases["softmax smoothed"] = Case(
        partial(SoftmaxFocalLoss, gamma=1.5, label_smoothing=0.1, background_class=2),
        plan(),
        num_classes=3,
    )
    for reduction in ("mean", "sum", "none"):
        cases[f"sigmoid {reduction}"] = Case(
            partial(SigmoidOnLabels, reduction=reduction), plan(), takes_padding=False
        )
    reports = check_many(list(cases.values()), timeout_s=START_UP_S)
    failed = {name: r for name, r in zip(cases, reports) if not r.ok}
    assert not failed, "\n\n".join(f"[{n}]\n{r}\n{r.table()}" for n, r in failed.items())
    for name, report in zip(cases, reports):
        grads = [c for c in report.checks if c.name == "DDP grads vs oracle"]
        assert grads and max(c.scale for c in grads) > 1e-3, f"[{name}] gradients too small"


def test_a_per_rank_mean_is_not_the_global_mean_on_uneven_ranks():
    # gather_distributed=False: each rank averages its own rows; the harness must flag it.
    report = check_ddp_exactness(
        partial(SoftmaxFocalLoss, gather_distributed=False),
        [Step((5, 1)), Step((2, 6), weighted=True)],
        num_classes=3,
        timeout_s=START_UP_S,
    )
    failing = {c.name for c in report.checks if not c.ok}
    assert "loss identical on every rank" in failing and "DDP grads vs oracle" in failing, (
        report.table()
    )


def _misuse_on_rank(rank: int) -> list[str]:
    """Three misuses, each on one rank only; every rank must raise, none may hang."""
    errors = []
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 1])
    attempts = [
        lambda: SoftmaxFocalLoss()(x, y, sample_weight=torch.ones(4) if rank == 0 else None),
        lambda: SoftmaxFocalLoss()(x, torch.tensor([0, 1, 7, 1]) if rank == 1 else y),
        lambda: SoftmaxFocalLoss(gamma=2.0 + rank)(x, y),
        lambda: SigmoidFocalLoss()(x[: 2 + rank], torch.zeros(2 + rank, 3, dtype=torch.float64)),
    ]
    for attempt in attempts:
        try:
            attempt()
            errors.append("no error")
        except ValueError as error:
            errors.append(str(error))
    return errors


def test_misuse_on_one_rank_raises_on_every_rank_instead_of_hanging():
    results = run_ranks(_misuse_on_rank, 2, timeout_s=START_UP_S)
    for errors in results:
        assert "ranks disagree on sample_weight passed (rank 0: 1, rank 1: 0)" in errors[0]
        assert "ranks disagree on gamma (rank 0: 2, rank 1: 3)" in errors[2]
    assert results[1][1].startswith("rank 1: targets must be class ids in [0, 3)")
    assert "outside that range: [7]" in results[1][1]
    assert results[0][1].startswith("invalid input on rank(s) [1]")
    assert results[0][3] == results[1][3] == "no error"  # uneven batches are not misuse
