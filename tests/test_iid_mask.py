"""``iid_mask`` (contract §16): the reference's forward order, and the flag travels with the rows.

The recall and Smooth-AP losses accept it and give the same values and gradients with or
without it; the flag reaches the loss as ``Rows.iid`` for live, queued and sampled rows.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from imbalanced_losses import PAUCAtBudgetLoss, Pool, RecallAtQuantileLoss, SmoothAPLoss

pytestmark = pytest.mark.filterwarnings("ignore:.*exceeds max_pool_size.*:UserWarning")

# The reference 0.6.0's forward parameters (imbalanced_losses/_base.py of the PyPI release):
# forward(self, logits, targets, iid_mask=None, return_per_class=False, *, sample_weight=None)
REFERENCE_FORWARD = [
    ("logits", "POSITIONAL_OR_KEYWORD", inspect.Parameter.empty),
    ("targets", "POSITIONAL_OR_KEYWORD", inspect.Parameter.empty),
    ("iid_mask", "POSITIONAL_OR_KEYWORD", None),
    ("return_per_class", "POSITIONAL_OR_KEYWORD", False),
    ("sample_weight", "KEYWORD_ONLY", None),
]
LOSSES = {
    "recall": lambda **kw: RecallAtQuantileLoss(3, quantile=0.25, temperature=0.3, **kw),
    "smooth_ap": lambda **kw: SmoothAPLoss(3, temperature=0.5, **kw),
}


@pytest.mark.parametrize("cls", [RecallAtQuantileLoss, SmoothAPLoss])
def test_forward_takes_the_references_parameters_in_its_order(cls):
    params = list(inspect.signature(cls.forward).parameters.values())[1:]
    ours = [(p.name, p.kind.name, p.default) for p in params]
    assert ours[: len(REFERENCE_FORWARD)] == REFERENCE_FORWARD
    assert [p.kind.name for p in params[len(REFERENCE_FORWARD) :]] == ["KEYWORD_ONLY"]


def test_the_pauc_forward_adds_return_diagnostics_after_return_per_class_as_the_reference():
    params = list(inspect.signature(PAUCAtBudgetLoss.forward).parameters.values())[1:]
    ours = [(p.name, p.kind.name, p.default) for p in params]
    pauc_reference = [
        *REFERENCE_FORWARD[:4],
        ("return_diagnostics", "POSITIONAL_OR_KEYWORD", False),
        REFERENCE_FORWARD[4],
    ]
    assert ours[: len(pauc_reference)] == pauc_reference
    assert [p.kind.name for p in params[len(pauc_reference) :]] == ["KEYWORD_ONLY"]


def test_positional_iid_mask_and_return_per_class_work_as_in_the_reference():
    loss_fn = RecallAtQuantileLoss(2, quantile=0.3)
    logits, targets = torch.randn(8, 2), torch.tensor([0, 1] * 4)
    loss, per_class, valid = loss_fn(logits, targets, None, True)
    assert per_class.shape == valid.shape == (2,)
    mask = torch.tensor([True, False] * 4)
    torch.testing.assert_close(loss_fn(logits, targets, mask), loss, rtol=0, atol=0)


@pytest.mark.parametrize("max_pool_size", [None, 20])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_values_and_gradients_are_the_same_with_or_without_iid_mask(name, max_pool_size):
    with_mask = LOSSES[name](queue_size=16, max_pool_size=max_pool_size).double()
    without = LOSSES[name](queue_size=16, max_pool_size=max_pool_size).double()
    gen = torch.Generator().manual_seed(5)
    for _ in range(4):  # the queue fills with rows of both kinds
        logits = torch.randn(9, 3, generator=gen, dtype=torch.float64)
        targets = torch.randint(0, 3, (9,), generator=gen)
        targets[0] = -100
        mask = torch.rand(9, generator=gen) < 0.5
        a = logits.clone().requires_grad_(True)
        b = logits.clone().requires_grad_(True)
        loss_a, per_a, _ = with_mask(a, targets, mask, True)
        loss_b, per_b, _ = without(b, targets, return_per_class=True)
        torch.testing.assert_close(per_a, per_b, rtol=0, atol=0, equal_nan=True)
        loss_a.backward()
        loss_b.backward()
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


class _PoolProbe(RecallAtQuantileLoss):
    """Keeps the pool its last forward ranked."""

    def per_class_loss(self, pool: Pool):
        self.seen = pool
        return super().per_class_loss(pool)


def test_the_iid_flag_travels_with_live_queued_and_sampled_rows():
    loss_fn = _PoolProbe(2, quantile=0.3, queue_size=16)
    first = torch.tensor([True, False, True, True, False])
    loss_fn(torch.randn(5, 2), torch.tensor([0, 1, -100, 1, 0]), first)
    assert loss_fn.seen.live.iid.tolist() == [True, False, True, False]  # the padding row left
    second = torch.tensor([False, True, False])
    loss_fn(torch.randn(3, 2), torch.tensor([1, 0, 1]), second)
    assert loss_fn.seen.queued.iid.tolist() == [True, False, True, False]
    assert loss_fn.seen.live.iid.tolist() == second.tolist()
    loss_fn(torch.randn(3, 2), torch.tensor([1, 0, 1]))  # no mask: every row iid
    assert loss_fn.seen.live.iid.tolist() == [True] * 3
    assert (
        loss_fn.queue.iid_rows().tolist()
        == [True, False, True, False, False, True, False] + [True] * 3
    )

    loss_fn.max_pool_size = 6  # the sample's rows keep their flags
    loss_fn(torch.randn(2, 2), torch.tensor([0, 1]), torch.tensor([False, False]))
    pool = loss_fn.seen
    every = torch.cat([pool.live.iid, pool.queued.iid])
    (block,) = pool.blocks()
    assert torch.equal(block.iid, every[pool.threshold_rows])


@pytest.mark.parametrize(
    "mask, match",
    [
        (
            torch.ones(4, dtype=torch.bool),
            r"iid_mask must be \[N\] matching logits dim-0, got \(4,\)",
        ),
        (torch.ones(5), "iid_mask must be a bool tensor"),
        ([True] * 5, "iid_mask must be a bool tensor"),
    ],
)
def test_a_bad_iid_mask_is_refused_naming_it(mask, match):
    loss_fn = RecallAtQuantileLoss(2, quantile=0.3, queue_size=4)
    with pytest.raises(ValueError, match=match):
        loss_fn(torch.randn(5, 2), torch.tensor([0, 1, 0, 1, 0]), mask)
    assert loss_fn.queue.count == 0
