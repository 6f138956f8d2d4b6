"""SmoothAPLoss and LossWarmupWrapper under real DDP: every step equals one process fed the
concatenated global batch (the plain full-matrix Smooth-AP as the oracle where it applies).

Same scenario matrix as the recall loss (``test_ddp_exactness.py``): uneven and empty ranks,
padding, weights, eval steps, a wrapping queue, a subsampled pool, checkpoints across world sizes.
"""

from __future__ import annotations

from functools import partial

import pytest
from test_ddp_exactness import SIZES, assert_all_pass, mixed_plan

from imbalanced_losses import LossWarmupWrapper, RecallAtQuantileLoss, SmoothAPLoss
from imbalanced_losses.testing import Case, Step, check_many
from imbalanced_losses.testing.reference import ReferenceSmoothAPLoss

# The warm-up loss of the wrapper cases is the recall loss on tiny pools: its warning is noise.
pytestmark = pytest.mark.filterwarnings("ignore:the pool holds .* too few for quantile")

# The hang deadline also covers the ranks' start-up (importing torch), which took over 60 s on
# this 2-core machine while other jobs ran; these worlds are not the place to test hangs.
START_UP_S = 180.0

# A temperature of 0.5 on unit-scale logits keeps the pair sigmoids off their flat tails.
SAP = partial(SmoothAPLoss, temperature=0.5)


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


def plain(num_classes: int, **options) -> Case:
    """Keyword options for a Case whose oracle is the plain full-matrix Smooth-AP."""
    return dict(oracle_factory=partial(ReferenceSmoothAPLoss, num_classes, **options))


# World sizes 1 and 4 run in the checkpoint test below (2 -> 4 -> 1 ranks, same scenarios).
@pytest.mark.parametrize("world_size", [2, 3])
def test_every_step_matches_the_single_process_oracle_on_gloo(world_size):
    plan = mixed_plan(world_size)
    global_rows = max(sum(s.sizes) for s in plan)
    opts = dict(temperature=0.5)
    cases = {
        "binary, queue smaller than a global batch": Case(
            partial(SAP, 1, queue_size=5), plan, **plain(1, queue_size=5, **opts)
        ),
        "multi-class, queue wraps around over many steps": Case(
            partial(SAP, 4, queue_size=7), plan + plan, **plain(4, queue_size=7, **opts)
        ),
        "warm-up wrapper: recall loss -> Smooth-AP": Case(
            partial(WarmupToSmoothAP, 3, global_rows - 2),
            [Step(s.sizes, s.pad_frac, s.weighted, s.train) for s in plan],
        ),
    }
    cases |= {
        "multi-class, queue off, sum": Case(
            partial(SAP, 3, queue_size=0, reduction="sum"),
            plan,
            **plain(3, queue_size=0, reduction="sum", **opts),
        ),
        "multi-class, none, update_queue_in_eval": Case(
            partial(SAP, 3, queue_size=8, reduction="none", update_queue_in_eval=True),
            plan,
            **plain(3, queue_size=8, reduction="none", update_queue_in_eval=True, **opts),
        ),
        "multi-class, max_pool_size": Case(partial(SAP, 3, queue_size=12, max_pool_size=6), plan),
        "binary, loss inside DDP": Case(partial(SAP, 1, queue_size=6), plan, loss_inside_ddp=True),
    }
    assert_all_pass(cases, timeout_s=START_UP_S)


def test_checkpoints_resume_across_world_sizes_on_the_oracle_trajectory():
    plan = (
        [Step((5, 3)), Step((0, 7), pad_frac=0.3), Step((4, 4), weighted=True)]
        + [Step((3, 0, 2, 4)), Step((1, 1, 1, 1), train=False), Step((2, 3, 4, 1))]
        + [Step((6,)), Step((5,), weighted=True)]
    )
    cases = [
        Case(partial(SAP, 3, queue_size=9), plan, **plain(3, queue_size=9, temperature=0.5)),
        Case(partial(SAP, 3, queue_size=9, max_pool_size=8), plan),
        Case(partial(WarmupToSmoothAP, 2, 9), plan),
    ]
    for report in check_many(cases, timeout_s=START_UP_S):
        report.raise_if_failed()
        checked = {(c.step, c.world_size) for c in report.checks if c.name == "queue vs oracle"}
        assert checked == {(i, len(s.sizes)) for i, s in enumerate(plan)}


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
