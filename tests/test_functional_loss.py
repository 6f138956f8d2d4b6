"""The recall loss as one pure function, and the `positives="live"` option, against the plain
reference (a loop over classes with torch.quantile).

`positives="live"` means: the queue only sets the threshold. The reference expresses exactly
that when its queue rows weigh 0 (weights never move the threshold, and a class needs positive
weight to be valid), so it is the oracle for both the function and the module.
"""

from __future__ import annotations

import pytest
import torch
from _support import INTERPOLATIONS, TIGHT, random_batch

from imbalanced_losses import RecallAtQuantileLoss
from imbalanced_losses.functional import recall_at_quantile_loss
from imbalanced_losses.testing.reference import reference_recall_at_quantile_loss

pytestmark = pytest.mark.filterwarnings("ignore:.*pool.*:UserWarning")


def _case(seed: int, num_classes: int):
    gen = torch.Generator().manual_seed(seed)
    logits, targets, weights = random_batch(gen, 12, num_classes, pad_frac=0.2, weighted=True)
    queued, queued_targets, queued_weights = random_batch(gen, 9, num_classes, weighted=True)
    return logits, targets, weights, (queued, queued_targets, queued_weights)


def _reference(logits, targets, weights, extra, *, num_classes, live_only, **kw):
    queue_weights = torch.zeros_like(extra[2]) if live_only else extra[2]
    _, per_class, valid = reference_recall_at_quantile_loss(
        logits,
        targets,
        num_classes=num_classes,
        reduction="none",
        sample_weight=weights,
        queue_scores=extra[0],
        queue_targets=extra[1],
        queue_weights=queue_weights,
        **kw,
    )
    return per_class, valid


@pytest.mark.parametrize("positives", ["pool", "live"])
@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
@pytest.mark.parametrize("num_classes", [1, 4])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pure_function_matches_the_reference(seed, num_classes, interpolation, positives):
    logits, targets, weights, extra = _case(seed, num_classes)
    logits.requires_grad_(True)
    per_class, valid = recall_at_quantile_loss(
        logits,
        targets,
        0.3,
        0.5,
        weights=weights,
        extra=extra,
        interpolation=interpolation,
        positives=positives,
    )
    ref_logits = logits.detach().clone().requires_grad_(True)
    expected, expected_valid = _reference(
        ref_logits,
        targets,
        weights,
        extra,
        num_classes=num_classes,
        live_only=positives == "live",
        quantile=0.3,
        temperature=0.5,
        interpolation=interpolation,
    )
    assert torch.equal(valid, expected_valid)
    assert valid.any()
    torch.testing.assert_close(per_class[valid], expected[valid], **TIGHT)
    (grad,) = torch.autograd.grad(per_class[valid].sum(), logits)
    (ref_grad,) = torch.autograd.grad(expected[expected_valid].sum(), ref_logits)
    torch.testing.assert_close(grad, ref_grad, **TIGHT)


@pytest.mark.parametrize("num_classes", [1, 3])
def test_module_with_live_positives_matches_the_reference_step_by_step(num_classes):
    loss_fn = RecallAtQuantileLoss(
        num_classes, quantile=0.3, queue_size=20, temperature=0.5, positives="live"
    ).double()
    gen = torch.Generator().manual_seed(7)
    for _ in range(4):
        logits, targets, weights = random_batch(gen, 8, num_classes, pad_frac=0.2, weighted=True)
        q_scores, q_targets, q_weights = (t.clone() for t in loss_fn.queue.rows())
        loss, per_class, valid = loss_fn(
            logits, targets, sample_weight=weights, return_per_class=True
        )
        expected, expected_valid = _reference(
            logits,
            targets,
            weights,
            (q_scores, q_targets, q_weights),
            num_classes=num_classes,
            live_only=True,
            quantile=0.3,
            temperature=0.5,
        )
        assert torch.equal(valid, expected_valid)
        torch.testing.assert_close(per_class, expected, equal_nan=True, **TIGHT)
        if valid.any():
            torch.testing.assert_close(loss, expected[valid].mean(), **TIGHT)
    assert loss_fn.queue.count > 0


def test_positives_option_is_validated():
    with pytest.raises(ValueError, match="positives"):
        RecallAtQuantileLoss(2, positives="queue")
