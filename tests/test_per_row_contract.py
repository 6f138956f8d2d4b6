"""The contract every per-row loss keeps (the focal losses: no queue, no ``num_classes``), run
on every entry of ``PER_ROW_LOSS_SPECS``: the plain reference's values and gradients, low
precision with counts beyond float16's range, validation naming the argument, empty batches,
``copy.deepcopy`` and pickle. Copies with a ``process_group`` need ranks:
``ddp_tests/test_focal_ddp.py`` runs them over the same list.
"""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from torch import nn

import imbalanced_losses
from imbalanced_losses.testing.family import PER_ROW_LOSS_SPECS, PerRowLossSpec

SPECS = [pytest.param(spec, id=spec.name) for spec in PER_ROW_LOSS_SPECS]
F64 = torch.float64


def _batch(spec: PerRowLossSpec, n: int, dtype=F64, *, weighted=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x, t = spec.batch(gen, n, dtype)
    w = torch.rand(spec.weight_shape(t), generator=gen, dtype=F64).to(dtype) if weighted else None
    return x, t, w


def _reference(spec: PerRowLossSpec, x, t, w, reduction):
    return spec.reference(x, t, w, **spec.options, reduction=reduction)


def test_every_per_row_loss_the_package_exports_is_listed():
    """A new per-row loss missing from ``PER_ROW_LOSS_SPECS`` would skip every check here."""
    not_per_row = (imbalanced_losses.QueuedRankingLoss, imbalanced_losses.LossWarmupWrapper)
    exported = {
        obj
        for name, obj in vars(imbalanced_losses).items()
        if not name.startswith("_")
        and isinstance(obj, type)
        and issubclass(obj, nn.Module)
        and not issubclass(obj, not_per_row)
        and obj is not imbalanced_losses.MemoryQueue
    }
    assert exported == {spec.loss for spec in PER_ROW_LOSS_SPECS}


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "weighted"])
@pytest.mark.parametrize("spec", SPECS)
def test_value_and_gradient_match_the_plain_reference_in_float64(spec, weighted):
    for reduction in spec.reductions:
        x, t, w = _batch(spec, 13, weighted=weighted)
        x.requires_grad_(True)
        got = spec.make(reduction=reduction)(x, t, sample_weight=w)
        x_ref = x.detach().clone().requires_grad_(True)
        want = _reference(spec, x_ref, t, w, reduction)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        (got.sum() * 1.7).backward()
        (want.sum() * 1.7).backward()
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("spec", SPECS)
def test_low_precision_beyond_65504_rows_gives_the_float64_answer_to_its_precision(spec, dtype):
    """Counts and sums run in at least float32; the result comes back in the input dtype."""
    x, t, w = _batch(spec, 70_000, dtype)
    tolerance = {torch.float16: 5e-3, torch.bfloat16: 2e-2, torch.float32: 1e-5}[dtype]
    for reduction in spec.reductions:
        if reduction == "none":
            continue
        got = spec.make(reduction=reduction)(x, t)
        # The reference sees the same (rounded) values, so only the loss's arithmetic differs.
        want = _reference(
            spec, x.double(), t.double() if t.is_floating_point() else t, w, reduction
        )
        assert got.dtype == dtype, reduction
        if want.abs() > torch.finfo(dtype).max:  # a sum beyond the dtype's range: inf, as torch
            assert got.isinf(), (reduction, got)
            continue
        torch.testing.assert_close(got.double(), want, rtol=tolerance, atol=0, msg=reduction)


@pytest.mark.parametrize("spec", SPECS)
def test_float64_inputs_give_a_float64_loss(spec):
    x, t, _ = _batch(spec, 5)
    assert spec.make()(x, t).dtype == F64


@pytest.mark.parametrize("spec", SPECS)
def test_an_invalid_constructor_argument_raises_naming_it(spec):
    for name, values in spec.bad_options.items():
        for value in values:
            with pytest.raises(ValueError, match=name.split("_")[0]) as caught:
                spec.make(**{name: value})
            assert repr(value) in str(caught.value) or name == "alpha", (name, value)


@pytest.mark.parametrize("spec", SPECS)
def test_bad_sample_weight_raises_naming_it(spec):
    x, t, w = _batch(spec, 6, weighted=True)
    loss_fn = spec.make()
    bad = w.clone()
    bad.view(-1)[0] = -1.0
    with pytest.raises(ValueError, match="sample_weight must be finite and non-negative"):
        loss_fn(x, t, sample_weight=bad)
    bad.view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match="sample_weight must be finite and non-negative"):
        loss_fn(x, t, sample_weight=bad)
    with pytest.raises(ValueError, match="sample_weight must .*got \\(5"):
        loss_fn(x, t, sample_weight=w[:5])
    with pytest.raises(ValueError, match="sample_weight must be a floating-point tensor"):
        loss_fn(x, t, sample_weight=torch.ones(w.shape, dtype=torch.long))
    with pytest.raises(ValueError, match="targets must"):
        loss_fn(x, t[:5])
    with pytest.raises(ValueError, match="inputs must be a floating-point tensor"):
        loss_fn(x.long(), t)


@pytest.mark.parametrize("spec", SPECS)
def test_an_empty_batch_is_zero_connected_to_the_graph(spec):
    for reduction in spec.reductions:
        x, t, _ = _batch(spec, 0)
        x.requires_grad_(True)
        loss = spec.make(reduction=reduction)(x, t)
        loss.sum().backward()
        assert x.grad is not None and x.grad.shape == x.shape
        if reduction != "none":
            assert loss.item() == 0.0


@pytest.mark.parametrize(
    "copier",
    [
        pytest.param(copy.deepcopy, id="deepcopy"),
        pytest.param(lambda m: pickle.loads(pickle.dumps(m)), id="pickle"),
    ],
)
@pytest.mark.parametrize("spec", SPECS)
def test_a_copy_runs_the_same_shares_nothing_and_says_nothing(spec, copier):
    original = spec.make().double()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        twin = copier(original)
    assert type(twin) is type(original) and repr(twin) == repr(original)
    for a, b in zip(original.buffers(), twin.buffers()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    x, t, w = _batch(spec, 9, weighted=True)
    assert torch.equal(twin(x, t, sample_weight=w), original(x, t, sample_weight=w))


@pytest.mark.parametrize("spec", SPECS)
def test_a_compiled_loss_gives_the_eager_value_and_gradient(spec):
    """``torch.compile`` may fuse the per-element terms (last-bit differences), never more."""
    torch._dynamo.reset()
    try:
        x, t, w = _batch(spec, 12, torch.float32, weighted=True)
        compiled_x, eager_x = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        loss_fn = spec.make()
        compiled = torch.compile(loss_fn)(compiled_x, t, sample_weight=w)
        eager = loss_fn(eager_x, t, sample_weight=w)
        compiled.backward()
        eager.backward()
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled_x.grad, eager_x.grad, rtol=1e-5, atol=1e-6)
