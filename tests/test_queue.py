"""Contract §4: what enters the queue, when, and in which slot."""

from __future__ import annotations

import math

import pytest
import torch
from _support import (
    TIGHT,
    assert_queue_unchanged,
    assert_same_queue,
    fill_queue,
    make_pair,
    queue_state,
    random_batch,
)
from hypothesis import given
from hypothesis import strategies as st

from imbalanced_losses import MemoryQueue, RecallAtQuantileLoss
from imbalanced_losses.testing.reference import ReferenceRecallAtQuantileLoss

# Tiny pools are the point of several tests here; their pool * q < 1 warning is tested elsewhere.
pytestmark = pytest.mark.filterwarnings("ignore:.*pool.*:UserWarning")


class ListQueue:
    """The most literal queue there is: a Python list of slots written one row at a time,
    or, for a push of at least ``size`` rows, replaced by its last ``size`` rows (§4)."""

    def __init__(self, size):
        self.size, self.slots, self.ptr, self.count = size, [None] * size, 0, 0

    def push(self, rows):
        if self.size and len(rows) >= self.size:
            self.slots, self.ptr, self.count = list(rows[-self.size :]), 0, self.size
            return
        for row in rows:
            if self.size == 0:
                return
            self.slots[self.ptr] = row
            self.ptr = (self.ptr + 1) % self.size
            self.count = min(self.count + 1, self.size)


@given(
    size=st.integers(0, 9),
    pushes=st.lists(st.integers(0, 25), max_size=8),
    seed=st.integers(0, 1000),
)
def test_queue_writes_rows_circularly_and_big_pushes_replace_it(size, pushes, seed):
    gen = torch.Generator().manual_seed(seed)
    model = ListQueue(size)
    lib = MemoryQueue(size, 2, dtype=torch.float64)
    ref = ReferenceRecallAtQuantileLoss(2, queue_size=size, dtype=torch.float64)
    for m in pushes:
        scores = torch.randn(m, 2, generator=gen, dtype=torch.float64)
        targets = torch.randint(0, 2, (m,), generator=gen)
        weights = torch.rand(m, generator=gen, dtype=torch.float64)
        model.push(list(zip(scores, targets, weights)))
        lib.push(scores, targets, weights)
        ref.queue.push(scores, targets, weights)
        for q in (lib, ref.queue):
            assert (q.ptr, q.count) == (model.ptr, model.count)
            for slot in range(model.count):
                s, t, w = model.slots[slot]
                assert torch.equal(q.scores[slot], s)
                assert int(q.targets[slot]) == int(t)
                assert torch.equal(q.weights[slot], w)
        rows = lib.rows()
        assert [r.shape[0] for r in rows] == [model.count] * 3


def test_all_padding_batch_leaves_queue_unchanged_and_loss_comes_from_queue():
    lib, ref = make_pair(3, quantile=0.2, queue_size=16, temperature=0.3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        logits, targets, _ = random_batch(gen, 10, 3)
        lib(logits, targets)
        ref(logits, targets)
    before = queue_state(lib)
    logits = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    targets = torch.full((6,), -100)
    loss = lib(logits, targets)
    exp = ref(logits, targets)
    assert_queue_unchanged(lib, before)
    assert_same_queue(lib, ref)
    torch.testing.assert_close(loss, exp, **TIGHT)
    assert math.isfinite(loss.item()) and loss.item() > 0
    (grad,) = torch.autograd.grad(loss, logits)  # connected, but queue rows carry no gradient
    assert torch.equal(grad, torch.zeros_like(grad))


def test_padding_rows_never_take_a_slot():
    lib = RecallAtQuantileLoss(2, queue_size=8).double()
    logits = torch.arange(12, dtype=torch.float64).reshape(6, 2)
    targets = torch.tensor([0, -100, 1, -100, -100, 0])
    lib(logits, targets)
    assert (lib.queue.ptr, lib.queue.count) == (3, 3)
    assert torch.equal(lib.queue.scores[:3], logits[[0, 2, 5]])
    assert torch.equal(lib.queue.targets[:3], torch.tensor([0, 1, 0]))


def test_custom_ignore_index_padding_never_takes_a_slot():
    lib = RecallAtQuantileLoss(3, queue_size=8, ignore_index=255).double()
    logits = torch.randn(5, 3, dtype=torch.float64)
    lib(logits, torch.tensor([255, 1, 255, 2, 255]))
    assert lib.queue.count == 2
    assert torch.equal(lib.queue.targets[:2], torch.tensor([1, 2]))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_non_finite_rows_never_take_a_slot_but_the_step_loss_is_nan(bad, reduction):
    lib, ref = make_pair(3, quantile=0.2, queue_size=16, temperature=0.3, reduction=reduction)
    gen = torch.Generator().manual_seed(1)
    logits, targets, _ = random_batch(gen, 10, 3)
    lib(logits, targets)
    ref(logits, targets)
    # Row 4 has one bad logit, in a column whose class has no positive this step.
    logits, _, _ = random_batch(gen, 8, 3)
    targets = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])
    logits[4, 2] = bad
    loss = lib(logits, targets)
    assert math.isnan(loss.item()), "a non-finite logit must show in the step's loss"
    good = torch.ones(8, dtype=torch.bool)
    good[4] = False
    ref.queue.push(logits[good], targets[good], torch.ones(7, dtype=torch.float64))
    assert_same_queue(lib, ref)
    # The next step is not poisoned: it equals the reference that never saw the bad row.
    logits, targets, _ = random_batch(gen, 10, 3)
    torch.testing.assert_close(lib(logits, targets), ref(logits, targets), **TIGHT)
    assert_same_queue(lib, ref)


