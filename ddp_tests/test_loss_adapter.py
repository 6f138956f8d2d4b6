"""What the harness assumes about a loss, checked in one process (no ranks spawned)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from imbalanced_losses import RecallAtQuantileLoss
from imbalanced_losses.testing import Case, Step, check_ddp_exactness, whole_state_dict
from imbalanced_losses.testing._adapter import LossAdapter
from imbalanced_losses.testing._plan import make_batch
from imbalanced_losses.testing._report import diff


class PlainLoss(nn.Module):
    def forward(self, scores, labels):
        return scores.sum() * 0


class WeightedLoss(nn.Module):
    def forward(self, scores, labels, sample_weight=None):
        return scores.sum() * 0


class KeywordsLoss(nn.Module):
    def forward(self, scores, labels, **kwargs):
        return scores.sum() * 0


class WithExtraState(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("memory", torch.arange(3.0))
        self.position = 2

    def get_extra_state(self):
        return {"position": self.position, "seen": torch.tensor([1, 2])}

    def set_extra_state(self, state):
        self.position = state["position"]


def adapter(loss, **options) -> LossAdapter:
    return LossAdapter.for_case(Case(lambda: loss, [Step((1,))], **options), loss)


def test_a_loss_without_num_classes_needs_it_from_the_case():
    with pytest.raises(ValueError, match=r"num_classes: .*PlainLoss has no num_classes"):
        adapter(PlainLoss())
    assert adapter(PlainLoss(), num_classes=3).num_classes == 3
    assert adapter(PlainLoss(), num_classes=3).ignore_index == -100


def test_sample_weight_is_passed_only_to_a_forward_that_takes_it():
    assert not adapter(PlainLoss(), num_classes=2).takes_sample_weight
    assert adapter(WeightedLoss(), num_classes=2).takes_sample_weight
    assert adapter(KeywordsLoss(), num_classes=2).takes_sample_weight


def test_the_default_state_is_the_whole_state_dict_with_extra_state():
    state = whole_state_dict(WithExtraState())
    assert set(state) == {"memory", "_extra_state"}
    assert state["_extra_state"]["position"] == 2
    other = whole_state_dict(WithExtraState())
    other["_extra_state"]["position"] = 0
    assert diff(state, other) == 2  # an int inside extra state is compared too
    assert adapter(WithExtraState(), num_classes=2).state is whole_state_dict


def test_our_losses_are_read_through_their_whole_state_dict_with_extra_state():
    """Not only the queue: the subsampling step and the temperature must agree too."""
    loss = RecallAtQuantileLoss(3, queue_size=4, temperature=0.5, max_pool_size=2).double()
    read = adapter(loss)
    assert read.state is whole_state_dict and read.state_is_default
    loss(torch.randn(3, 3, dtype=torch.float64), torch.tensor([0, 1, 2]))  # 3 rows > 2: a sample
    state = read.state(loss)
    assert {"queue.scores", "queue.targets", "queue.weights"} <= set(state)
    assert state["queue._extra_state"] == {"ptr": 3, "count": 3}
    assert state["_extra_state"]["subsample_step"] == 1
    assert state["_extra_state"]["temperature"] == 0.5


class DeclaresNothing(PlainLoss):
    update_queue_in_eval = True  # a name that means nothing to the harness on another loss


def test_only_a_loss_of_ours_says_it_writes_its_state_in_eval_the_rest_take_the_option():
    writes = RecallAtQuantileLoss(3, queue_size=4, update_queue_in_eval=True)
    assert adapter(writes).writes_state_in_eval
    assert not adapter(RecallAtQuantileLoss(3, queue_size=4)).writes_state_in_eval
    assert not adapter(DeclaresNothing(), num_classes=2).writes_state_in_eval
    assert adapter(DeclaresNothing(), num_classes=2, writes_state_in_eval=True).writes_state_in_eval


def test_states_with_other_entries_differ_infinitely():
    a = {"memory": torch.zeros(2)}
    assert diff(a, {"memory_": torch.zeros(2)}) == float("inf")
    assert diff(a, {"memory": torch.zeros(2)}) == 0


def test_no_padding_rows_for_a_loss_that_does_not_take_them():
    case = Case(PlainLoss, [Step((4, 4), pad_frac=1.0, weighted=True)], num_classes=3)
    no_padding = adapter(PlainLoss(), num_classes=3, takes_padding=False)
    _, y, w = make_batch(case, no_padding, 0, case.plan[0], torch.device("cpu"))
    assert (y >= 0).all() and w is None  # PlainLoss takes no sample_weight either
    _, y, _ = make_batch(
        case, adapter(PlainLoss(), num_classes=3), 0, case.plan[0], torch.device("cpu")
    )
    assert (y == -100).all()


def test_bad_options_are_refused_before_any_rank_starts():
    with pytest.raises(ValueError, match="loss_scale must be 1 or 'world_size', got 2"):
        check_ddp_exactness(WeightedLoss, [Step((2, 2))], num_classes=2, loss_scale=2)
    with pytest.raises(ValueError, match="plan: must hold at least one Step"):
        check_ddp_exactness(WeightedLoss, [], num_classes=2)
