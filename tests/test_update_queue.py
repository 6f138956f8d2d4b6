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


def _whole_state(loss_fn) -> dict:
    """Every saved value, tensors cloned: the queue, its counters, the sample step, temperature."""
    return {
        k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in loss_fn.state_dict().items()
    }


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(v, b[k]) if isinstance(v, torch.Tensor) else v == b[k] for k, v in a.items()
    )


@pytest.mark.parametrize("how", ["eval()", "update_queue=False", "eval() with queue_size=0"])
def test_evaluation_forwards_change_no_state_the_subsampling_step_included(how):
    """How often a run validates must not change its training sample stream (contract §17)."""
    queue_size = 0 if "queue_size=0" in how else 32
    loss_fn = RecallAtQuantileLoss(3, quantile=0.3, queue_size=queue_size, max_pool_size=10)
    gen = torch.Generator().manual_seed(2)
    train = [random_batch(gen, 16, 3, dtype=torch.float32)[:2] for _ in range(3)]
    loss_fn(*train[0])
    assert loss_fn.subsample_step == 1  # a training step draws a sample and moves on
    before = _whole_state(loss_fn)
    evaluated = []
    for _ in range(3):
        batch = random_batch(gen, 16, 3, dtype=torch.float32)[:2]
        if how.startswith("eval()"):
            loss_fn.eval()
            evaluated.append(loss_fn(*batch))
            loss_fn.train()
        else:
            evaluated.append(loss_fn(*batch, update_queue=False))
    assert _same(_whole_state(loss_fn), before), (loss_fn.state_dict(), before)
    # And the training run goes on exactly as one that never validated.
    unvalidated = RecallAtQuantileLoss(3, quantile=0.3, queue_size=queue_size, max_pool_size=10)
    unvalidated(*train[0])
    for batch in train[1:]:
        assert torch.equal(loss_fn(*batch), unvalidated(*batch))
    assert loss_fn.subsample_step == unvalidated.subsample_step == 3
