"""The comparison alone, on hand-made records (no rank spawned, no model run): it must never pass
vacuously. An empty state and a check of zeros are reported as not checked, saying why."""

from __future__ import annotations

import pytest
import torch

from imbalanced_losses.testing import Case, Step
from imbalanced_losses.testing._adapter import LossAdapter, whole_state_dict
from imbalanced_losses.testing._compare import CaseRecords, compare
from imbalanced_losses.testing._records import SegmentRun, StepRecord

PLAN = [Step((2, 1)), Step((1, 2)), Step((2, 2), train=False)]
PARAMS = [torch.tensor([1.0, -2.0])]


def adapter(**options) -> LossAdapter:
    case = Case(lambda: None, PLAN, num_classes=1, **options)
    return LossAdapter.for_case(case, None)


def record(
    step: Step, *, loss: float = 0.7, grad: float = 0.3, state: object = None, rows: slice
) -> StepRecord:
    logits = torch.arange(sum(step.sizes), dtype=torch.float64)[:, None] + 1.0
    grads = [torch.full((2,), grad, dtype=torch.float64)] if step.train else None
    return StepRecord(torch.tensor(loss), logits[rows], grads, PARAMS, state)


def records(**per_step) -> CaseRecords:
    """Two ranks and both oracles that agree everywhere, with ``per_step`` values (callables of
    the step index and of ``who``: 'rank0', 'rank1' or 'oracle') for loss, grad and state."""

    def at(i: int, who: str, rows: slice) -> StepRecord:
        values = {name: fn(i, who) for name, fn in per_step.items()}
        return record(PLAN[i], rows=rows, **values)

    runs = []
    for r in range(2):
        made = []
        for i, step in enumerate(PLAN):
            start = sum(step.sizes[:r])
            made.append(at(i, f"rank{r}", slice(start, start + step.sizes[r])))
        start_state = per_step["state"](-1, f"rank{r}") if "state" in per_step else None
        runs.append(SegmentRun(made, start_state, {"model": PARAMS, "loss": None}))
    oracle = [at(i, "oracle", slice(None)) for i in range(len(PLAN))]
    return CaseRecords(PLAN, [[0, 1, 2]], [runs], oracle, oracle)


def names(report) -> set[str]:
    return {c.name for c in report.checks}


def test_a_loss_that_agrees_everywhere_passes_with_every_check_run():
    state = {"memory": torch.tensor([1.0, 2.0]), "_extra_state": {"at": 1}}
    report = compare(records(state=lambda i, who: state), adapter(), rtol=1e-9, backend="gloo")
    assert report.ok, str(report)
    assert {"state identical on every rank", "state vs oracle", "state frozen in eval"} <= names(
        report
    )
    assert "DDP grads vs oracle" in names(report)
    assert not [n for n in report.not_checked if n.name == "state"]


def test_an_empty_state_dict_is_not_checked_and_says_to_pass_state():
    report = compare(records(state=lambda i, who: {}), adapter(), rtol=1e-9, backend="gloo")
    assert not any(name.startswith("state") for name in names(report)), report.table()
    assert "not checked: state, because the loss's state_dict() is empty; pass state=..." in str(
        report
    )
    assert report.ok and "2 not checked" in str(report).splitlines()[0]  # and the world size


def test_no_state_dict_at_all_and_an_accessor_that_returns_nothing_are_not_checked_either():
    no_state_dict = compare(records(), adapter(), rtol=1e-9, backend="gloo")
    assert "not checked: state, because the loss has no state_dict(); pass state=" in str(
        no_state_dict
    )
    given = compare(
        records(state=lambda i, who: {"memory": []}),
        adapter(state=whole_state_dict),
        rtol=1e-9,
        backend="gloo",
    )
    assert "not checked: state, because the state accessor (state=...) returned nothing" in str(
        given
    )


def test_a_state_that_is_empty_only_at_the_start_is_still_checked():
    report = compare(
        records(state=lambda i, who: {} if i < 0 else {"memory": torch.ones(2) * (i + 1)}),
        adapter(),
        rtol=1e-9,
        backend="gloo",
    )
    assert "state identical on every rank" in names(report)


def test_a_state_that_differs_across_ranks_fails():
    report = compare(
        records(state=lambda i, who: {"memory": torch.ones(2) * (who == "rank1")}),
        adapter(),
        rtol=1e-9,
        backend="gloo",
    )
    assert "state identical on every rank" in {c.name for c in report.failures()}


def test_a_gradient_that_is_zero_at_every_step_is_not_informative_naming_the_steps():
    report = compare(records(grad=lambda i, who: 0.0), adapter(), rtol=1e-9, backend="gloo")
    assert "DDP grads vs oracle" not in names(report)
    assert "grads identical on every rank" not in names(report)
    text = str(report)
    assert (
        "not checked: DDP grads vs oracle, because it is not informative: "
        "the oracle's gradient is 0 at every step it ran (plan steps 0, 1)" in text
    ), text
    assert "ok   DDP grads" not in text


def test_a_gradient_that_is_zero_at_some_steps_only_is_checked():
    report = compare(records(grad=lambda i, who: float(i)), adapter(), rtol=1e-9, backend="gloo")
    assert "DDP grads vs oracle" in names(report)
    assert not [n for n in report.not_checked if n.name == "DDP grads vs oracle"]


def test_a_zero_oracle_gradient_against_nonzero_rank_gradients_stays_a_failure():
    report = compare(
        records(grad=lambda i, who: 0.0 if who == "oracle" else 0.5),
        adapter(),
        rtol=1e-9,
        backend="gloo",
    )
    assert "DDP grads vs oracle" in {c.name for c in report.failures()}


def test_a_loss_that_is_zero_at_every_step_is_not_informative():
    report = compare(records(loss=lambda i, who: 0.0), adapter(), rtol=1e-9, backend="gloo")
    not_checked = {n.name: n.reason for n in report.not_checked}
    for name in ("loss identical on every rank", "loss vs oracle", "loss vs free-running oracle"):
        assert name not in names(report)
        assert "not informative: " in not_checked[name]
        assert "plan steps 0, 1, 2" in not_checked[name]


def scales(report, name: str) -> list[float]:
    return [c.scale for c in report.checks if c.name == name]


def test_every_check_carries_the_magnitude_it_compared():
    report = compare(records(grad=lambda i, who: -0.25), adapter(), rtol=1e-9, backend="gloo")
    assert scales(report, "DDP grads vs oracle") == [0.25, 0.25]
    assert scales(report, "loss vs oracle") == pytest.approx([0.7] * 3)
    assert scales(report, "logits vs oracle (same parameters)") == [3.0, 3.0, 4.0]
