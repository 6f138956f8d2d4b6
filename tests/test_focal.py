"""The focal losses beyond the reference's frozen values (tests/test_migration.py): bad input
is named, a zero weight warns once, an empty batch is 0 rather than NaN, and a plain formula
written here agrees in float64."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F

from imbalanced_losses import SigmoidFocalLoss, SoftmaxFocalLoss


def test_softmax_matches_the_formula_written_out_with_ignored_rows_and_weights():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(9, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, -100, 1, 0, 2, 3])
    w = torch.rand(9, generator=gen, dtype=torch.float64)
    alpha = torch.tensor([0.5, 1.0, 1.5, 2.0])
    got = SoftmaxFocalLoss(alpha=alpha, gamma=1.5, reduction="mean_positive")(x, y, sample_weight=w)
    keep = y != -100
    p = x.softmax(1)[keep, y[keep]]
    per_row = alpha.double()[y[keep]] * (1 - p) ** 1.5 * -torch.log(p) * w[keep]
    want = per_row.sum() / w[keep & (y != 0)].sum()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_sigmoid_gamma_zero_alpha_off_is_binary_cross_entropy():
    x = torch.randn(5, 3, dtype=torch.float64)
    t = (torch.rand(5, 3) < 0.5).double()
    got = SigmoidFocalLoss(alpha=-1, gamma=0.0)(x, t)
    torch.testing.assert_close(got, F.binary_cross_entropy_with_logits(x, t), rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    ("make", "args", "message"),
    [
        (
            SoftmaxFocalLoss,
            (torch.randn(4, 3), torch.tensor([0, 1, 3, -100])),
            "outside that range: \\[3\\]",
        ),
        (
            SoftmaxFocalLoss,
            (torch.randn(4, 3), torch.zeros(4)),
            "integer class ids, got dtype torch.float32",
        ),
        (
            SoftmaxFocalLoss,
            (torch.randn(4, 3), torch.zeros(3, dtype=torch.long)),
            "targets must have shape \\(4,\\)",
        ),
        (SoftmaxFocalLoss, (torch.randn(4),), "inputs must be a floating-point tensor \\[N, C\\]"),
        (
            SigmoidFocalLoss,
            (torch.randn(4, 3), torch.zeros(4)),
            "targets must have the shape of inputs \\(4, 3\\)",
        ),
    ],
)
def test_bad_inputs_are_named(make, args, message):
    x, *rest = args
    targets = rest[0] if rest else torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match=message):
        make()(x, targets)


def test_bad_weights_and_options_are_named():
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    with pytest.raises(
        ValueError, match="finite and non-negative; got 0 non-finite and 1 negative"
    ):
        SoftmaxFocalLoss()(x, y, sample_weight=torch.tensor([1.0, -1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="finite and non-negative; got 1 non-finite"):
        SigmoidFocalLoss()(
            x, torch.zeros(4, 3), sample_weight=torch.tensor([[1.0]] * 3 + [[torch.nan]])
        )
    with pytest.raises(
        ValueError, match="sample_weight must match targets dim-0, got \\(3,\\) vs N=4"
    ):
        SoftmaxFocalLoss()(x, y, sample_weight=torch.ones(3))
    with pytest.raises(ValueError, match="sample_weight must be \\(4,\\) matching targets"):
        SoftmaxFocalLoss()(x, y, sample_weight=torch.ones(4, 1))
    with pytest.raises(ValueError, match="sample_weight must match inputs dim-0"):
        SigmoidFocalLoss()(x, torch.zeros(4, 3), sample_weight=torch.ones(3, 1))
    with pytest.raises(ValueError, match="sample_weight must be broadcastable to inputs"):
        SigmoidFocalLoss()(x, torch.zeros(4, 3), sample_weight=torch.ones(4, 2))
    with pytest.raises(ValueError, match="alpha has 2 entries but inputs have 3 classes"):
        SoftmaxFocalLoss(alpha=[1.0, 2.0])(x, y)
    with pytest.raises(ValueError, match="alpha must be finite and non-negative"):
        SoftmaxFocalLoss(alpha=[1.0, -2.0, 1.0])
    with pytest.raises(ValueError, match="gamma must be a finite number >= 0, got -1"):
        SigmoidFocalLoss(gamma=-1)
    with pytest.raises(ValueError, match="label_smoothing must be in \\[0, 1\\], got 2"):
        SoftmaxFocalLoss(label_smoothing=2)
    with pytest.raises(
        ValueError, match="gather_distributed must be None \\(auto\\), True or False"
    ):
        SoftmaxFocalLoss(gather_distributed="auto")


def test_an_all_zero_weight_warns_once_per_instance():
    loss_fn = SoftmaxFocalLoss()
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    with pytest.warns(UserWarning, match="sample_weight is entirely zero"):
        assert loss_fn(x, y, sample_weight=torch.zeros(4)) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss_fn(x, y, sample_weight=torch.zeros(4))
        loss_fn(x, y, sample_weight=torch.ones(4))


@pytest.mark.parametrize("make", [SigmoidFocalLoss, SoftmaxFocalLoss])
def test_an_empty_batch_is_zero_with_a_zero_gradient_not_nan(make):
    x = torch.randn(0, 3, requires_grad=True)
    t = torch.zeros(0, 3) if make is SigmoidFocalLoss else torch.zeros(0, dtype=torch.long)
    loss = make()(x, t)
    loss.backward()
    assert loss.item() == 0.0 and x.grad is not None and x.grad.shape == (0, 3)
    assert make(reduction="none")(x, t).shape == ((0, 3) if make is SigmoidFocalLoss else (0,))


def test_gather_distributed_true_without_a_process_group_is_an_error():
    with pytest.raises(RuntimeError, match="gather_distributed=True but torch.distributed"):
        SigmoidFocalLoss(gather_distributed=True)(torch.randn(2, 1), torch.zeros(2, 1))


# ------------------------------------------------------------------ low precision, large batches
def _large_batch(make, rows: int):
    gen = torch.Generator().manual_seed(11)
    if make is SigmoidFocalLoss:
        return torch.randn(rows, 1, generator=gen), (
            torch.rand(rows, 1, generator=gen) < 0.3
        ).float()
    return torch.randn(rows, 3, generator=gen), torch.randint(0, 3, (rows,), generator=gen)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("make", [SigmoidFocalLoss, SoftmaxFocalLoss])
def test_half_precision_over_65504_elements_gives_the_float32_answer(make, dtype, reduction):
    """fp16 holds no count above 65,504: the sums must run in float32, not the input dtype."""
    x, t = _large_batch(make, 70_000)
    want = make(reduction=reduction)(x, t)
    got = make(reduction=reduction)(x.to(dtype), t)
    assert got.dtype == dtype and torch.isfinite(got)
    # The inputs' own rounding (fp16 ~1e-3, bf16 ~8e-3 relative) bounds the difference.
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=0)


# ------------------------------------------------------------------ host syncs in one process
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("make", [SigmoidFocalLoss, SoftmaxFocalLoss])
def test_one_process_forward_makes_at_most_one_host_read_and_backward_none(make, weighted):
    """Alone, the value checks cost one read of the metadata row, nothing more, on any device."""
    from imbalanced_losses.testing import SyncCounter
    from imbalanced_losses.testing._host_syncs import DEVICE_TO_HOST

    x, t = _large_batch(make, 64)
    x.requires_grad_(True)
    w = torch.rand(t.shape[0], *([1] if make is SigmoidFocalLoss else [])) if weighted else None
    loss_fn = make(alpha=[1.0, 2.0, 0.5]) if make is SoftmaxFocalLoss else make()
    device_tensors = [x, t, *loss_fn.buffers(), *([w] if weighted else [])]
    with SyncCounter(*device_tensors) as forward:
        loss = loss_fn(x, t, sample_weight=w)
    with SyncCounter(loss) as backward:
        loss.backward()
    assert forward.total <= 1 and set(forward.counts) <= {DEVICE_TO_HOST}, dict(forward.counts)
    assert backward.total == 0, dict(backward.counts)


DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


@pytest.mark.parametrize("device", DEVICES)
def test_bad_values_in_one_process_raise_a_value_error_naming_the_argument_on_every_device(
    device,
):
    """Not a device-side assert (it would end the CUDA context naming nothing): a ValueError."""
    x = torch.randn(4, 3, device=device)
    with pytest.raises(ValueError, match=r"^targets must be class ids .*outside that range: \[3\]"):
        SoftmaxFocalLoss()(x, torch.tensor([0, 1, 3, -100], device=device))
    good = torch.tensor([0, 1, 2, 1], device=device)
    for bad in (-torch.ones(4, device=device), torch.full((4,), float("nan"), device=device)):
        with pytest.raises(ValueError, match="^sample_weight must be finite and non-negative"):
            SoftmaxFocalLoss()(x, good, sample_weight=bad)
        with pytest.raises(ValueError, match="^sample_weight must be finite and non-negative"):
            SigmoidFocalLoss()(x, (x > 0).float(), sample_weight=bad[:, None])
    # The CUDA context survives: the same loss runs on after the error.
    assert torch.isfinite(SoftmaxFocalLoss()(x, good))


@pytest.mark.parametrize("device", DEVICES)
def test_an_all_zero_weight_warns_once_in_one_process_on_every_device(device):
    loss_fn = SigmoidFocalLoss()
    x = torch.randn(3, 2, device=device)
    with pytest.warns(UserWarning, match="sample_weight is entirely zero") as caught:
        loss_fn(x, (x > 0).float(), sample_weight=torch.zeros(3, 1, device=device))
    assert caught[0].filename == __file__  # the caller's line, not the package's
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss_fn(x, (x > 0).float(), sample_weight=torch.zeros(3, 1, device=device))


# ------------------------------------------------------------------ copies without a group
@pytest.mark.parametrize(
    "copier",
    [
        pytest.param(copy.deepcopy, id="deepcopy"),
        pytest.param(lambda m: pickle.loads(pickle.dumps(m)), id="pickle"),
    ],
)
def test_a_copy_without_a_process_group_runs_the_same_and_says_nothing(copier):
    original = SoftmaxFocalLoss(alpha=[1.0, 2.0, 0.5], gamma=1.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        twin = copier(original)
    assert repr(twin) == repr(original) and "process_group" not in repr(twin)
    assert twin.alpha is not None and twin.alpha.data_ptr() != original.alpha.data_ptr()
    x, y = torch.randn(6, 3), torch.tensor([0, 1, 2, 1, 0, -100])
    assert torch.equal(twin(x, y), original(x, y))
