"""The recall loss's checkpoint from before state versioning still loads and gives the loss it
gave then (the state round trip, versions and refusals of every loss are in
``test_family_contract.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from imbalanced_losses import RecallAtQuantileLoss
from imbalanced_losses.testing.reference import reference_recall_at_quantile_loss

OLD_CHECKPOINT = Path(__file__).parent / "data" / "raq_state_v0_333baaa.pt"


def _old_probe():
    gen = torch.Generator().manual_seed(123)
    logits = torch.randn(6, 3, generator=gen, dtype=torch.float64).float()
    return logits, torch.tensor([0, 1, 2, 0, 1, 2])


def test_a_checkpoint_written_before_versioning_loads_and_gives_the_same_loss():
    # Written by the code at commit 333baaa (no format version, temperature in extra state):
    # RecallAtQuantileLoss(3, quantile=0.3, queue_size=16, temperature=0.25), 10 rows queued.
    state = torch.load(OLD_CHECKPOINT, weights_only=True)
    assert "version" not in state["_extra_state"]
    loss_fn = RecallAtQuantileLoss(3, quantile=0.3, queue_size=16, temperature=0.25)
    loss_fn.load_state_dict(state)
    assert (loss_fn.queue.count, loss_fn.queue.ptr, loss_fn.temperature) == (10, 10, 0.25)
    logits, targets = _old_probe()
    loss = loss_fn.eval()(logits, targets)
    # The loss that code gave on this probe after loading the same checkpoint:
    recorded = json.loads(OLD_CHECKPOINT.with_suffix(".json").read_text())["loss"]
    assert loss.item() == recorded
    # ... and the plain reference fed the checkpoint's queue rows agrees.
    n = 10
    expected, _, _ = reference_recall_at_quantile_loss(
        logits,
        targets,
        num_classes=3,
        quantile=0.3,
        temperature=0.25,
        queue_scores=state["queue.scores"][:n],
        queue_targets=state["queue.targets"][:n],
        queue_weights=state["queue.weights"][:n],
    )
    torch.testing.assert_close(loss, expected.to(loss.dtype), rtol=1e-6, atol=1e-7)
