"""Every loss of the family under real DDP (``LOSS_SPECS``, the list the single-process family
tests run on): each step equals one process fed the concatenated global batch, with the loss's
plain reference as the oracle wherever it models the case; checkpoints resume across world
sizes; ranks that disagree all raise. Plus the warm-up wrapper (recall -> Smooth-AP).

One spawned world per world size runs the cases of every loss (spawning costs seconds), so a
new loss adds cases, not worlds. The recall loss's own DDP cases (reductions with
``return_per_class``, broadcast buffers, a local cross-entropy term, the harness's broken
losses, NCCL) stay in ``test_ddp_exactness.py``.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import pytest
import torch
from test_ddp_exactness import SIZES, assert_all_pass, mixed_plan

from imbalanced_losses import LossWarmupWrapper, RecallAtQuantileLoss, SmoothAPLoss
from imbalanced_losses.testing import Case, Step, check_many, queue_state, run_ranks
from imbalanced_losses.testing.family import LOSS_SPECS, LossSpec

# Tiny worlds with empty ranks make tiny pools on purpose; the recall loss's warning is noise.
pytestmark = pytest.mark.filterwarnings("ignore:the pool holds .* too few for quantile")

# The hang deadline also covers the ranks' start-up (importing torch), which took over 60 s on
# this 2-core machine while other jobs ran; these worlds are not the place to test hangs.
START_UP_S = 180.0


def against_reference(spec: LossSpec, num_classes: int, plan: list[Step], **options) -> Case:
    """A case whose oracle is the loss's plain reference with the same options (float64);
    the reference's state is its queue alone, so the queue is what is compared."""
    return Case(
        partial(spec.make, num_classes, **options),
        plan,
        oracle_factory=partial(spec.make_reference, num_classes, **options),
        state=queue_state,
    )


# Share of non-iid rows by step of mixed_plan (None: no iid_mask passed). Every loss takes the
# mask; the recall and Smooth-AP references ignore it, so those losses must give the values they
# give without one; the partial-AUC reference takes its band edges from the iid rows.
IID_FRACS = (None, 0.4, 0.5, 0.0, 0.3, 0.6, 0.5, None)


def iid_plan(world_size: int) -> list[Step]:
    """``mixed_plan`` with a per-row iid_mask on most steps (eval and all-padding included)."""
    plan = mixed_plan(world_size)
    assert len(plan) == len(IID_FRACS)
    return [dataclasses.replace(s, iid_frac=f) for s, f in zip(plan, IID_FRACS)]


def pauc_cases(world_size: int) -> dict[str, Case]:
    """The partial-AUC loss's other surrogate and settings (the family spec runs the pairwise
    surrogate on the iid-mask basis "fpr"): trapezoid on the iid population, live numerator,
    band scale; pairwise with the band scale and the live numerator; both with iid steps."""
    spec = next(s for s in LOSS_SPECS if s.name == "pauc_at_budget")
    plan = iid_plan(world_size)
    trapezoid = {"surrogate": "trapezoid", "n_knots": 4, "alpha": 0.05}
    return {
        "pauc_at_budget: trapezoid, population basis, live numerator, band scale": (
            against_reference(
                spec,
                3,
                plan + plan,
                queue_size=7,
                **trapezoid,
                budget_basis="population",
                pos_numerator="live",
                tau_scale="band",
            )
        ),
        "pauc_at_budget: trapezoid, binary, iqr, queue smaller than a global batch": (
            against_reference(spec, 1, plan, queue_size=5, **trapezoid)
        ),
        "pauc_at_budget: pairwise, live numerator, band scale, none": against_reference(
            spec, 3, plan, queue_size=9, pos_numerator="live", tau_scale="band", reduction="none"
        ),
    }


def family_cases(spec: LossSpec, world_size: int) -> dict[str, Case]:
    """The scenario matrix every loss runs: uneven and empty ranks, padding, weights, eval
    steps, per-row iid masks, every reduction, a queue off / smaller than a batch / wrapping,
    a subsampled pool."""
    plan = iid_plan(world_size)
    global_rows = max(sum(s.sizes) for s in plan)
    cases = {
        "binary, queue off": against_reference(spec, 1, plan, queue_size=0),
        "binary, queue smaller than a global batch": against_reference(spec, 1, plan, queue_size=5),
        "multi-class, queue off, sum": against_reference(
            spec, 3, plan, queue_size=0, reduction="sum"
        ),
        "multi-class, queue smaller than a global batch": against_reference(
            spec, 3, plan, queue_size=global_rows - 2
        ),
        "multi-class, queue wraps around over many steps": against_reference(
            spec, 4, plan + plan, queue_size=7
        ),
        "multi-class, none, update_queue_in_eval": against_reference(
            spec, 3, plan, queue_size=8, reduction="none", update_queue_in_eval=True
        ),
        # The reference does not subsample: the oracle is the loss itself, one process.
        "multi-class, max_pool_size": Case(
            partial(spec.make, 3, queue_size=12, max_pool_size=6), plan
        ),
        "binary, loss inside DDP": Case(
            partial(spec.make, 1, queue_size=6), plan, loss_inside_ddp=True
        ),
    }
    return {f"{spec.name}: {name}": case for name, case in cases.items()}


