"""One call per step: `update_queue=` decides per call whether the step's rows enter the queue.

The trap it closes: a second call on the same batch (for logging), or a validation pass under
no_grad with the loss still in train mode, used to enqueue the rows again.
"""

from __future__ import annotations

import pytest
import torch
from _support import assert_same_queue, make_pair, queue_state, random_batch

from imbalanced_losses import RecallAtQuantileLoss

pytestmark = pytest.mark.filterwarnings("ignore:.*pool.*:UserWarning")


def test_a_second_call_with_update_queue_false_does_not_enqueue_the_batch_twice():
    lib, ref = make_pair(3, quantile=0.3, queue_size=64, temperature=0.5)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        logits, targets, _ = random_batch(gen, 8, 3)
        ref(logits, targets)  # the oracle sees each batch once
        lib(logits, targets)
        lib(logits, targets, return_per_class=True, update_queue=False)  # logging call
    assert lib.queue.count == 24
    assert_same_queue(lib, ref)


def test_validation_pass_in_train_mode_leaves_the_queue_alone_with_update_queue_false():
    loss_fn = RecallAtQuantileLoss(3, quantile=0.3, queue_size=64).double()
    gen = torch.Generator().manual_seed(1)
    logits, targets, _ = random_batch(gen, 8, 3)
    loss_fn(logits, targets)
    before = queue_state(loss_fn)
    with torch.no_grad():
        for _ in range(3):  # the loss is still in train mode
            logits, targets, _ = random_batch(gen, 8, 3)
            loss_fn(logits, targets, update_queue=False)
    after = queue_state(loss_fn)
    assert after[3:] == before[3:]
    assert all(torch.equal(a, b) for a, b in zip(after[:3], before[:3]))


def test_eval_mode_reads_without_writing_and_update_queue_true_overrides_it():
    loss_fn = RecallAtQuantileLoss(2, quantile=0.3, queue_size=64).double().eval()
    gen = torch.Generator().manual_seed(2)
    logits, targets, _ = random_batch(gen, 6, 2)
    loss_fn(logits, targets)
    assert loss_fn.queue.count == 0
    loss_fn(logits, targets, update_queue=True)
    assert loss_fn.queue.count == 6
    torch.testing.assert_close(loss_fn.queue.rows()[0], logits, rtol=0, atol=0)


@pytest.mark.parametrize("value", [1, "yes", torch.tensor(True)])
def test_update_queue_must_be_none_or_a_bool(value):
    loss_fn = RecallAtQuantileLoss(2, quantile=0.3)
    logits, targets, _ = random_batch(torch.Generator().manual_seed(3), 6, 2, dtype=torch.float32)
    with pytest.raises(ValueError, match="update_queue"):
        loss_fn(logits, targets, update_queue=value)
    assert loss_fn.queue.count == 0
