"""RecallAtQuantile (torchmetrics) equals recall_at_quantile on the concatenation of its updates.

The oracle is the functional metric applied once to every update's rows, concatenated; the
functional metric is itself checked against the plain reference in test_metric.py.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from _support import INTERPOLATIONS
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("torchmetrics", reason='pip install "imbalanced-losses[metrics]"')

from imbalanced_losses import RecallAtQuantile, recall_at_quantile  # noqa: E402

EXACT = dict(rtol=0, atol=0, equal_nan=True)
REPO = Path(__file__).resolve().parent.parent


def _batches(gen, sizes, columns, dtype, pad):
    """One (scores, targets) per size; ``columns == 0`` means binary scores of shape [N]."""
    out = []
    for n in sizes:
        scores = torch.randn(n, max(columns, 1), generator=gen, dtype=torch.float64).to(dtype)
        if torch.rand((), generator=gen) < 0.3:  # tied scores in some batches
            scores = scores.round()
        targets = torch.randint(0, 2 if columns <= 1 else columns, (n,), generator=gen)
        if pad:
            targets[torch.rand(n, generator=gen) < 0.3] = -100
        out.append((scores[:, 0] if columns == 0 else scores, targets))
    return out


@given(
    sizes=st.lists(st.integers(0, 40), min_size=1, max_size=6),
    columns=st.integers(0, 4),
    quantile=st.sampled_from([0.5, 0.3, 0.1, 0.02]),
    interpolation=st.sampled_from(INTERPOLATIONS),
    reduction=st.sampled_from(["none", "mean"]),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    pad=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_compute_equals_the_function_on_the_concatenation(
    sizes, columns, quantile, interpolation, reduction, dtype, pad, seed
):
    gen = torch.Generator().manual_seed(seed)
    batches = _batches(gen, sizes, columns, dtype, pad)
    kwargs = dict(interpolation=interpolation, reduction=reduction)
    metric = RecallAtQuantile(quantile, **kwargs)
    for scores, targets in batches:
        metric.update(scores, targets)
    scores = torch.cat([s for s, _ in batches])
    targets = torch.cat([t for _, t in batches])
    got = metric.compute()
    if scores.shape[0] == 0:  # (the function refuses 0-row scores): all rows ignored instead
        scores = torch.zeros(1, *scores.shape[1:], dtype=dtype)
        targets = torch.full((1,), -100)
    expected = recall_at_quantile(scores, targets, quantile, **kwargs)
    assert got.shape == expected.squeeze().shape  # torchmetrics makes [1] a 0-d tensor
    torch.testing.assert_close(got, expected.reshape(got.shape), **EXACT)


def test_mean_of_batch_recalls_is_not_the_recall():
    """The metric is not a per-batch average (which differs here by a measurable amount)."""
    gen = torch.Generator().manual_seed(0)
    labels = (torch.rand(8000, generator=gen) < 0.01).long()
    scores = torch.randn(8000, generator=gen) + 2.5 * labels
    metric = RecallAtQuantile(0.02)
    per_batch = []
    for s, t in zip(scores.split(100), labels.split(100)):
        per_batch.append(recall_at_quantile(s, t, 0.02))
        metric.update(s, t)
    whole = recall_at_quantile(scores, labels, 0.02)
    assert torch.equal(metric.compute(), whole)
    assert not torch.isclose(torch.stack(per_batch).nanmean(), whole, atol=1e-3)


def test_mixed_score_dtypes_compute_in_the_promoted_dtype():
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(50, 2, generator=gen, dtype=torch.bfloat16)
    b = torch.randn(30, 2, generator=gen, dtype=torch.float32)
    ta, tb = torch.randint(0, 2, (50,), generator=gen), torch.randint(0, 2, (30,), generator=gen)
    metric = RecallAtQuantile(0.3, interpolation="linear")
    metric.update(a, ta)
    metric.update(b, tb)
    both, both_targets = torch.cat([a, b]), torch.cat([ta, tb])
    expected = recall_at_quantile(both, both_targets, 0.3, interpolation="linear")
    torch.testing.assert_close(metric.compute(), expected, **EXACT)


def test_reset_forgets_every_row_and_forward_gives_the_batch_value():
    gen = torch.Generator().manual_seed(2)
    (s1, t1), (s2, t2) = _batches(gen, [60, 40], 3, torch.float64, pad=True)
    metric = RecallAtQuantile(0.2)
    metric.update(s1, t1)
    metric.reset()
    batch_value = metric(s2, t2)  # forward: this batch's value, and accumulate it
    torch.testing.assert_close(batch_value, recall_at_quantile(s2, t2, 0.2), **EXACT)
    metric.update(s1, t1)
    expected = recall_at_quantile(torch.cat([s2, s1]), torch.cat([t2, t1]), 0.2)
    torch.testing.assert_close(metric.compute(), expected, **EXACT)


def test_all_rows_ignored_or_no_update_gives_nan():
    metric = RecallAtQuantile(0.1)
    metric.update(torch.randn(5, 2), torch.full((5,), -100))
    assert metric.compute().shape == (2,) and metric.compute().isnan().all()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert RecallAtQuantile(0.1).compute().isnan()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(quantile=0.0), "quantile must be a number in \\(0, 1\\), got 0.0"),
        (dict(quantile=1.5), "quantile must be a number in \\(0, 1\\), got 1.5"),
        (dict(quantile=0.1, interpolation="cubic"), "interpolation must be one of .*'cubic'"),
        (dict(quantile=0.1, reduction="sum"), "reduction must be 'none' or 'mean', got 'sum'"),
        (dict(quantile=0.1, ignore_index=-1.5), "ignore_index must be an int, got -1.5"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RecallAtQuantile(**kwargs)


def test_bad_update_is_refused_before_any_state_changes():
    metric = RecallAtQuantile(0.1)
    metric.update(torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2]))
    bad = [
        ((torch.randn(4, 3), torch.tensor([0, 1, 3, 0])), "targets must be in \\[0, 3\\)"),
        ((torch.randn(4, 3), torch.tensor([0, 1, 2])), "targets must hold 4 class ids"),
        ((torch.randn(4, 3), torch.rand(4)), "targets must be an integer or bool"),
        ((torch.randn(4, 2), torch.tensor([0, 1, 1, 0])), "2 column\\(s\\) but earlier .* 3"),
        ((torch.randn(4), torch.tensor([0, 1, 1, 0])), "shape \\[N\\] .* but earlier .* 3"),
        ((torch.ones(4, 3, dtype=torch.long), torch.tensor([0, 1, 1, 0])), "float tensor"),
    ]
    for (scores, targets), match in bad:
        with pytest.raises(ValueError, match=match):
            metric.update(scores, targets)
    assert len(metric.rows) == 1 and len(metric.layouts) == 1


def test_core_import_works_without_torchmetrics_and_the_metric_names_the_extra():
    script = textwrap.dedent(
        """
        import sys
        sys.modules["torchmetrics"] = None  # as if it were not installed
        import imbalanced_losses
        from imbalanced_losses import RecallAtQuantileLoss, recall_at_quantile
        try:
            from imbalanced_losses import RecallAtQuantile
        except ImportError as exc:
            print(exc)
        else:
            raise SystemExit("imported without torchmetrics")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert 'pip install "imbalanced-losses[metrics]"' in out.stdout
    with pytest.raises(AttributeError, match="no attribute 'NoSuchThing'"):
        import imbalanced_losses

        imbalanced_losses.NoSuchThing  # noqa: B018
