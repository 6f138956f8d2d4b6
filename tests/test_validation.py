"""Contract §6: bad input raises a clear error naming the argument, before any state changes;
empty and all-padding batches are not errors; a too-small pool warns once."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from _support import TIGHT, assert_queue_unchanged, fill_queue, make_pair, queue_state

from imbalanced_losses import RecallAtQuantileLoss

ERRORS = (ValueError, TypeError)
F64 = torch.float64


def filled_loss(num_classes=3, **kwargs):
    loss_fn = RecallAtQuantileLoss(num_classes, queue_size=16, quantile=0.25, **kwargs).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fill_queue(loss_fn, torch.Generator().manual_seed(0))
    return loss_fn


def good_batch(num_classes=3, n=6):
    logits = torch.randn(n, num_classes, dtype=F64, requires_grad=True)
    targets = torch.arange(n) % 2 if num_classes == 1 else torch.arange(n) % num_classes
    return logits, targets


def meta(shape, dtype):
    return torch.empty(shape, dtype=dtype, device="meta")


def bad_forward_inputs():
    """(id, num_classes, logits, targets, sample_weight, argument-name regex)."""
    x3, t3 = good_batch(3)
    x1, t1 = good_batch(1)
    w = torch.ones(6, dtype=F64)
    cases = [
        ("logits-1d", 3, x3[:, 0], t3, None, "logits"),
        ("logits-3d", 3, x3[None], t3, None, "logits"),
        ("logits-0d", 3, x3[0, 0], t3, None, "logits"),
        ("C-mismatch", 3, torch.randn(6, 4, dtype=F64), t3, None, "logits|num_classes"),
        ("binary-C-mismatch", 1, x3, t1, None, "logits|num_classes"),
        ("logits-int", 3, torch.zeros(6, 3, dtype=torch.long), t3, None, "logits"),
        ("logits-not-tensor", 3, x3.tolist(), t3, None, "logits"),
        ("targets-float", 3, x3, t3.double(), None, "targets"),
        ("targets-float-binary", 1, x1, t1.float(), None, "targets"),
        ("targets-2-columns", 3, x3, t3[:, None].expand(6, 2), None, "targets"),
        ("targets-too-long", 3, x3, torch.arange(7) % 3, None, "targets"),
        ("targets-too-short", 3, x3, t3[:5], None, "targets"),
        ("targets-0d", 3, x3, t3[0], None, "targets"),
        ("targets-equal-C", 3, x3, torch.tensor([0, 1, 2, 3, 0, 1]), None, "targets"),
        ("targets-negative", 3, x3, torch.tensor([0, 1, 2, -1, 0, 1]), None, "targets"),
        ("binary-target-2", 1, x1, torch.tensor([0, 1, 2, 0, 1, 0]), None, "targets"),
        ("binary-target-neg", 1, x1, torch.tensor([0, 1, -1, 0, 1, 0]), None, "targets"),
        ("targets-on-meta", 3, x3, meta((6,), torch.long), None, "targets"),
        ("logits-on-meta", 3, meta((6, 3), F64), t3, None, "logits|targets"),
        (
            "weight-negative",
            3,
            x3,
            t3,
            torch.tensor([1, 1, -0.5, 1, 1, 1], dtype=F64),
            "sample_weight",
        ),
        (
            "weight-nan",
            3,
            x3,
            t3,
            torch.tensor([1, 1, math.nan, 1, 1, 1], dtype=F64),
            "sample_weight",
        ),
        (
            "weight-inf",
            3,
            x3,
            t3,
            torch.tensor([1, 1, math.inf, 1, 1, 1], dtype=F64),
            "sample_weight",
        ),
        ("weight-too-long", 3, x3, t3, torch.ones(7, dtype=F64), "sample_weight"),
        ("weight-2d", 3, x3, t3, w[:, None].expand(6, 2), "sample_weight"),
        ("weight-0d", 3, x3, t3, torch.tensor(1.0, dtype=F64), "sample_weight"),
        ("weight-on-meta", 3, x3, t3, meta((6,), F64), "sample_weight"),
    ]
    return [pytest.param(*case[1:], id=case[0]) for case in cases]


@pytest.mark.parametrize("num_classes,logits,targets,sample_weight,name", bad_forward_inputs())
def test_bad_input_raises_naming_the_argument_and_leaves_queue_unchanged(
    num_classes, logits, targets, sample_weight, name
):
    loss_fn = filled_loss(num_classes)
    before = queue_state(loss_fn)
    step_before = loss_fn.state_dict()
    with pytest.raises(ERRORS, match=name) as info:
        loss_fn(logits, targets, sample_weight=sample_weight)
    message = str(info.value)
    if "meta" in str(getattr(logits, "device", "")) + str(getattr(targets, "device", "")) + str(
        getattr(sample_weight, "device", "")
    ):
        # A device error must say which devices it saw (not a generic kernel failure).
        assert "meta" in message and "cpu" in message, message
    assert_queue_unchanged(loss_fn, before)
    after = loss_fn.state_dict()
    assert after.keys() == step_before.keys()
    for key, value in step_before.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(after[key], value), key
        else:
            assert after[key] == value, key


def test_binary_target_outside_0_1_is_an_error_not_a_warning():
    loss_fn = filled_loss(1)
    logits, _ = good_batch(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning instead of the error fails differently
        with pytest.raises(ValueError, match="targets"):
            loss_fn(logits, torch.tensor([0, 1, 3, 0, 1, 0]))


@pytest.mark.filterwarnings("ignore:.*pool.*:UserWarning")
def test_ignore_index_targets_are_not_out_of_range():
    loss_fn = RecallAtQuantileLoss(3, ignore_index=7, quantile=0.25).double()
    logits, _ = good_batch(3)
    loss_fn(logits, torch.tensor([0, 7, 2, 7, 1, 0]))
    binary = RecallAtQuantileLoss(1, quantile=0.25).double()
    binary(torch.randn(4, 1, dtype=F64), torch.tensor([1, -100, 0, -100]))


BAD_CONSTRUCTOR_ARGS = [
    ("num_classes", 0),
    ("num_classes", -2),
    ("num_classes", 2.5),
    ("num_classes", "3"),
    ("num_classes", None),
    ("quantile", 0.0),
    ("quantile", 1.0),
    ("quantile", -0.1),
    ("quantile", 1.5),
    ("quantile", math.nan),
    ("quantile", "0.1"),
    ("queue_size", -1),
    ("queue_size", 2.5),
    ("queue_size", None),
    ("temperature", 0.0),
    ("temperature", -1.0),
    ("temperature", math.nan),
    ("temperature", math.inf),
    ("temperature", "0.1"),
    ("reduction", "avg"),
    ("reduction", None),
    ("ignore_index", 1.5),
    ("ignore_index", "pad"),
    ("update_queue_in_eval", "yes"),
    ("gather_distributed", "auto"),
    ("quantile_interpolation", "cubic"),
    ("quantile_interpolation", None),
    ("max_pool_size", 0),
    ("max_pool_size", -5),
    ("max_pool_size", 2.5),
]


@pytest.mark.parametrize("name,value", BAD_CONSTRUCTOR_ARGS)
def test_invalid_constructor_argument_raises_naming_it(name, value):
    kwargs = {"num_classes": 3, name: value}
    with pytest.raises(ERRORS, match=name):
        RecallAtQuantileLoss(**kwargs)


@pytest.mark.parametrize("value", [0.0, -0.5, math.nan, math.inf])
def test_setting_an_invalid_temperature_raises(value):
    loss_fn = RecallAtQuantileLoss(2)
    with pytest.raises(ERRORS, match="temperature"):
        loss_fn.temperature = value
    assert loss_fn.temperature == 0.01


@pytest.mark.parametrize("targets_shape", [(0,), (0, 1)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch_uses_the_queue_and_leaves_it_unchanged(targets_shape, reduction):
    lib, ref = make_pair(3, quantile=0.25, queue_size=16, reduction=reduction, temperature=0.5)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        logits, targets = torch.randn(8, 3, dtype=F64, generator=gen), torch.arange(8) % 3
        lib(logits, targets)
        ref(logits, targets)
    before = queue_state(lib)
    logits = torch.empty(0, 3, dtype=F64, requires_grad=True)
    targets = torch.empty(targets_shape, dtype=torch.long)
    loss = lib(logits, targets)
    torch.testing.assert_close(loss, ref(logits, targets), **TIGHT)
    assert torch.isfinite(loss).all()
    assert_queue_unchanged(lib, before)


@pytest.mark.parametrize("num_classes", [1, 3])
@pytest.mark.parametrize("all_ignored", [False, True])
def test_empty_pool_gives_zero_connected_to_the_graph(num_classes, all_ignored):
    n = 4 if all_ignored else 0
    targets = torch.full((n,), -100)
    for reduction in ("mean", "sum"):
        loss_fn = RecallAtQuantileLoss(num_classes, reduction=reduction, queue_size=8).double()
        logits = torch.randn(n, num_classes, dtype=F64, requires_grad=True)
        loss = loss_fn(logits, targets)
        assert loss.shape == () and loss.item() == 0.0
        assert loss.requires_grad, "the zero must stay connected to the graph"
        loss.backward()
        assert torch.equal(logits.grad, torch.zeros_like(logits))
        assert loss_fn.queue.count == 0
    loss_fn = RecallAtQuantileLoss(num_classes, reduction="none", queue_size=8).double()
    logits = torch.randn(n, num_classes, dtype=F64, requires_grad=True)
    loss = loss_fn(logits, targets)
    assert loss.shape == (num_classes,) and torch.isnan(loss).all()
    loss, per_class, valid = loss_fn(logits, targets, return_per_class=True)
    assert torch.isnan(per_class).all() and not valid.any() and valid.shape == (num_classes,)
    mean_fn = RecallAtQuantileLoss(num_classes, queue_size=8).double()
    loss, per_class, valid = mean_fn(logits, targets, return_per_class=True)
    assert loss.item() == 0.0 and torch.isnan(per_class).all() and not valid.any()


def _pool_warnings(record):
    return [
        w
        for w in record
        if "pool" in str(w.message).lower() or "quantile" in str(w.message).lower()
    ]


def test_small_pool_warns_once():
    loss_fn = RecallAtQuantileLoss(2, quantile=0.01, queue_size=16).double()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("default")
        for _ in range(3):  # pool = 10, 16, 16 rows; 16 * 0.01 < 1
            loss_fn(torch.randn(10, 2, dtype=F64), torch.arange(10) % 2)
    assert len(_pool_warnings(record)) == 1, [str(w.message) for w in record]


def test_large_enough_pool_does_not_warn():
    loss_fn = RecallAtQuantileLoss(2, quantile=0.1, queue_size=16).double()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(3):  # pool * q >= 1 from the first step
            loss_fn(torch.randn(10, 2, dtype=F64), torch.arange(10) % 2)
    assert not _pool_warnings(record), [str(w.message) for w in record]
