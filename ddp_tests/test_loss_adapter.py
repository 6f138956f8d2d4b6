"""What the harness assumes about a loss, checked in one process (no ranks spawned)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from imbalanced_losses import PAUCAtBudgetLoss, RecallAtQuantileLoss
from imbalanced_losses.testing import Case, Step, check_ddp_exactness, whole_state_dict
from imbalanced_losses.testing._adapter import LossAdapter, iid_mask_slot
from imbalanced_losses.testing._plan import make_batch
from imbalanced_losses.testing._report import diff
from imbalanced_losses.testing.reference import PlainPAUCLoss, ReferenceSmoothAPLoss


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
    _, y, w, _ = make_batch(case, no_padding, 0, case.plan[0], torch.device("cpu"))
    assert (y >= 0).all() and w is None  # PlainLoss takes no sample_weight either
    _, y, _, _ = make_batch(
        case, adapter(PlainLoss(), num_classes=3), 0, case.plan[0], torch.device("cpu")
    )
    assert (y == -100).all()


def test_bad_options_are_refused_before_any_rank_starts():
    with pytest.raises(ValueError, match="loss_scale must be 1 or 'world_size', got 2"):
        check_ddp_exactness(WeightedLoss, [Step((2, 2))], num_classes=2, loss_scale=2)
    with pytest.raises(ValueError, match="plan: must hold at least one Step"):
        check_ddp_exactness(WeightedLoss, [], num_classes=2)


class Recorder(nn.Module):
    """Keeps what its forward got, to see how the adapter called it."""

    def forward(self, scores, labels, iid_mask=None, sample_weight=None):
        self.got = {"iid_mask": iid_mask, "sample_weight": sample_weight}
        return scores.sum() * 0


class KeywordIidLoss(nn.Module):
    def forward(self, scores, labels, *, iid_mask=None):
        self.got = iid_mask
        return scores.sum() * 0


def test_a_forward_is_asked_for_the_iid_mask_by_its_place_or_its_name_never_by_kwargs():
    assert iid_mask_slot(Recorder()) == "third"
    assert iid_mask_slot(PAUCAtBudgetLoss(2)) == "third"  # the reference library's order
    assert iid_mask_slot(RecallAtQuantileLoss(2)) == "third"
    assert iid_mask_slot(PlainPAUCLoss(2)) == "third"
    assert iid_mask_slot(ReferenceSmoothAPLoss(2)) == "third"
    assert iid_mask_slot(KeywordIidLoss()) == "keyword"
    assert iid_mask_slot(KeywordsLoss()) is None  # **kwargs alone does not say it uses one
    assert iid_mask_slot(WeightedLoss()) is None
    assert not adapter(WeightedLoss(), num_classes=2).takes_iid_mask
    assert adapter(Recorder(), num_classes=2).takes_iid_mask


def test_the_iid_mask_of_an_iid_step_reaches_the_forward_as_its_third_argument():
    step = Step((3, 0, 4), weighted=True, iid_frac=0.5)
    loss = Recorder()
    case = Case(Recorder, [step], num_classes=2)
    batch = make_batch(case, adapter(loss, num_classes=2), 0, step, torch.device("cpu"))
    assert batch.iid is not None and batch.iid.dtype == torch.bool
    adapter(loss, num_classes=2).call(loss, batch.x, batch.y, batch.weight, batch.iid, {})
    assert loss.got["iid_mask"] is batch.iid and loss.got["sample_weight"] is batch.weight
    by_name = KeywordIidLoss()
    adapter(by_name, num_classes=2).call(by_name, batch.x, batch.y, None, batch.iid, {})
    assert by_name.got is batch.iid
    # A loss without the parameter gets no mask, and the batch has none for it.
    assert make_batch(case, adapter(PlainLoss(), num_classes=2), 0, step, "cpu").iid is None


def test_an_iid_step_draws_the_mask_last_and_each_rank_takes_its_own_rows_of_it():
    """The other columns are those of the same step without a mask; rank r's block of the
    mask starts after the rows of ranks 0..r-1 (as the targets' block does)."""
    sizes = (3, 0, 5, 4)
    case = Case(Recorder, [Step(sizes)], num_classes=3)
    read = adapter(Recorder(), num_classes=3)
    plain = make_batch(case, read, 7, Step(sizes, pad_frac=0.2, weighted=True), "cpu")
    iid = make_batch(case, read, 7, Step(sizes, pad_frac=0.2, weighted=True, iid_frac=0.4), "cpu")
    assert plain.iid is None and iid.iid is not None
    for a, b in zip(plain[:3], iid[:3]):
        assert torch.equal(a, b)
    assert 0 < int((~iid.iid).sum()) < sum(sizes)  # both kinds of rows
    lo = 0
    for rank, n in enumerate(sizes):
        block = iid.rows(sizes, rank)
        assert block.x.shape[0] == block.iid.shape[0] == n
        assert torch.equal(block.iid, iid.iid[lo : lo + n])
        assert torch.equal(block.y, iid.y[lo : lo + n])
        lo += n
    all_iid = make_batch(case, read, 7, Step(sizes, iid_frac=0.0), "cpu").iid
    assert all_iid is not None and bool(all_iid.all())  # 0.0: a mask, all True


def test_a_step_refuses_a_bad_iid_frac_and_a_mask_in_kwargs_and_names_its_iid_frac():
    for bad in (-0.1, 1.5, "0.3", True, float("nan")):
        with pytest.raises(ValueError, match=r"iid_frac: expected None or a number in \[0, 1\]"):
            Step((2, 2), iid_frac=bad)
    with pytest.raises(ValueError, match="kwargs: iid_mask is per-row.*Step\\(iid_frac"):
        Step((2, 2), kwargs={"iid_mask": torch.ones(4, dtype=torch.bool)})
    assert (
        Step((2, 2), iid_frac=0.3).describe(4)
        == "plan step 4 (train, 2 ranks, rows (2, 2), iid_frac=0.3)"
    )
