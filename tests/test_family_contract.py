"""The contract every queued ranking loss keeps, run on every loss of the family (one generic
tester, as torchmetrics runs every metric): matches its plain reference, state round trip and
versions, validation, empty pools, ``update_queue``, dtypes, ``torch.compile``, warnings,
``copy.deepcopy`` and pickle. Adding a loss adds one line to ``LOSS_SPECS``.

Behaviour that belongs to one loss (the recall loss's quantile warnings, its old checkpoint,
Smooth-AP's chunked kernel) is tested in that loss's own module.
"""

from __future__ import annotations

import copy
import inspect
import io
import math
import pickle
import warnings

import pytest
import torch
from _support import (
    TIGHT,
    assert_queue_unchanged,
    assert_same_queue,
    objective,
    queue_state,
    random_batch,
)

import imbalanced_losses
from imbalanced_losses.testing.family import BASE_OPTIONS, LOSS_SPECS, LossSpec

# The recall loss's pool-size and positive-fraction warnings are its own (test_recall_warnings).
pytestmark = pytest.mark.filterwarnings("ignore:.*pool.*:UserWarning")

SPECS = [pytest.param(spec, id=spec.name) for spec in LOSS_SPECS]
ERRORS = ValueError
F64 = torch.float64


def round_trip(state):
    """Through bytes, loaded the way a cautious user loads: ``weights_only=True``."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def run_both(lib, ref, gen, steps, n, num_classes, **batch_options):
    """Feed ``lib`` and its reference the same train-mode batches."""
    for _ in range(steps):
        logits, targets, weights = random_batch(gen, n, num_classes, **batch_options)
        lib(logits, targets, sample_weight=weights)
        ref(logits, targets, sample_weight=weights)


def filled(spec: LossSpec, num_classes=3, **overrides):
    """A float64 loss whose queue holds rows from three steps."""
    loss_fn = spec.make(num_classes, queue_size=16, **overrides).double()
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        logits, targets, _ = random_batch(gen, 8, num_classes)
        loss_fn(logits, targets)
    assert loss_fn.queue.count > 0
    return loss_fn


# ------------------------------------------------------------------ the list itself
def test_every_loss_the_package_exports_is_in_the_family_list():
    """A new loss that is not added to ``LOSS_SPECS`` would silently skip every check here."""
    exported = {
        obj
        for name, obj in vars(imbalanced_losses).items()
        if not name.startswith("_")
        and isinstance(obj, type)
        and issubclass(obj, imbalanced_losses.QueuedRankingLoss)
        and obj is not imbalanced_losses.QueuedRankingLoss
    }
    # The list may hold more than the exports: the docs' own-loss example is checked here too.
    assert exported <= {spec.loss for spec in LOSS_SPECS}


@pytest.mark.parametrize("spec", SPECS)
def test_the_spec_lists_every_option_the_loss_has_beyond_the_base(spec):
    """So each new option gets its bad values refused below (and a reference, or a note)."""
    declared = {option.name for option in spec.loss.options} - {"num_classes"}
    signature = set(inspect.signature(spec.loss).parameters) - {"num_classes", "options"}
    # A loss without an __init__ of its own takes exactly its table's options.
    parameters = signature or declared
    assert parameters - set(BASE_OPTIONS) == set(spec.own_options)
    assert set(BASE_OPTIONS) <= parameters


# ------------------------------------------------------------------ value, gradient, queue
@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("num_classes,reduction", [(1, "mean"), (3, "sum"), (4, "none")])
def test_value_gradient_and_queue_match_the_reference_over_a_history(spec, num_classes, reduction):
    """Padding, weights, an eval step and a queue that wraps: the baseline of every check."""
    lib = spec.make(num_classes, queue_size=11, reduction=reduction).double()
    ref = spec.make_reference(num_classes, queue_size=11, reduction=reduction)
    gen = torch.Generator().manual_seed(num_classes)
    for step, train in enumerate([True, True, False, True, True]):
        lib.train(train)
        ref.train(train)
        logits, targets, weights = random_batch(
            gen, 7, num_classes, pad_frac=0.2, weighted=step % 2 == 0
        )
        x_lib, x_ref = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        got = lib(x_lib, targets, sample_weight=weights, return_per_class=True)
        want = ref(x_ref, targets, sample_weight=weights, return_per_class=True)
        assert torch.equal(got[2], want[2]), f"step {step}: valid classes differ"
        torch.testing.assert_close(got[1], want[1], equal_nan=True, **TIGHT)
        torch.testing.assert_close(got[0], want[0], equal_nan=True, **TIGHT)
        (g_lib,) = torch.autograd.grad(objective(got[0], got[2]), x_lib, allow_unused=True)
        (g_ref,) = torch.autograd.grad(objective(want[0], want[2]), x_ref, allow_unused=True)
        torch.testing.assert_close(g_lib, g_ref, **TIGHT)
        assert_same_queue(lib, ref)
    assert lib.queue.count == 11  # the queue wrapped


# ------------------------------------------------------------------ state_dict and versions
@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("queue_size", [0, 5])
def test_round_trip_preserves_queue_pointer_and_temperature(spec, queue_size):
    original = spec.make(3, queue_size=queue_size, temperature=0.3).double()
    ref = spec.make_reference(3, queue_size=queue_size, temperature=0.3)
    gen = torch.Generator().manual_seed(0)
    run_both(original, ref, gen, 3, 7, 3, weighted=True)
    original.temperature = ref.temperature = 0.07  # annealed by hand
    resumed = spec.make(3, queue_size=queue_size, temperature=0.3).double()
    with pytest.warns(UserWarning, match="temperature=0.07 replaces"):  # constructed with 0.3
        resumed.load_state_dict(round_trip(original.state_dict()))
    assert resumed.temperature == 0.07
    a, b = queue_state(original), queue_state(resumed)
    assert a[3:] == b[3:] and all(torch.equal(x, y) for x, y in zip(a[:3], b[:3]))
    assert_same_queue(resumed, ref)
    for _ in range(3):  # and the run continues on the reference's trajectory
        logits, targets, _ = random_batch(gen, 7, 3)
        torch.testing.assert_close(resumed(logits, targets), ref(logits, targets), **TIGHT)
    assert_same_queue(resumed, ref)


@pytest.mark.parametrize("spec", SPECS)
def test_resumed_and_original_stay_bit_identical_with_a_subsampled_pool(spec):
    kwargs = dict(queue_size=9, temperature=0.3, max_pool_size=12)
    original = spec.make(2, **kwargs)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        logits, targets, _ = random_batch(gen, 7, 2, dtype=torch.float32)
        original(logits, targets)
    resumed = spec.make(2, **kwargs)
    resumed.load_state_dict(round_trip(original.state_dict()))
    assert resumed.subsample_step == original.subsample_step > 0
    for _ in range(4):
        logits, targets, _ = random_batch(gen, 7, 2, dtype=torch.float32)
        assert torch.equal(original(logits, targets), resumed(logits, targets))
    a, b = queue_state(original), queue_state(resumed)
    assert a[3:] == b[3:] and all(torch.equal(x, y) for x, y in zip(a[:3], b[:3]))


@pytest.mark.parametrize("spec", SPECS)
def test_state_dict_holds_only_plain_data(spec):
    state = filled(spec).state_dict()

    def plain(value):
        if isinstance(value, torch.Tensor):
            return True
        if isinstance(value, dict):
            return all(isinstance(k, str) and plain(v) for k, v in value.items())
        if isinstance(value, (list, tuple)):
            return all(plain(v) for v in value)
        return isinstance(value, (int, float, str, bool, type(None)))

    assert all(plain(v) for v in state.values()), state


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize(
    "saved,target",
    [((3, 16), (3, 8)), ((3, 8), (3, 16)), ((3, 8), (4, 8)), ((1, 8), (2, 8))],
    ids=["smaller-queue", "larger-queue", "wider", "binary-to-2-classes"],
)
def test_state_of_another_shape_is_refused(spec, saved, target):
    state = round_trip(spec.make(saved[0], queue_size=saved[1]).state_dict())
    loss_fn = spec.make(target[0], queue_size=target[1])
    with pytest.raises(ValueError, match="queue_size|width"):
        loss_fn.load_state_dict(state)


def _position_state(state):
    """The dict in the state that holds the queue's write pointer."""
    found = [v for v in state.values() if isinstance(v, dict) and "ptr" in v]
    assert len(found) == 1, f"expected one saved dict with the queue pointer, got {state.keys()}"
    return found[0]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize(
    "field,value", [("ptr", 8), ("ptr", 100), ("ptr", -1), ("count", 9), ("count", -1)]
)
def test_pointer_or_count_out_of_range_is_refused(spec, field, value):
    loss_fn = spec.make(3, queue_size=8)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):  # a full queue
        logits, targets, _ = random_batch(gen, 4, 3, dtype=torch.float32)
        loss_fn(logits, targets)
    state = round_trip(loss_fn.state_dict())
    _position_state(state)[field] = value
    with pytest.raises(ValueError, match=field):
        spec.make(3, queue_size=8).load_state_dict(state)


