"""The focal losses under real DDP: with ``gather_distributed`` (auto) every step equals one
process fed the rank-ordered global batch, also with uneven and empty ranks, padding, weights,
``mean_positive`` and ``reduction="none"``; without it (a per-rank mean) the harness must see
the difference on uneven ranks."""

from __future__ import annotations

import copy
import pickle
import warnings
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from test_ddp_exactness import SIZES

from imbalanced_losses import SigmoidFocalLoss, SoftmaxFocalLoss
from imbalanced_losses.testing import (
    Case,
    Step,
    SyncCounter,
    check_ddp_exactness,
    check_many,
    run_ranks,
)
from imbalanced_losses.testing._host_syncs import DEVICE_TO_HOST
from imbalanced_losses.testing.family import PER_ROW_LOSS_SPECS

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


def _disagreements_on_rank(rank: int) -> dict[str, str]:
    """State and shapes that differ on one rank only: every rank must raise, none may crash."""
    got = {}
    y = torch.tensor([0, 1, 2, 1])

    def attempt(name: str, call) -> None:
        try:
            call()
            got[name] = "no error"
        except ValueError as error:
            got[name] = str(error)

    # float32 on rank 0, bfloat16 on rank 1: gathered rows of different dtypes crash gloo.
    x = torch.randn(4, 3, dtype=torch.float32 if rank == 0 else torch.bfloat16)
    attempt("dtype", lambda: SoftmaxFocalLoss()(x, y))
    attempt("sigmoid dtype", lambda: SigmoidFocalLoss()(x, (x > 0).to(x.dtype)))
    # Three classes on rank 0, four on rank 1: the same element count, a different problem.
    attempt("classes", lambda: SoftmaxFocalLoss()(torch.randn(4, 3 + rank), y))
    # A checkpoint with another alpha, loaded on rank 0 only.
    loss_fn = SoftmaxFocalLoss(alpha=[1.0, 1.0, 1.0])
    if rank == 0:
        loss_fn.load_state_dict(SoftmaxFocalLoss(alpha=[0.5, 1.0, 2.0]).state_dict())
    attempt("alpha", lambda: loss_fn(torch.randn(4, 3), y))
    loss_fn.load_state_dict(SoftmaxFocalLoss(alpha=[0.5, 1.0, 2.0]).state_dict())  # now on both
    attempt("alpha on both", lambda: loss_fn(torch.randn(4, 3), y))
    return got


def test_dtype_classes_or_alpha_on_one_rank_raise_the_same_error_on_every_rank():
    results = run_ranks(_disagreements_on_rank, 2, timeout_s=START_UP_S)
    assert results[0] == results[1]
    got = results[0]
    for key in ("dtype", "sigmoid dtype"):
        assert got[key].startswith(
            "ranks disagree on inputs dtype (rank 0: torch.float32, rank 1: torch.bfloat16)"
        ), got[key]
        assert "pass inputs of one dtype on every rank" in got[key]
    assert got["classes"].startswith(
        "ranks disagree on number of classes (inputs.shape[1]) (rank 0: 3, rank 1: 4)"
    ), got["classes"]
    assert got["alpha"].startswith("ranks disagree on alpha values"), got["alpha"]
    assert "load a checkpoint on every rank" in got["alpha"]
    assert got["alpha on both"] == "no error"


def _copies_with_a_group(rank: int) -> dict:
    """Every per-row loss of the family list, built with a group, deep-copied and pickled."""
    group = dist.new_group([0, 1])
    out: dict = {}
    for spec in PER_ROW_LOSS_SPECS:
        name = spec.name
        x, target = spec.batch(torch.Generator().manual_seed(rank), 4 + rank, torch.float32)
        loss_fn = spec.make(process_group=group)
        twin = copy.deepcopy(loss_fn)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            unpickled = pickle.loads(pickle.dumps(loss_fn))
        out[name] = {
            "twin uses the group": twin.process_group is group,
            "twin loss equals the original's": float(twin(x, target)) == float(loss_fn(x, target)),
            "original repr": repr(loss_fn),
            "twin repr": repr(twin),
            "unpickled group": unpickled.process_group,
            "unpickled repr": repr(unpickled),
            "warnings": [str(w.message) for w in caught],
        }
    return out


def test_a_focal_loss_with_a_process_group_deep_copies_and_pickles():
    for rank, by_loss in enumerate(run_ranks(_copies_with_a_group, 2, timeout_s=START_UP_S)):
        assert set(by_loss) == {spec.name for spec in PER_ROW_LOSS_SPECS}
        for name, got in by_loss.items():
            where = f"rank {rank}, {name}"
            assert got["twin uses the group"] and got["twin loss equals the original's"], where
            for key in ("original repr", "twin repr"):
                assert "process_group='the group of ranks [0, 1]'" in got[key], (where, got[key])
            assert got["unpickled group"] is None, where
            assert (
                "process_group=None (the default group; pickled with the group of ranks [0, 1])"
                in got["unpickled repr"]
            ), (where, got["unpickled repr"])
            assert any("assign loss_fn.process_group" in w for w in got["warnings"]), where


def _syncs_on_rank(rank: int) -> dict:
    x = torch.randn(5 + rank, 3, requires_grad=True)
    y, w = torch.randint(0, 3, (5 + rank,)), torch.rand(5 + rank)
    loss_fn = SoftmaxFocalLoss(alpha=[1.0, 2.0, 0.5])
    with SyncCounter(x, y, w, *loss_fn.buffers()) as forward:
        loss = loss_fn(x, y, sample_weight=w)
    with SyncCounter(loss) as backward:
        loss.backward()
    return {"forward": dict(forward.counts), "backward": dict(backward.counts)}


def test_pooled_forward_makes_one_host_read_and_backward_none():
    for got in run_ranks(_syncs_on_rank, 2, timeout_s=START_UP_S):
        assert got["forward"] == {DEVICE_TO_HOST: 1}, got  # the metadata row, nothing else
        assert got["backward"] == {}, got


def _traffic_on_rank(rank: int) -> dict:
    """Bytes all-reduced and row gathers per forward, for a small and a large batch."""
    from unittest import mock

    from imbalanced_losses import _distributed

    gathers = []
    real_gather = _distributed.gather_rows

    def counting_gather(tensor, sizes, *, group=None):
        gathers.append(sum(sizes))
        return real_gather(tensor, sizes, group=group)

    out = {}
    with mock.patch.object(_distributed, "gather_rows", counting_gather):
        for reduction in ("mean", "mean_positive", "sum", "none"):
            for rows in (4 + rank, 400 + rank):
                x, y = torch.randn(rows, 3), torch.randint(0, 3, (rows,))
                gathers.clear()
                _distributed.reset_traffic()
                SoftmaxFocalLoss(reduction=reduction)(x, y)
                out[reduction, rows - rank] = (_distributed.traffic().reduced, list(gathers))
    return out


def test_mean_and_sum_exchange_two_numbers_whatever_the_batch_and_none_gathers_rows():
    for rank, got in enumerate(run_ranks(_traffic_on_rank, 2, timeout_s=START_UP_S)):
        for reduction in ("mean", "mean_positive", "sum"):
            # (sum of losses, mass) in float32: 8 bytes, no rows gathered, small or large batch.
            assert got[reduction, 4] == got[reduction, 400] == (8, []), (rank, reduction, got)
        assert got["none", 400][1] == [801], (rank, got)  # the global batch's rows
