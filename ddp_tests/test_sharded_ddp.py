"""``sharded=True`` through the DDP harness (real DDP, a float64 model, several steps):

* whenever the union of the shards is the gathered pool (equal per-rank batches, ``queue_size`` a
  multiple of the global batch), the loss, the DDP gradients and the parameters equal the
  *gathered* mode's oracle, the plain float64 reference fed the global batch (1e-12);
* otherwise (uneven and empty ranks, padding, a queue that is no multiple of anything) they equal
  an oracle of the same per-rank shards (``reference.ShardedReference``), and each rank's shard
  equals the oracle's shard of that rank, after every step;
* a checkpoint saved by 2 ranks and resumed by 3 (every rank loading rank 0's file, as the
  harness does) keeps the replicated state and starts every shard empty, as documented.

World sizes 1 (the sharded mode alone is the gathered mode) to 4 in CI; 8 ranks take about a
minute per test on a 2-core machine, so they run on request:
``SHARDED_WORLD_SIZES=8 tox -e ddp -- ddp_tests/test_sharded_ddp.py`` (any list picks others).
"""

from __future__ import annotations

import os
from functools import partial

import pytest
from test_ddp_exactness import RETURN_PER_CLASS, SIZES, assert_all_pass, mixed_plan

from imbalanced_losses.testing import Case, Step, check_many, shard_state
from imbalanced_losses.testing._compare import SHARD_CHECK
from imbalanced_losses.testing.family import LOSS_SPECS

pytestmark = [
    pytest.mark.filterwarnings("ignore:the pool holds .* too few for quantile"),
    pytest.mark.filterwarnings("ignore:.*positives make up"),
]

START_UP_S = 180.0
RECALL = next(spec for spec in LOSS_SPECS if spec.name == "recall_at_quantile")
SHARDED = [spec for spec in LOSS_SPECS if spec.loss.supports_sharded]
WORLD_SIZES = [int(w) for w in os.environ.get("SHARDED_WORLD_SIZES", "1,2,3,4").split(",")]


def uneven_plan(world_size: int) -> list[Step]:
    """The family's mixed plan (uneven and empty ranks, padding, weights, an eval step, every
    rank empty once); for 8 ranks, the same steps on 8-rank sizes."""
    if world_size in SIZES:
        return mixed_plan(world_size)
    sizes = [
        tuple((3 * r + k) % 5 if (r + k) % 4 else 0 for r in range(world_size)) for k in range(6)
    ]
    sizes[4] = (0,) * world_size
    which = [0, 1, 2, 3, 4, 5, 2, 0]  # the size pattern of mixed_plan's steps
    return [
        Step(sizes[k], step.pad_frac, step.weighted, step.train, step.kwargs)
        for k, step in zip(which, mixed_plan(2))
    ]


def equal_batch_plan(world_size: int, per_rank: int = 3) -> list[Step]:
    """Equal per-rank batches, no padding (padding makes the kept rows uneven): weights, an eval
    step, return_per_class; long enough for a queue of two global batches to wrap twice."""
    sizes = (per_rank,) * world_size
    return [
        Step(sizes),
        Step(sizes, weighted=True, kwargs=RETURN_PER_CLASS),
        Step(sizes),
        Step(sizes, train=False),
        Step(sizes, weighted=True),
        Step(sizes, kwargs=RETURN_PER_CLASS),
        Step(sizes),
    ]


def against_the_gathered_oracle(spec, num_classes: int, plan, **options) -> Case:
    """The sharded loss on the ranks; the gathered mode's oracle: the plain reference on the
    global batch with one whole queue. The replicated state (temperature, subsampling step) is
    compared across ranks; shards have no counterpart in a whole queue (see the next cases)."""
    return Case(
        partial(spec.make, num_classes, sharded=True, **options),
        plan,
        oracle_factory=partial(spec.make_reference, num_classes, **options),
        rtol=1e-12,
    )


def against_the_shards(spec, num_classes: int, plan, **options) -> Case:
    """The sharded loss against the reference over one plain FIFO shard per rank; each rank's
    shard is compared with the oracle's shard of that rank."""
    return Case(
        partial(spec.make, num_classes, sharded=True, **options),
        plan,
        oracle_factory=partial(spec.make_sharded_reference, num_classes, **options),
        state=shard_state,
        rtol=1e-12,
    )