@pytest.mark.parametrize("spec", SPECS)
def test_the_state_carries_a_format_version_and_a_future_one_is_refused_by_number(spec):
    loss_fn = spec.make(2, queue_size=4)
    state = loss_fn.state_dict()
    assert state["_extra_state"]["version"] == 2  # 2: the queue saves iid flags
    state["_extra_state"] = {**state["_extra_state"], "version": 99, "subsample_step": 5}
    with pytest.raises(ValueError, match="version 99"):
        loss_fn.load_state_dict(state)
    assert loss_fn.subsample_step == 0  # nothing applied


@pytest.mark.parametrize("spec", SPECS)
def test_a_state_without_a_version_loads_as_version_0(spec):
    """A checkpoint from before versioning (no ``version`` key) still loads."""
    original = filled(spec, temperature=0.2)
    state = round_trip(original.state_dict())
    state["_extra_state"] = {k: v for k, v in state["_extra_state"].items() if k != "version"}
    resumed = spec.make(3, queue_size=16, temperature=0.2).double()
    resumed.load_state_dict(state)
    assert queue_state(resumed)[3:] == queue_state(original)[3:]


@pytest.mark.parametrize("spec", SPECS)
def test_a_saved_temperature_that_differs_is_applied_with_a_warning(spec):
    saved = spec.make(2, temperature=0.05).state_dict()
    loss_fn = spec.make(2, temperature=0.5)
    with pytest.warns(UserWarning, match=r"temperature=0\.05 replaces .*temperature=0\.5"):
        loss_fn.load_state_dict(saved)
    assert loss_fn.temperature == 0.05
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same temperature loads silently
        spec.make(2, temperature=0.05).load_state_dict(saved)