class WarmupToSmoothAP(LossWarmupWrapper):
    """Recall loss for 2 steps, blended into Smooth-AP over 2 more, temperature decaying.

    Exposes the main loss's queue and options under the names the harness reads.
    """

    def __init__(self, num_classes: int, queue_size: int) -> None:
        super().__init__(
            RecallAtQuantileLoss(num_classes, quantile=0.3, queue_size=0, temperature=0.5),
            SmoothAPLoss(num_classes, queue_size=queue_size),
            warmup_steps=2,
            blend_steps=2,
            final_main_weight=0.75,
            temp_start=1.0,
            temp_end=0.25,
            temp_decay_steps=3,
        )

    @property
    def queue(self):
        return self.main_loss.queue

    @property
    def num_classes(self) -> int:
        return self.main_loss.num_classes

    @property
    def ignore_index(self) -> int:
        return self.main_loss.ignore_index

    @property
    def update_queue_in_eval(self) -> bool:
        return self.main_loss.update_queue_in_eval


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_every_loss_matches_its_single_process_oracle_at_every_step_on_gloo(world_size):
    cases: dict[str, Case] = {}
    for spec in LOSS_SPECS:
        cases |= family_cases(spec, world_size)
    cases |= pauc_cases(world_size)
    plan = mixed_plan(world_size)
    global_rows = max(sum(s.sizes) for s in plan)
    cases["warm-up wrapper: recall loss -> Smooth-AP"] = Case(
        partial(WarmupToSmoothAP, 3, global_rows - 2),
        [Step(s.sizes, s.pad_frac, s.weighted, s.train) for s in plan],
    )
    assert_all_pass(cases, timeout_s=START_UP_S)


def test_checkpoints_resume_across_world_sizes_on_the_oracle_trajectory():
    """Saved at world size 2, resumed at 4, then at 1; the oracle never stops."""
    plan = (
        [Step((5, 3)), Step((0, 7), pad_frac=0.3), Step((4, 4), weighted=True)]
        + [Step((3, 0, 2, 4)), Step((1, 1, 1, 1), train=False), Step((2, 3, 4, 1))]
        + [Step((6,)), Step((5,), weighted=True)]
    )
    cases = []
    for spec in LOSS_SPECS:
        cases.append(against_reference(spec, 3, plan, queue_size=9))
        cases.append(Case(partial(spec.make, 3, queue_size=9, max_pool_size=8), plan))
    cases.append(Case(partial(WarmupToSmoothAP, 2, 9), plan))
    for report in check_many(cases, timeout_s=START_UP_S):
        report.raise_if_failed()
        checked = {(c.step, c.world_size) for c in report.checks if c.name == "state vs oracle"}
        assert checked == {(i, len(s.sizes)) for i, s in enumerate(plan)}
        assert "loss" in report.final_state  # the serialised state_dict that was resumed from


# Each: (name that the error must contain, rank 0's options, rank 1's options).
DISAGREEMENTS = [
    ("num_classes", {"num_classes": 2}, {"num_classes": 3}),
    ("queue_size", {"queue_size": 8}, {"queue_size": 16}),
    ("ignore_index", {"ignore_index": -100}, {"ignore_index": -1}),
    ("temperature", {"temperature": 0.5}, {"temperature": 0.25}),
    ("reduction", {"reduction": "mean"}, {"reduction": "sum"}),
    ("max_pool_size", {"max_pool_size": 4}, {"max_pool_size": 5}),
    ("sample_weight", {}, {}),
]


def _rank_with_its_own_config(rank: int, spec_name: str) -> dict:
    """Each case builds a loss whose setting differs on rank 1; every rank must raise."""
    spec = next(s for s in LOSS_SPECS if s.name == spec_name)
    gen = torch.Generator().manual_seed(rank)
    outcome = {}
    for name, *per_rank in DISAGREEMENTS:
        options = {"num_classes": 3, "queue_size": 8, **per_rank[min(rank, 1)]}
        loss = spec.make(**options).double()
        logits = torch.randn(4, options["num_classes"], generator=gen, dtype=torch.float64)
        targets = torch.tensor([0, 1, 1, 0])
        weight = torch.ones(4, dtype=torch.float64) if name == "sample_weight" else None
        try:
            loss(logits, targets, sample_weight=weight if rank == 0 else None)
            outcome[name] = (None, loss.queue.count)
        except ValueError as exc:
            outcome[name] = (str(exc), loss.queue.count)
    return outcome


@pytest.mark.parametrize("spec", [pytest.param(s, id=s.name) for s in LOSS_SPECS])
def test_ranks_that_disagree_on_an_option_all_raise_naming_it(spec):
    results = run_ranks(_rank_with_its_own_config, 3, timeout_s=START_UP_S, args=(spec.name,))
    for rank, outcome in enumerate(results):
        for name, (message, queue_count) in outcome.items():
            assert message is not None, f"rank {rank} did not raise when ranks disagree on {name}"
            assert name in message, f"rank {rank}, {name}: unclear message {message!r}"
            assert queue_count == 0, f"rank {rank}, {name}: the queue changed before the error"


def test_the_wrapper_case_really_blends_and_decays():
    """The wrapper case above exercises all three phases within the mixed plan."""
    wrapper = WarmupToSmoothAP(3, 8)
    assert len(SIZES[2]) >= 5
    weights, temperatures = [], []
    for step in range(6):
        wrapper.on_train_batch_start(step)
        weights.append(wrapper.main_weight)
        temperatures.append(wrapper.current_temperature)
    assert weights == [0.0, 0.0, 0.25, 0.5, 0.75, 0.75]
    assert temperatures[2] == 1.0 and temperatures[5] == 0.25