def _assert_shards_checked(reports: list, cases: dict[str, Case]) -> None:
    for (name, case), report in zip(cases.items(), reports):
        queue_size = case.loss_factory.keywords["queue_size"]  # type: ignore[attr-defined]
        if case.state is not shard_state or len(case.plan[0].sizes) == 1 or queue_size == 0:
            continue
        checked = [c for c in report.checks if c.name == SHARD_CHECK]
        assert checked, f"[{name}] the shards were not compared\n{report}"
        assert max(c.scale for c in checked) > 0, f"[{name}] only empty shards compared"


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_sharded_equals_the_gathered_oracle_when_the_shards_union_is_the_gathered_pool(
    world_size,
):
    cases: dict[str, Case] = {}
    for spec in SHARDED:
        global_batch = 3 * world_size
        plan = equal_batch_plan(world_size)
        for num_classes, reduction in ((1, "mean"), (3, "sum"), (4, "none")):
            for queue_batches in (0, 1, 2):
                name = f"{spec.name}: C={num_classes}, {reduction}, queue {queue_batches} batches"
                cases[name] = against_the_gathered_oracle(
                    spec,
                    num_classes,
                    plan,
                    queue_size=queue_batches * global_batch,
                    reduction=reduction,
                )
        cases[f"{spec.name}: loss inside DDP"] = Case(
            partial(spec.make, 2, sharded=True, queue_size=2 * global_batch),
            plan,
            oracle_factory=partial(spec.make_reference, 2, queue_size=2 * global_batch),
            loss_inside_ddp=True,
            rtol=1e-12,
        )
    assert_all_pass(cases, timeout_s=START_UP_S)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_sharded_equals_an_oracle_of_the_same_shards_with_uneven_and_empty_ranks(world_size):
    plan = uneven_plan(world_size)
    global_rows = max(sum(s.sizes) for s in plan)
    cases: dict[str, Case] = {}
    for spec in SHARDED:
        variants = {
            "binary, queue of one row per rank": dict(num_classes=1, queue_size=world_size),
            "binary, queue 5": dict(num_classes=1, queue_size=max(5, world_size)),
            "multi-class, sum, queue no multiple of W": dict(
                num_classes=3, queue_size=4 * world_size + 3, reduction="sum"
            ),
            "multi-class, queue of a global batch": dict(num_classes=3, queue_size=global_rows),
            "multi-class, none, update_queue_in_eval": dict(
                num_classes=3, queue_size=8, reduction="none", update_queue_in_eval=True
            ),
            "multi-class, queue off": dict(num_classes=4, queue_size=0),
        }
        if "quantile_interpolation" in spec.own_options:  # a second order statistic
            variants["multi-class, queue off"]["quantile_interpolation"] = "linear"
        for name, options in variants.items():
            num_classes = options.pop("num_classes")
            cases[f"{spec.name}: {name}"] = against_the_shards(spec, num_classes, plan, **options)
        wraps = plan + plan
        cases[f"{spec.name}: shards wrap over many steps"] = against_the_shards(
            spec, 4, wraps, queue_size=7 + world_size
        )
    reports = check_many(list(cases.values()), timeout_s=START_UP_S)
    failed = {name: r for name, r in zip(cases, reports) if not r.ok}
    assert not failed, "\n\n".join(f"[{name}]\n{r}\n{r.table()}" for name, r in failed.items())
    _assert_shards_checked(reports, cases)


def test_a_checkpoint_saved_by_two_ranks_resumes_on_three_with_the_shards_emptied():
    """Every rank of the new world loads rank 0's file: no rank may keep rank 0's rows (they
    would count for a rank that did not hold them); the replicated state carries on."""
    plan = [
        Step((5, 3)),
        Step((0, 7), pad_frac=0.3),
        Step((4, 4), weighted=True),
        Step((3, 0, 4)),
        Step((2, 3, 2), train=False),
        Step((2, 3, 2), pad_frac=0.2, weighted=True),
        Step((1, 4)),
        Step((3, 3)),
    ]
    cases = {}
    for spec in SHARDED:
        cases[f"{spec.name}: 2 -> 3 -> 2 ranks"] = against_the_shards(
            spec, 3, plan, queue_size=12, temperature=0.5
        )
        # The default state (the whole state_dict): its replicated part (temperature, sample
        # step) must match on every rank and in every rank's checkpoint, its shard need not.
        cases[f"{spec.name}: 2 -> 3 -> 2 ranks, whole state"] = Case(
            partial(spec.make, 3, sharded=True, queue_size=12),
            plan,
            oracle_factory=partial(spec.make_sharded_reference, 3, queue_size=12),
            rtol=1e-12,
        )
    reports = check_many(list(cases.values()), timeout_s=START_UP_S)
    for name, report in zip(cases, reports):
        assert report.ok, f"[{name}]\n{report}\n{report.table()}"
    _assert_shards_checked(reports, cases)
    whole = reports[-1]
    replicated = [c for c in whole.checks if c.name == "state identical on every rank"]
    assert len(replicated) == len(plan) and min(c.scale for c in replicated) > 0
    assert any("per-rank state" in note for note in whole.notes)


def test_the_eight_rank_plan_has_uneven_empty_and_all_empty_steps():
    plan = uneven_plan(8)
    assert len(plan) == len(mixed_plan(2)) and all(len(s.sizes) == 8 for s in plan)
    assert any(0 in s.sizes and sum(s.sizes) for s in plan)
    assert any(sum(s.sizes) == 0 for s in plan) and any(len(set(s.sizes)) > 2 for s in plan)