@pytest.mark.parametrize("spec", SPECS)
def test_strict_false_is_honoured_for_missing_keys(spec):
    loss_fn = spec.make(2, queue_size=4, temperature=0.3)
    result = loss_fn.load_state_dict({}, strict=False)
    assert "_extra_state" in result.missing_keys and "queue.scores" in result.missing_keys
    # An extra state from an older layout that lacks keys keeps the current values.
    state = loss_fn.state_dict()
    state["_extra_state"] = {"subsample_step": 3}
    loss_fn.load_state_dict(state)
    assert (loss_fn.subsample_step, loss_fn.temperature) == (3, 0.3)


# ------------------------------------------------------------------ validation
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

    def weights(bad):
        return torch.tensor([1, 1, bad, 1, 1, 1], dtype=F64)

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
        ("weight-negative", 3, x3, t3, weights(-0.5), "sample_weight"),
        ("weight-nan", 3, x3, t3, weights(math.nan), "sample_weight"),
        ("weight-inf", 3, x3, t3, weights(math.inf), "sample_weight"),
        ("weight-too-long", 3, x3, t3, torch.ones(7, dtype=F64), "sample_weight"),
        ("weight-2d", 3, x3, t3, w[:, None].expand(6, 2), "sample_weight"),
        ("weight-0d", 3, x3, t3, torch.tensor(1.0, dtype=F64), "sample_weight"),
        ("weight-on-meta", 3, x3, t3, meta((6,), F64), "sample_weight"),
    ]
    return [pytest.param(*case[1:], id=case[0]) for case in cases]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("num_classes,logits,targets,sample_weight,name", bad_forward_inputs())
