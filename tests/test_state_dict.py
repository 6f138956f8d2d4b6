"""The recall loss's checkpoints of older state formats still load and give the loss they gave
then; the queue saves each row's iid flag (the state round trip, versions and refusals of
every loss are in ``test_family_contract.py``)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from imbalanced_losses import RecallAtQuantileLoss
from imbalanced_losses.testing.reference import reference_recall_at_quantile_loss


def round_trip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


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


V1_CHECKPOINT = Path(__file__).parent / "data" / "raq_state_v1_64835a4.pt"


def test_a_version_1_checkpoint_without_iid_flags_loads_as_all_iid_and_gives_the_same_loss():
    # Written by tests/data/make_raq_state_v1.py with the code at commit 64835a4, whose
    # queue stored no iid flags: its rows were all iid (there was no iid_mask).
    state = torch.load(V1_CHECKPOINT, weights_only=True)
    assert state["_extra_state"]["version"] == 1 and "queue.iid" not in state
    recorded = json.loads(V1_CHECKPOINT.with_suffix(".json").read_text())
    loss_fn = RecallAtQuantileLoss(
        3, quantile=0.3, queue_size=16, temperature=0.25, max_pool_size=12
    )
    loss_fn.queue.iid.fill_(False)  # so that loading must set them
    loss_fn.load_state_dict(state)  # strict: the missing queue.iid is not an error
    assert loss_fn.queue.iid.all()
    assert loss_fn.subsample_step == recorded["subsample_step"]
    logits, targets = _old_probe()
    loss = loss_fn.eval()(logits, targets)
    assert loss.item() == pytest.approx(recorded["loss"], rel=1e-6)


def test_the_queue_saves_each_rows_iid_flag_and_a_round_trip_keeps_it():
    loss_fn = RecallAtQuantileLoss(2, queue_size=6)
    iid = torch.tensor([True, False, True, False, False])
    loss_fn(torch.randn(5, 2), torch.tensor([0, 1, 0, 1, -100]), iid)
    state = round_trip(loss_fn.state_dict())
    assert state["queue.iid"][:4].tolist() == [True, False, True, False]  # padding not queued
    resumed = RecallAtQuantileLoss(2, queue_size=6)
    resumed.load_state_dict(state)
    assert resumed.queue.iid_rows().tolist() == [True, False, True, False]