@pytest.mark.parametrize("extra", [0, 1, 5, 13])
def test_batch_at_least_queue_size_keeps_its_last_rows(extra):
    size = 6
    lib = RecallAtQuantileLoss(2, queue_size=size).double()
    gen = torch.Generator().manual_seed(2)
    fill_queue(lib, gen, steps=1, n=4)  # ptr = 4, not at slot 0
    logits, targets, _ = random_batch(gen, size + extra, 2)
    lib(logits, targets)
    # The queue is replaced, oldest row in slot 0, wherever the pointer was before.
    assert (lib.queue.ptr, lib.queue.count) == (0, size)
    assert torch.equal(lib.queue.scores, logits[-size:])
    assert torch.equal(lib.queue.targets, targets[-size:])
    assert torch.equal(lib.queue.weights, torch.ones(size, dtype=torch.float64))
    # ... and the next small push overwrites the oldest rows first.
    more, more_targets, _ = random_batch(gen, 2, 2)
    lib(more, more_targets)
    assert lib.queue.ptr == 2
    assert torch.equal(lib.queue.scores[:2], more)
    assert torch.equal(lib.queue.scores[2:], logits[-size + 2 :])


def test_queue_size_zero_disables_the_queue():
    lib, ref = make_pair(2, quantile=0.3, queue_size=0, temperature=0.2)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        logits, targets, _ = random_batch(gen, 20, 2)
        torch.testing.assert_close(lib(logits, targets), ref(logits, targets), **TIGHT)
        assert lib.queue.count == 0
        assert lib.queue.rows()[0].shape == (0, 2)
    other = RecallAtQuantileLoss(2, queue_size=0).double()
    other.load_state_dict(lib.state_dict())


def test_eval_mode_reads_but_does_not_write_the_queue():
    lib, ref = make_pair(2, quantile=0.3, queue_size=32, temperature=0.2)
    gen = torch.Generator().manual_seed(4)
    logits, targets, _ = random_batch(gen, 10, 2)
    lib(logits, targets)
    ref(logits, targets)
    lib.eval()
    ref.eval()
    before = queue_state(lib)
    logits, targets, _ = random_batch(gen, 10, 2)
    loss = lib(logits, targets)
    torch.testing.assert_close(loss, ref(logits, targets), **TIGHT)  # the queue is read
    assert_queue_unchanged(lib, before)
    lib.train()
    lib(logits, targets)
    assert lib.queue.count == 20


def test_update_queue_in_eval_writes_in_eval_mode():
    lib, ref = make_pair(2, quantile=0.3, queue_size=32, update_queue_in_eval=True)
    lib.eval()
    ref.eval()
    gen = torch.Generator().manual_seed(5)
    for _ in range(2):
        logits, targets, _ = random_batch(gen, 10, 2)
        torch.testing.assert_close(lib(logits, targets), ref(logits, targets), **TIGHT)
    assert lib.queue.count == 20
    assert_same_queue(lib, ref)


def test_queue_stores_sample_weights_and_ones_without_them():
    lib = RecallAtQuantileLoss(2, queue_size=8).double()
    logits = torch.randn(3, 2, dtype=torch.float64)
    lib(
        logits,
        torch.tensor([0, 1, 1]),
        sample_weight=torch.tensor([0.5, 0.0, 2.0], dtype=torch.float64),
    )
    lib(logits, torch.tensor([0, 1, 1]))
    assert torch.equal(
        lib.queue.weights[:6], torch.tensor([0.5, 0.0, 2.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    )


def test_queue_rows_are_detached():
    lib = RecallAtQuantileLoss(2, queue_size=8).double()
    logits = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    lib(logits, torch.tensor([0, 1, 1, 0])).backward()
    assert not lib.queue.scores.requires_grad


def test_reset_queue_empties_it():
    lib, ref = make_pair(2, quantile=0.3, queue_size=8)
    gen = torch.Generator().manual_seed(6)
    fill_queue(lib, gen)
    lib.reset_queue()
    assert (lib.queue.ptr, lib.queue.count) == (0, 0)
    logits, targets, _ = random_batch(gen, 10, 2)
    torch.testing.assert_close(lib(logits, targets), ref(logits, targets), **TIGHT)
    assert_same_queue(lib, ref)