def test_bad_input_raises_naming_the_argument_and_leaves_the_state_unchanged(
    spec, num_classes, logits, targets, sample_weight, name
):
    loss_fn = filled(spec, num_classes)
    before = queue_state(loss_fn)
    state_before = loss_fn.state_dict()
    with pytest.raises(ERRORS, match=name) as info:
        loss_fn(logits, targets, sample_weight=sample_weight)
    message = str(info.value)
    devices = "".join(str(getattr(t, "device", "")) for t in (logits, targets, sample_weight))
    if "meta" in devices:
        # A device error says which devices it saw (not a generic kernel failure).
        assert "meta" in message and "cpu" in message, message
    else:  # ... and any other error what it saw
        assert "got" in message or "saw" in message, message
    assert_queue_unchanged(loss_fn, before)
    after = loss_fn.state_dict()
    assert after.keys() == state_before.keys()
    for key, value in state_before.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(after[key], value), key
        else:
            assert after[key] == value, key


@pytest.mark.parametrize("spec", SPECS)
def test_binary_target_outside_0_1_is_an_error_not_a_warning(spec):
    loss_fn = filled(spec, 1)
    logits, _ = good_batch(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning instead of the error fails differently
        with pytest.raises(ValueError, match="targets"):
            loss_fn(logits, torch.tensor([0, 1, 3, 0, 1, 0]))


@pytest.mark.parametrize("spec", SPECS)
def test_ignore_index_targets_are_not_out_of_range(spec):
    spec.make(3, ignore_index=7).double()(good_batch(3)[0], torch.tensor([0, 7, 2, 7, 1, 0]))
    spec.make(1).double()(torch.randn(4, 1, dtype=F64), torch.tensor([1, -100, 0, -100]))


BAD_BASE_OPTIONS = [
    ("num_classes", 0),
    ("num_classes", -2),
    ("num_classes", 2.5),
    ("num_classes", "3"),
    ("num_classes", None),
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
    ("max_pool_size", 0),
    ("max_pool_size", -5),
    ("max_pool_size", 2.5),
    ("sharded", "yes"),
    ("sharded", None),
]


def bad_options():
    """Every base option's bad values, and each loss's own, for every loss."""
    return [
        pytest.param(spec, name, value, id=f"{spec.name}-{name}={value!r}")
        for spec in LOSS_SPECS
        for name, value in BAD_BASE_OPTIONS
        + [(name, value) for name, values in spec.own_options.items() for value in values]
    ]


@pytest.mark.parametrize("spec,name,value", bad_options())
def test_invalid_constructor_argument_raises_naming_it(spec, name, value):
    kwargs = {**spec.options, "num_classes": 3, name: value}
    with pytest.raises(ERRORS, match=name) as info:
        spec.loss(**kwargs)
    assert repr(value) in str(info.value) or str(value) in str(info.value), str(info.value)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("value", [0.0, -0.5, math.nan, math.inf])
def test_setting_an_invalid_temperature_raises_and_keeps_the_old_one(spec, value):
    loss_fn = spec.make(2, temperature=0.25)
    with pytest.raises(ERRORS, match="temperature"):
        loss_fn.temperature = value
    assert loss_fn.temperature == 0.25


# ------------------------------------------------------------------ empty pools
@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("targets_shape", [(0,), (0, 1)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch_uses_the_queue_and_leaves_it_unchanged(spec, targets_shape, reduction):
    lib = spec.make(3, queue_size=16, reduction=reduction).double()
    ref = spec.make_reference(3, queue_size=16, reduction=reduction)
    run_both(lib, ref, torch.Generator().manual_seed(1), 2, 8, 3)
    before = queue_state(lib)
    logits = torch.empty(0, 3, dtype=F64, requires_grad=True)
    targets = torch.empty(targets_shape, dtype=torch.long)
    loss = lib(logits, targets)
    torch.testing.assert_close(loss, ref(logits, targets), **TIGHT)
    assert torch.isfinite(loss).all()
    assert_queue_unchanged(lib, before)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("num_classes", [1, 3])
@pytest.mark.parametrize("rows", [0, 4])  # an empty batch, or a batch of padding rows only
def test_empty_pool_gives_a_zero_connected_to_the_graph(spec, num_classes, rows):
    targets = torch.full((rows,), -100)
    for reduction in ("mean", "sum", "none"):
        loss_fn = spec.make(num_classes, reduction=reduction, queue_size=8).double()
        logits = torch.randn(rows, num_classes, dtype=F64, requires_grad=True)
        loss, per_class, valid = loss_fn(logits, targets, return_per_class=True)
        assert loss.requires_grad, "the result must stay connected to the graph"
        if reduction == "none":
            assert loss.shape == (num_classes,) and torch.isnan(loss).all()
        else:
            assert loss.shape == () and loss.item() == 0.0
        assert torch.isnan(per_class).all() and not valid.any() and valid.shape == (num_classes,)
        (grad,) = torch.autograd.grad(loss.nan_to_num().sum(), logits, allow_unused=True)
        assert grad is not None and torch.equal(grad, torch.zeros_like(logits))
        assert loss_fn.queue.count == 0


@pytest.mark.parametrize("spec", SPECS)
def test_a_pool_without_any_positive_gives_a_zero_connected_to_the_graph(spec):
    logits = torch.randn(5, 1, dtype=F64, requires_grad=True)
    loss = spec.make(1, queue_size=0).double()(logits, torch.zeros(5, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros(5, 1, dtype=F64))


# ------------------------------------------------------------------ update_queue
@pytest.mark.parametrize("spec", SPECS)
def test_a_second_call_with_update_queue_false_does_not_enqueue_the_batch_twice(spec):
    lib = spec.make(3, queue_size=64).double()
    ref = spec.make_reference(3, queue_size=64)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        logits, targets, _ = random_batch(gen, 8, 3)
        want = ref(logits, targets)  # the reference sees each batch once
        got = lib(logits, targets)
        lib(logits, targets, return_per_class=True, update_queue=False)  # a logging call
        torch.testing.assert_close(got, want, **TIGHT)
    assert lib.queue.count == 24
    assert_same_queue(lib, ref)


@pytest.mark.parametrize("spec", SPECS)
def test_validation_passes_leave_the_whole_state_alone_the_sample_stream_included(spec):
    """How often one validates must not change the training run (queue nor subsample draws)."""
    loss_fn = spec.make(3, queue_size=64, max_pool_size=5).double()
    gen = torch.Generator().manual_seed(1)
    loss_fn(*random_batch(gen, 8, 3)[:2])
    before, step = queue_state(loss_fn), loss_fn.subsample_step
    assert step == 1  # a training step draws a sample and moves the stream on
    with torch.no_grad():
        for _ in range(3):  # a validation pass with the loss still in train mode
            loss_fn(*random_batch(gen, 8, 3)[:2], update_queue=False)
        loss_fn.eval()
        loss_fn(*random_batch(gen, 8, 3)[:2])  # and one in eval mode
    assert_queue_unchanged(loss_fn, before)
    assert loss_fn.subsample_step == step


@pytest.mark.parametrize("spec", SPECS)
def test_eval_mode_reads_without_writing_and_update_queue_true_overrides_it(spec):
    loss_fn = spec.make(2, queue_size=64).double().eval()
    logits, targets, _ = random_batch(torch.Generator().manual_seed(2), 6, 2)
    loss_fn(logits, targets)
    assert loss_fn.queue.count == 0
    loss_fn(logits, targets, update_queue=True)
    assert loss_fn.queue.count == 6
    assert torch.equal(loss_fn.queue.rows()[0], logits)
    in_eval = spec.make(2, queue_size=64, update_queue_in_eval=True).double().eval()
    in_eval(logits, targets)
    assert in_eval.queue.count == 6
    in_eval(logits, targets, update_queue=False)
    assert in_eval.queue.count == 6


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("value", [1, "yes", torch.tensor(True)])
def test_update_queue_must_be_none_or_a_bool(spec, value):
    loss_fn = spec.make(2)
    logits, targets, _ = random_batch(torch.Generator().manual_seed(3), 6, 2, dtype=torch.float32)
    with pytest.raises(ValueError, match="update_queue"):
        loss_fn(logits, targets, update_queue=value)
    assert loss_fn.queue.count == 0


# ------------------------------------------------------------------ dtypes
@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("num_classes", [1, 4])
def test_low_precision_logits_give_the_float64_answer_to_float32_accuracy(spec, dtype, num_classes):
    """A float32 module computes in float32 or better whatever the logits' dtype: the answer is
    the float64 reference's on the same (upcast) values, to float32 accuracy. With
    ``temperature=0.25`` a half-precision computation would be off by far more (its sigmoid
    alone is good to about 1e-3); the gradient itself is returned in the logits' dtype."""
    lib = spec.make(num_classes, queue_size=64, temperature=0.25)
    ref = spec.make_reference(num_classes, queue_size=64, temperature=0.25)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        logits, targets, weights = random_batch(gen, 40, num_classes, dtype=dtype, weighted=True)
        x = logits.clone().requires_grad_()
        loss = lib(x, targets, sample_weight=weights)
        assert loss.dtype == torch.float32, loss.dtype
        wide = logits.double().requires_grad_()
        expected = ref(wide, targets, sample_weight=weights)
        torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
        (grad,) = torch.autograd.grad(loss, x)
        (want,) = torch.autograd.grad(expected, wide)
        assert grad.dtype == dtype and torch.isfinite(grad).all()
        scale = want.abs().max().item()
        torch.testing.assert_close(grad.double(), want, rtol=1e-2, atol=1e-2 * scale + 1e-7)
    assert lib.queue.scores.dtype == torch.float32
    assert_same_queue(lib, ref)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("logits_dtype", [torch.float32, torch.float64])
def test_a_float64_module_gives_the_float64_answer(spec, logits_dtype):
    lib = spec.make(3, queue_size=32, temperature=0.05).double()
    ref = spec.make_reference(3, queue_size=32, temperature=0.05)
    gen = torch.Generator().manual_seed(4)
    for _ in range(3):
        logits, targets, _ = random_batch(gen, 20, 3, dtype=logits_dtype)
        loss = lib(logits, targets)
        assert loss.dtype == torch.float64
        torch.testing.assert_close(loss, ref(logits, targets), **TIGHT)
    assert lib.queue.scores.dtype == lib.queue.weights.dtype == torch.float64
    assert_same_queue(lib, ref)


# ------------------------------------------------------------------ torch.compile
def _train(spec: LossSpec, compile_model: bool, compile_loss: bool):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    loss_fn = spec.make(3, queue_size=32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    # "aot_eager": the traced forward and backward graphs, without Inductor's slow C++ build.
    run_model = torch.compile(model, backend="aot_eager") if compile_model else model
    run_loss = torch.compile(loss_fn) if compile_loss else loss_fn
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(4):
        x, y = torch.randn(16, 5, generator=gen), torch.randint(0, 3, (16,), generator=gen)
        optimizer.zero_grad()
        loss = run_loss(run_model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    params = [p.detach().clone() for p in model.parameters()]
    return torch.stack(losses), params, loss_fn.queue.scores.clone(), loss_fn.queue.count


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize(
    "compile_model,compile_loss", [(True, False), (False, True)], ids=["model", "loss"]
)
def test_compiled_run_equals_the_eager_run(spec, compile_model, compile_loss):
    """The loss's forward runs eagerly (a graph break), so compiling never changes a number."""
    torch._dynamo.reset()
    try:
        eager = _train(spec, False, False)
        compiled = _train(spec, compile_model, compile_loss)
    finally:
        torch._dynamo.reset()
    assert compiled[3] == eager[3] == 32  # the queue filled up over the steps
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-6)
    for got, want in zip(compiled[1], eager[1]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled[2], eager[2], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ warnings
def _step(loss_fn, n=4):
    return loss_fn(torch.randn(n, 2), torch.tensor([0, 1] * (n // 2)))


@pytest.mark.parametrize("spec", SPECS)
def test_world_size_without_a_process_group_warns_once_and_reset_queue_rearms_it(spec, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    loss_fn = spec.make(2)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(3):
            _step(loss_fn)
        alone = [w for w in record if "WORLD_SIZE=2" in str(w.message)]
        assert len(alone) == 1, [str(w.message) for w in record]
        assert "not initialised" in str(alone[0].message)
        assert "ACCELERATE_USE_CPU=1" in str(alone[0].message)
        assert alone[0].filename == __file__
        loss_fn.reset_queue()  # re-arms it
        _step(loss_fn)
    assert len([w for w in record if "WORLD_SIZE=2" in str(w.message)]) == 2


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("world_size", [None, "1", "not-a-number"])
def test_no_warning_for_a_single_process(spec, world_size, monkeypatch):
    if world_size is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world_size)
    loss_fn = spec.make(2, queue_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            _step(loss_fn, n=40)  # 40 * 0.3 rows above the recall loss's threshold: enough


@pytest.mark.parametrize("spec", SPECS)
def test_max_pool_size_subsampling_warns_once_per_instance_and_reset_queue_rearms_it(spec):
    """As the reference: one warning per instance when ``max_pool_size`` subsamples."""
    loss_fn = spec.make(2, queue_size=6, max_pool_size=8)
    name = type(loss_fn).__name__
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")

        def subsampled():
            return [str(w.message) for w in record if "max_pool_size" in str(w.message)]

        _step(loss_fn, n=6)  # a pool of 6 rows: no sample, no warning
        assert subsampled() == []
        for _ in range(3):  # pools of 12 rows: sampled every step, one warning
            _step(loss_fn, n=6)
        assert subsampled() == [
            f"{name}: pool size 12 exceeds max_pool_size=8; the loss now estimates "
            "over a uniform sample of 8 pooled rows, redrawn at each training step, so it is "
            "a stochastic approximation. (This warning is shown once per instance; "
            "reset_queue() re-arms it.)"
        ]
        spec.make(2, queue_size=6, max_pool_size=8)(torch.randn(10, 2), torch.tensor([0, 1] * 5))
        assert len(subsampled()) == 2  # another instance warns too
        loss_fn.reset_queue()
        _step(loss_fn, n=10)
        assert len(subsampled()) == 3
    assert all(w.filename == __file__ for w in record), [w.filename for w in record]


# ------------------------------------------------------------------ copies
def _copies():
    return [
        pytest.param(copy.deepcopy, id="deepcopy"),
        pytest.param(lambda m: pickle.loads(pickle.dumps(m)), id="pickle"),
    ]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("copier", _copies())
def test_a_copy_holds_the_same_state_runs_the_same_and_shares_nothing(spec, copier):
    original = spec.make(3, queue_size=10, max_pool_size=9, temperature=0.3).double()
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        logits, targets, _ = random_batch(gen, 7, 3)
        original(logits, targets)
    original.temperature = 0.2
    twin = copier(original)
    assert type(twin) is type(original) and twin.temperature == 0.2
    assert repr(twin) == repr(original)
    assert twin.subsample_step == original.subsample_step
    a, b = queue_state(original), queue_state(twin)
    assert a[3:] == b[3:] and all(torch.equal(x, y) for x, y in zip(a[:3], b[:3]))
    assert twin.queue.scores.data_ptr() != original.queue.scores.data_ptr()
    for _ in range(3):  # both run on: the same numbers, each in its own queue
        logits, targets, _ = random_batch(gen, 7, 3)
        assert torch.equal(original(logits, targets), twin(logits, targets))
    assert queue_state(twin)[3:] == queue_state(original)[3:]
    twin(*random_batch(gen, 4, 3)[:2])
    assert queue_state(twin)[3:] != queue_state(original)[3:]
