"""Contract §5 under real DDP for the recall loss's own cases: every step equals one process fed
the concatenated global batch. The scenarios every loss runs (queues, padding, weights, eval
steps, checkpoints across world sizes, disagreeing ranks) are in ``test_family_ddp.py``.

Each test hands a batch of cases to the harness (one spawned world per world size, since
spawning costs seconds); every case is checked per step against a float64 oracle: the loss on
every rank, the DDP gradients, the queues bit for bit, and the parameters after each step.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from _broken_losses import (
    LocalFirstGather,
    LocalSliceGradient,
    PerRankSubsampleSeed,
    SubsampleStepOnRankOne,
)

from imbalanced_losses import RecallAtQuantileLoss
from imbalanced_losses.testing import (
    Case,
    DdpMismatch,
    Step,
    check_many,
    run_ranks,
)

# Tiny worlds with empty ranks make tiny pools on purpose; the loss's warning about them is noise.
pytestmark = pytest.mark.filterwarnings("ignore:the pool holds .* too few for quantile")

# A temperature of 0.5 on unit-scale logits keeps most rows off the sigmoid's flat tails, so the
# gradients being compared are far from zero (asserted below through each check's scale).
RAQ = partial(RecallAtQuantileLoss, quantile=0.3, temperature=0.5)
RETURN_PER_CLASS = {"return_per_class": True}

# Per-rank sizes for each world size: uneven, with empty ranks and an empty global step.
SIZES = {
    1: [(6,), (0,), (9,), (4,), (7,), (5,)],
    2: [(5, 3), (0, 7), (4, 4), (0, 0), (9, 1), (2, 6)],
    3: [(5, 0, 3), (2, 6, 1), (0, 0, 4), (3, 3, 3), (0, 0, 0), (1, 7, 2)],
    4: [(3, 0, 2, 4), (1, 1, 1, 1), (0, 5, 0, 0), (2, 3, 4, 1), (0, 0, 0, 0), (4, 2, 0, 3)],
}


def mixed_plan(world_size: int) -> list[Step]:
    """Uneven and empty ranks, padding, sample weights, an eval step, return_per_class."""
    sizes = SIZES[world_size]
    return [
        Step(sizes[0]),
        Step(sizes[1], pad_frac=0.3),
        Step(sizes[2], weighted=True, kwargs=RETURN_PER_CLASS),
        Step(sizes[3], weighted=True),
        Step(sizes[4], train=False),
        Step(sizes[5], pad_frac=0.2, weighted=True),
        Step(sizes[2], pad_frac=1.0),  # every row padding: the queue must keep its history
        Step(sizes[0], kwargs=RETURN_PER_CLASS),
    ]


def assert_all_pass(cases: dict[str, Case], **kw) -> None:
    reports = check_many(list(cases.values()), **kw)
    failed = {name: r for name, r in zip(cases, reports) if not r.ok}
    assert not failed, "\n\n".join(f"[{name}]\n{r}\n{r.table()}" for name, r in failed.items())
    for name, report in zip(cases, reports):
        names = {c.name for c in report.checks}
        probe = cases[name].loss_factory()
        if not probe.update_queue_in_eval and any(not step.train for step in cases[name].plan):
            # Run, or said why not (a queue of size 0 read alone is zeros: not informative).
            said = {n.name for n in report.not_checked}
            assert "state frozen in eval" in names | said, f"[{name}] eval step not checked"
        grads = [c for c in report.checks if c.name == "DDP grads vs oracle"]
        assert grads, f"[{name}] no training step was checked"
        assert max(c.scale for c in grads) > 1e-3, f"[{name}] gradients too small to prove much"


# ---------------------------------------------------------------------------------- gloo


def test_every_reduction_and_return_per_class():
    plan = mixed_plan(2)
    per_class = [Step(s.sizes, s.pad_frac, s.weighted, s.train, RETURN_PER_CLASS) for s in plan]
    cases = {}
    for reduction in ("mean", "sum", "none"):
        for classes in (1, 3):
            loss = partial(RAQ, classes, queue_size=6, reduction=reduction)
            cases[f"{reduction}, C={classes}"] = Case(loss, plan)
            cases[f"{reduction}, C={classes}, return_per_class"] = Case(loss, per_class)
    assert_all_pass(cases)


def test_loss_inside_and_outside_the_ddp_module_with_broadcast_buffers_on_and_off():
    plan = mixed_plan(3)
    loss = partial(RAQ, 3, queue_size=6)
    cases = {
        f"inside={inside}, broadcast_buffers={broadcast}": Case(
            loss, plan, loss_inside_ddp=inside, broadcast_buffers=broadcast
        )
        for inside in (False, True)
        for broadcast in (False, True)
    }
    assert_all_pass(cases)


def test_ranking_loss_plus_local_cross_entropy_matches_single_process_sum():
    # Equal per-rank batches: DDP's average of per-rank means is then the global mean (§5.4).
    plan = [Step((4, 4)), Step((6, 6), pad_frac=0.25), Step((3, 3), weighted=True)] * 2
    cases = {
        f"C={classes}, inside={inside}": Case(
            partial(RAQ, classes, queue_size=7), plan, local_ce_weight=1.0, loss_inside_ddp=inside
        )
        for classes in (1, 3)
        for inside in (False, True)
    }
    assert_all_pass(cases)


# ------------------------------------------------------------- disagreeing configurations


def _rank_with_its_own_config(rank: int) -> dict:
    """Each case builds a loss whose setting differs on rank 1; every rank must raise."""
    gen = torch.Generator().manual_seed(rank)
    # The options every loss has are in test_family_ddp.py; this is the recall loss's own.
    cases = {
        "quantile": ({"quantile": 0.1}, {"quantile": 0.2}),
        "quantile_interpolation": (
            {"quantile_interpolation": "higher"},
            {"quantile_interpolation": "linear"},
        ),
    }
    outcome = {}
    for name, per_rank in cases.items():
        options = {"num_classes": 3, "quantile": 0.1, "queue_size": 8, **per_rank[min(rank, 1)]}
        loss = RecallAtQuantileLoss(**options).double()
        logits = torch.randn(4, options["num_classes"], generator=gen, dtype=torch.float64)
        targets = torch.tensor([0, 1, 1, 0])
        try:
            loss(logits, targets)
            outcome[name] = (None, loss.queue.count)
        except ValueError as exc:
            outcome[name] = (str(exc), loss.queue.count)
    return outcome


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_that_disagree_on_a_recall_option_all_raise_a_clear_error(world_size):
    results = run_ranks(_rank_with_its_own_config, world_size, timeout_s=120)
    for rank, outcome in enumerate(results):
        for name, (message, queue_count) in outcome.items():
            assert message is not None, f"rank {rank} did not raise when ranks disagree on {name}"
            assert name in message, f"rank {rank}, {name}: unclear message {message!r}"
            assert queue_count == 0, f"rank {rank}, {name}: the queue changed before the error"


# ---------------------------------------------------------- the harness must be able to fail


def test_harness_reports_deliberately_broken_losses():
    plan = [Step((5, 3)), Step((4, 4)), Step((2, 6))]
    options = dict(quantile=0.3, temperature=0.5, queue_size=6)
    broken = {
        "local-slice gradient": Case(partial(LocalSliceGradient, 3, **options), plan),
        "local-first gather": Case(partial(LocalFirstGather, 3, **options), plan),
        "per-rank subsample seed": Case(
            partial(PerRankSubsampleSeed, 3, max_pool_size=4, **options), plan * 2
        ),
        # One step: ranks that agree on the state at every forward would refuse a second one.
        "subsample step on rank 1": Case(partial(SubsampleStepOnRankOne, 3, **options), plan[:1]),
    }
    reports = dict(zip(broken, check_many(list(broken.values()))))

    def failing_at_step_0(name: str) -> set[str]:
        return {c.name for c in reports[name].failures() if c.step == 0}

    # 1/world_size of the gradient (then the parameters it moved): the values were right.
    assert failing_at_step_0("local-slice gradient") == {
        "DDP grads vs oracle",
        "params vs free-running oracle",
    }
    grads = next(
        c for c in reports["local-slice gradient"].checks if c.name == "DDP grads vs oracle"
    )
    assert grads.error == pytest.approx(0.5, rel=1e-6)
    # Rank 1 pools (and queues) its own rows first.
    assert "state identical on every rank" in failing_at_step_0("local-first gather")
    # The default accessor is the whole state_dict(): extra state besides the queue is compared.
    assert failing_at_step_0("subsample step on rank 1") == {
        "state identical on every rank",
        "checkpoint identical on every rank",
    }
    # Different threshold samples give different losses on different ranks (two samples can
    # share their quantile by chance, so not necessarily at the first step).
    failing = {c.name for c in reports["per-rank subsample seed"].failures()}
    assert "loss identical on every rank" in failing
    for report in reports.values():
        with pytest.raises(DdpMismatch, match="FAIL"):
            report.raise_if_failed()


# ----------------------------------------------------------------------------------- NCCL


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_every_step_matches_the_oracle_on_nccl(world_size):
    """Runs with one GPU per rank; elsewhere the harness raises NotEnoughGPUs: a skip."""
    plan = mixed_plan(world_size)
    loss = partial(RAQ, 3, queue_size=7)
    assert_all_pass(
        {"outside": Case(loss, plan), "inside": Case(loss, plan, loss_inside_ddp=True)},
        backend="nccl",
    )


# ------------------------------------------------------------------------ non-finite logits


def _nonfinite_batches() -> list[tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]]:
    gen = torch.Generator().manual_seed(3)
    batches = []
    for sizes, bad_rows in (((4, 3), [5]), ((2, 0), []), ((3, 4), [0, 6])):
        n = sum(sizes)
        logits = torch.randn(n, 3, generator=gen, dtype=torch.float64)
        logits[bad_rows, 1] = torch.tensor([float("nan"), float("inf")][: len(bad_rows)]).double()
        batches.append((logits, torch.randint(0, 3, (n,), generator=gen), sizes))
    return batches


def _nonfinite_on_rank(rank: int) -> list:
    loss_fn = RAQ(3, queue_size=8).double()
    out = []
    for logits, targets, sizes in _nonfinite_batches():
        start = sum(sizes[:rank])
        rows = slice(start, start + sizes[rank])
        loss = loss_fn(logits[rows], targets[rows])
        q = loss_fn.queue
        out.append((loss.detach(), q.scores.clone(), q.targets.clone(), q.ptr, q.count))
    return out


def test_non_finite_rows_never_enter_the_queue_on_any_rank():
    results = run_ranks(_nonfinite_on_rank, 2, timeout_s=120)
    oracle = RAQ(3, queue_size=8).double()
    for step, (logits, targets, _) in enumerate(_nonfinite_batches()):
        loss = oracle(logits, targets)
        q = oracle.queue
        expected = (loss.detach(), q.scores, q.targets, q.ptr, q.count)
        assert torch.isfinite(q.scores).all()
        for rank, per_step in enumerate(results):
            got = per_step[step]
            assert torch.equal(got[0], expected[0]) or (got[0].isnan() and expected[0].isnan())
            assert torch.equal(got[1], expected[1]) and torch.equal(got[2], expected[2])
            assert got[3:] == expected[3:], f"rank {rank}, step {step}: ptr/count"
