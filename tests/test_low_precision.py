"""Contract §17 "Low precision": float16/bfloat16 scores give the float32 answer on the same values.

Every threshold path (``quantile_threshold`` and the functional loss, ``recall_at_quantile``, the
``RecallAtQuantile`` metric class) is fed scores that are exact in both half dtypes, so the float32
upcast holds the very same numbers; the oracle is the plain reference (a loop over classes with
``torch.quantile``) run on that upcast. A rank, lerp weight, threshold or positive count computed
in half precision picks another row (bfloat16 rounds 0.999 to 1.0; float16 overflows ``n - 1`` past
65,504 rows) and the answer moves.
"""

from __future__ import annotations

import pytest
import torch
from _support import INTERPOLATIONS, TIGHT

from imbalanced_losses import recall_at_quantile
from imbalanced_losses.functional import (
    quantile_threshold,
    recall_at_quantile_loss,
    reduce_per_class,
    soft_recall_per_class,
)
from imbalanced_losses.testing.reference import (
    reference_recall_at_quantile,
    reference_recall_at_quantile_loss,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*pool.*:UserWarning")

HALF_DTYPES = (torch.bfloat16, torch.float16)
QUANTILES = (0.001, 0.01, 0.07, 0.1, 0.3, 0.5)  # 0.07: a linear weight under 0.5
NEAR = dict(rtol=1e-5, atol=1e-6)  # float32 sums in another order than the reference's
EXACT = dict(rtol=0, atol=0, equal_nan=True)


def _exact_values() -> torch.Tensor:
    """Every ``k * 2^e`` with ``128 <= k < 256`` and ``-8 <= e <= 8``, both signs, in float32:
    4,352 values, ``|x|`` in ``[0.5, 65,280]``.

    Exact in bfloat16 (8 significant bits) and in float16 (11 bits, below 65,504), and tiling
    the bfloat16 grid on ``[0.5, 65,536)``: consecutive order statistics are mostly neighbouring
    bfloat16 values.
    """
    magnitudes = torch.arange(128, 256)[None, :] * 2.0 ** torch.arange(-8, 9)[:, None]
    return torch.cat([-magnitudes.flatten(), magnitudes.flatten()]).float()


EXACT_VALUES = _exact_values()
# Kept rows of every threshold: a size where a half-precision rank is another row than the
# float32 one for every quantile and interpolation (see the premise test below).
ROWS = 4111
IGNORED = 200


def _exact_scores(gen: torch.Generator, rows: int, width: int) -> torch.Tensor:
    """``[rows, width]`` float32 scores exact in both half dtypes; distinct within a column when
    ``rows <= 4,352``, so that a rank off by one changes the threshold."""
    columns = []
    for _ in range(width):
        if rows <= EXACT_VALUES.numel():
            pick = torch.randperm(EXACT_VALUES.numel(), generator=gen)[:rows]
        else:
            pick = torch.randint(0, EXACT_VALUES.numel(), (rows,), generator=gen)
        columns.append(EXACT_VALUES[pick])
    return torch.stack(columns, dim=1)


def _targets(gen: torch.Generator, rows: int, num_classes: int) -> torch.Tensor:
    """Many positives (a rank shift then moves recall)."""
    if num_classes == 1:
        return (torch.rand(rows, generator=gen) < 0.5).long()
    return torch.randint(0, num_classes, (rows,), generator=gen)


def _case(
    seed: int, rows: int, num_classes: int, ignored: int = IGNORED
) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` kept rows and ``ignored`` padding rows (which must not count), shuffled."""
    gen = torch.Generator().manual_seed(seed)
    scores = _exact_scores(gen, rows + ignored, num_classes)
    targets = torch.cat([_targets(gen, rows, num_classes), torch.full((ignored,), -100)])
    order = torch.randperm(rows + ignored, generator=gen)
    return scores[order], targets[order]


def _positions(rows: int, prob: float, interpolation: str, dtype: torch.dtype) -> tuple:
    """torch.quantile's rank arithmetic (aten Sorting.cpp) in ``dtype``: (below, above, weight)."""
    rank = torch.tensor(prob, dtype=dtype) * (rows - 1)
    rank = {"lower": rank.floor, "higher": rank.ceil, "nearest": rank.round}.get(
        interpolation, lambda: rank
    )()
    weight = 0.5 if interpolation == "midpoint" else float(rank - rank.floor())
    return float(rank.floor()), float(rank.ceil()), weight


def test_the_scores_used_here_are_exact_in_both_half_dtypes():
    """Guards the premise of every test below: the upcast holds the very same numbers."""
    for dtype in HALF_DTYPES:
        assert torch.equal(EXACT_VALUES.to(dtype).float(), EXACT_VALUES)
    assert EXACT_VALUES.unique().numel() == EXACT_VALUES.numel() == 4352 >= ROWS + IGNORED


def test_a_half_precision_rank_picks_another_row_at_the_sizes_used_here():
    """Guards the premise of the metric tests: with ``ROWS`` kept rows every quantile and
    interpolation needs float32 rank arithmetic, so a rank done in the input dtype shows."""
    for dtype in HALF_DTYPES:
        for quantile in QUANTILES:
            for interpolation in INTERPOLATIONS:
                half = _positions(ROWS, 1 - quantile, interpolation, dtype)
                assert half != _positions(ROWS, 1 - quantile, interpolation, torch.float32)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
def test_half_precision_threshold_is_torch_quantile_of_the_float32_upcast(dtype, interpolation):
    scores, _ = _case(0, ROWS, 3, ignored=0)
    for quantile in QUANTILES:
        got = quantile_threshold(scores.to(dtype), quantile, interpolation)
        expected = torch.quantile(scores, 1 - quantile, dim=0, interpolation=interpolation)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, expected, **EXACT)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
@pytest.mark.parametrize("num_classes", [1, 3])
def test_half_precision_recall_at_quantile_is_the_float32_reference(
    dtype, interpolation, num_classes
):
    for seed, quantile in enumerate(QUANTILES):
        scores, targets = _case(seed, ROWS, num_classes)
        got = recall_at_quantile(scores.to(dtype), targets, quantile, interpolation=interpolation)
        expected = reference_recall_at_quantile(
            scores, targets, quantile, interpolation=interpolation
        )
        torch.testing.assert_close(got, expected, **TIGHT, equal_nan=True)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
def test_half_precision_metric_class_is_the_float32_reference(dtype, interpolation):
    pytest.importorskip("torchmetrics", reason='pip install "imbalanced-losses[metrics]"')
    from imbalanced_losses import RecallAtQuantile

    for seed, quantile in enumerate(QUANTILES):
        scores, targets = _case(seed, ROWS, 3)
        metric = RecallAtQuantile(quantile, interpolation=interpolation)
        for part, part_targets in zip(scores.to(dtype).split(1000), targets.split(1000)):
            metric.update(part, part_targets)
        expected = reference_recall_at_quantile(
            scores, targets, quantile, interpolation=interpolation
        )
        torch.testing.assert_close(metric.compute(), expected, **TIGHT, equal_nan=True)


def _reference_loss(scores, targets, weights, extra, quantile, interpolation, temperature):
    _, per_class, valid = reference_recall_at_quantile_loss(
        scores,
        targets,
        num_classes=scores.shape[1],
        quantile=quantile,
        temperature=temperature,
        interpolation=interpolation,
        reduction="none",
        sample_weight=weights,
        queue_scores=extra[0],
        queue_targets=extra[1],
        queue_weights=extra[2],
    )
    return per_class, valid


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
@pytest.mark.parametrize("num_classes", [1, 3])
def test_half_precision_functional_loss_is_the_float32_reference(dtype, interpolation, num_classes):
    """Live rows and extra (queue) rows in the half dtype, weights in float32 (not exact in half
    precision, so they must not be rounded to it), and the gradient reaches the half scores."""
    temperature = 2.0
    for seed, quantile in enumerate(QUANTILES):
        scores, targets = _case(100 + seed, ROWS, num_classes)
        weights = torch.rand(ROWS + IGNORED, generator=torch.Generator().manual_seed(seed)) + 0.1
        live, queued = slice(0, 3000), slice(3000, None)
        keep = targets[queued] != -100
        extra = (scores[queued][keep], targets[queued][keep], weights[queued][keep])
        half = scores[live].to(dtype).requires_grad_(True)
        per_class, valid = recall_at_quantile_loss(
            half,
            targets[live],
            quantile,
            temperature,
            weights=weights[live],
            extra=(extra[0].to(dtype), extra[1], extra[2]),
            interpolation=interpolation,
        )
        expected, expected_valid = _reference_loss(
            scores[live], targets[live], weights[live], extra, quantile, interpolation, temperature
        )
        assert per_class.dtype == torch.float32
        assert torch.equal(valid, expected_valid)
        torch.testing.assert_close(per_class[valid], expected[valid], **NEAR)
        (grad,) = torch.autograd.grad(per_class[valid].sum(), half)
        assert grad.dtype == dtype and torch.isfinite(grad).all()


FP16_ROWS = 70_000  # more rows than float16's largest finite value, 65,504


@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
def test_float16_pool_above_65504_rows_gives_the_float32_answer(interpolation):
    """A float16 rank ``0.999 * (n - 1)`` is inf here; positive counts pass float16's 2,048."""
    pytest.importorskip("torchmetrics", reason='pip install "imbalanced-losses[metrics]"')
    from imbalanced_losses import RecallAtQuantile

    scores, targets = _case(7, FP16_ROWS, 2, ignored=1000)
    half = scores.half()
    for quantile in (0.001, 0.3):
        torch.testing.assert_close(
            quantile_threshold(half, quantile, interpolation),
            torch.quantile(scores, 1 - quantile, dim=0, interpolation=interpolation),
            **EXACT,
        )
        expected = reference_recall_at_quantile(
            scores, targets, quantile, interpolation=interpolation
        )
        got = recall_at_quantile(half, targets, quantile, interpolation=interpolation)
        torch.testing.assert_close(got, expected, **TIGHT)
        metric = RecallAtQuantile(quantile, interpolation=interpolation)
        metric.update(half, targets)
        torch.testing.assert_close(metric.compute(), expected, **TIGHT)
        per_class, valid = recall_at_quantile_loss(
            half, targets, quantile, 2.0, interpolation=interpolation
        )
        ref_per_class, ref_valid = _reference_loss(
            scores, targets, None, (None, None, None), quantile, interpolation, 2.0
        )
        assert torch.equal(valid, ref_valid) and bool(valid.all())
        torch.testing.assert_close(per_class, ref_per_class, **NEAR)


def test_soft_recall_counts_positives_in_float32_given_half_precision_inputs():
    """257 positives: a bfloat16 running sum stops at 256 (257 is not a bfloat16 value)."""
    n = 257
    own = torch.zeros(n, dtype=torch.bfloat16)
    weights = torch.ones(n, dtype=torch.bfloat16)
    threshold = torch.zeros(1, dtype=torch.bfloat16)
    classes = torch.zeros(n, dtype=torch.long)
    recall, mass = soft_recall_per_class(own, classes, weights, threshold, 1.0)
    assert mass.dtype == torch.float32 and mass.item() == n
    torch.testing.assert_close(recall, torch.tensor([0.5]), **NEAR)


def test_mean_over_classes_counts_classes_in_float32_given_bfloat16_losses():
    """259 valid classes, 258 of loss 1 and one of loss 0: the mean is 258/259; a bfloat16 class
    count (260) gives 258/260, one bfloat16 step (2^-8 here) below the right answer."""
    per_class = torch.ones(259, dtype=torch.bfloat16)
    per_class[0] = 0
    valid = torch.ones(259, dtype=torch.bool)
    got = reduce_per_class(per_class, valid, "mean")
    assert got.dtype == torch.bfloat16
    assert abs(got.item() - 258 / 259) < 2**-10  # under half a bfloat16 step
