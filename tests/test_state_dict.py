"""Contract §4: everything needed to resume is in state_dict(), loads under
torch.load(weights_only=True), and a state that does not fit is refused with a clear error."""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import pytest
import torch
from _support import TIGHT, assert_same_queue, fill_queue, make_pair, queue_state, random_batch

from imbalanced_losses import RecallAtQuantileLoss
from imbalanced_losses.testing.reference import reference_recall_at_quantile_loss

pytestmark = pytest.mark.filterwarnings("ignore:.*pool.*:UserWarning")


def round_trip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("queue_size", [0, 5, 64])
def test_round_trip_preserves_queue_pointer_and_temperature(queue_size):
    kwargs = dict(quantile=0.2, queue_size=queue_size, temperature=0.3)
    original, ref = make_pair(3, **kwargs)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        logits, targets, weights = random_batch(gen, 7, 3, weighted=True)
        original(logits, targets, sample_weight=weights)
        ref(logits, targets, sample_weight=weights)
    original.temperature = 0.07  # annealed by hand
    ref.temperature = 0.07
    resumed = RecallAtQuantileLoss(3, **kwargs).double()
    with pytest.warns(UserWarning, match="temperature=0.07 replaces"):  # constructed with 0.3
        resumed.load_state_dict(round_trip(original.state_dict()))
    assert resumed.temperature == 0.07
    a, b = queue_state(original), queue_state(resumed)
    assert a[3:] == b[3:]
    assert all(torch.equal(x, y) for x, y in zip(a[:3], b[:3]))
    assert_same_queue(resumed, ref)
    for _ in range(3):  # and the runs continue identically
        logits, targets, _ = random_batch(gen, 7, 3)
        expected = ref(logits, targets)
        torch.testing.assert_close(resumed(logits, targets), expected, **TIGHT)
    assert_same_queue(resumed, ref)


def test_resumed_and_original_stay_bit_identical():
    kwargs = dict(quantile=0.2, queue_size=9, temperature=0.3, max_pool_size=12)
    original = RecallAtQuantileLoss(2, **kwargs)
    gen = torch.Generator().manual_seed(1)
    fill_queue(original, gen, steps=4, n=7)
    resumed = RecallAtQuantileLoss(2, **kwargs)
    resumed.load_state_dict(round_trip(original.state_dict()))
    for _ in range(4):
        logits, targets, _ = random_batch(gen, 7, 2, dtype=torch.float32)
        assert torch.equal(original(logits, targets), resumed(logits, targets))
    a, b = queue_state(original), queue_state(resumed)
    assert a[3:] == b[3:] and all(torch.equal(x, y) for x, y in zip(a[:3], b[:3]))


def test_state_dict_holds_only_plain_data():
    loss_fn = RecallAtQuantileLoss(2, queue_size=4)
    fill_queue(loss_fn, torch.Generator().manual_seed(2))
    state = loss_fn.state_dict()

    def plain(value):
        if isinstance(value, torch.Tensor):
            return True
        if isinstance(value, dict):
            return all(isinstance(k, str) and plain(v) for k, v in value.items())
        if isinstance(value, (list, tuple)):
            return all(plain(v) for v in value)
        return isinstance(value, (int, float, str, bool, type(None)))

    assert all(plain(v) for v in state.values()), state


@pytest.mark.parametrize(
    "saved_kwargs,target_kwargs",
    [
        (dict(num_classes=3, queue_size=16), dict(num_classes=3, queue_size=8)),
        (dict(num_classes=3, queue_size=8), dict(num_classes=3, queue_size=16)),
        (dict(num_classes=3, queue_size=8), dict(num_classes=4, queue_size=8)),
        (dict(num_classes=1, queue_size=8), dict(num_classes=2, queue_size=8)),
    ],
    ids=["smaller-queue", "larger-queue", "wider", "binary-to-2-classes"],
)
def test_state_of_another_shape_is_refused(saved_kwargs, target_kwargs):
    saved = RecallAtQuantileLoss(**saved_kwargs)
    target = RecallAtQuantileLoss(**target_kwargs)
    with pytest.raises((ValueError, RuntimeError), match="queue|size|shape|width"):
        target.load_state_dict(round_trip(saved.state_dict()))


def _position_state(state):
    """The dict in the state that holds the queue's write pointer."""
    found = [v for v in state.values() if isinstance(v, dict) and "ptr" in v]
    assert len(found) == 1, f"expected one saved dict with the queue pointer, got {state.keys()}"
    return found[0]


@pytest.mark.parametrize(
    "field,value", [("ptr", 8), ("ptr", 100), ("ptr", -1), ("count", 9), ("count", -1)]
)
def test_pointer_or_count_out_of_range_is_refused(field, value):
    loss_fn = RecallAtQuantileLoss(3, queue_size=8)
    fill_queue(loss_fn, torch.Generator().manual_seed(3), steps=3, n=4)  # full queue
    state = round_trip(loss_fn.state_dict())
    _position_state(state)[field] = value
    fresh = RecallAtQuantileLoss(3, queue_size=8)
    with pytest.raises((ValueError, RuntimeError), match=field):
        fresh.load_state_dict(state)


# ------------------------------------------------------------------ versions and old layouts
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


def test_the_state_carries_a_format_version_and_a_future_one_is_refused_by_number():
    loss_fn = RecallAtQuantileLoss(2, queue_size=4)
    state = loss_fn.state_dict()
    assert state["_extra_state"]["version"] == 2
    state["_extra_state"] = {**state["_extra_state"], "version": 99, "subsample_step": 5}
    with pytest.raises(ValueError, match="version 99"):
        loss_fn.load_state_dict(state)
    assert loss_fn.subsample_step == 0  # nothing applied


def test_a_saved_temperature_that_differs_is_applied_with_a_warning():
    saved = RecallAtQuantileLoss(2, temperature=0.05).state_dict()
    loss_fn = RecallAtQuantileLoss(2, temperature=0.5)
    with pytest.warns(UserWarning, match=r"temperature=0\.05 replaces .*temperature=0\.5"):
        loss_fn.load_state_dict(saved)
    assert loss_fn.temperature == 0.05
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same temperature loads silently
        RecallAtQuantileLoss(2, temperature=0.05).load_state_dict(saved)


def test_strict_false_is_honoured_for_missing_keys():
    loss_fn = RecallAtQuantileLoss(2, queue_size=4, temperature=0.3)
    result = loss_fn.load_state_dict({}, strict=False)
    assert "_extra_state" in result.missing_keys and "queue.scores" in result.missing_keys
    # An extra state from an older layout that lacks keys keeps the current values.
    state = loss_fn.state_dict()
    state["_extra_state"] = {"subsample_step": 3}
    loss_fn.load_state_dict(state)
    assert (loss_fn.subsample_step, loss_fn.temperature) == (3, 0.3)
