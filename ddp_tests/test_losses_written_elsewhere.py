"""The harness on losses nobody here wrote: each is checked through its own ``state_dict``, and
each planted DDP bug must be flagged by the check named after the promise it breaks."""

from __future__ import annotations

from functools import cache, partial

import pytest
from _handwritten_losses import (
    BankedMarginLoss,
    HardRecallLoss,
    PlainAttributeMemoryLoss,
    plain_attribute_memory,
)

from imbalanced_losses.testing import Case, DdpReport, Step, check_many

pytest.importorskip("pytorch_metric_learning")  # a test dependency of the ddp env

from _metric_learning import (  # noqa: E402
    EMBEDDING_SIZE,
    SingleProcessMemory,
    distributed_cross_batch_memory,
)

# Two ranks (uneven, empty, padded, one eval step at index 3), then a resume by one rank.
BANK_PLAN = [
    Step((5, 3)),
    Step((0, 7), pad_frac=0.3),
    Step((4, 4)),
    Step((3, 5), train=False),
    Step((6, 2)),
    Step((6,)),
    Step((5,), pad_frac=0.2),
]
FIRST_RESUMED_STEP = 5
# DistributedLossWrapper gathers with all_gather, which needs equal per-rank batches.
MEMORY_PLAN = [Step((3, 3)), Step((4, 4)), Step((2, 2), train=False), Step((6,)), Step((5,))]

BANK = partial(BankedMarginLoss, 3, bank_size=16)


@cache
def reports() -> dict[str, DdpReport]:
    bank = {"num_classes": 3}
    cases = {
        "clean": Case(BANK, BANK_PLAN, **bank),
        "local_gradient": Case(partial(BANK, bug="local_gradient"), BANK_PLAN, **bank),
        "writes_in_eval": Case(partial(BANK, bug="writes_in_eval"), BANK_PLAN, **bank),
        "writes_in_eval, declared": Case(
            partial(BANK, bug="writes_in_eval"), BANK_PLAN, writes_state_in_eval=True, **bank
        ),
        "local_order": Case(partial(BANK, bug="local_order"), BANK_PLAN, **bank),
        "position_not_saved": Case(partial(BANK, bug="position_not_saved"), BANK_PLAN, **bank),
        "plain attribute memory": Case(partial(PlainAttributeMemoryLoss, 3), BANK_PLAN, **bank),
        "plain attribute memory, state=": Case(
            partial(PlainAttributeMemoryLoss, 3), BANK_PLAN, state=plain_attribute_memory, **bank
        ),
        "zero gradient": Case(HardRecallLoss, BANK_PLAN, **bank),
        "CrossBatchMemory": Case(
            distributed_cross_batch_memory,
            MEMORY_PLAN,
            oracle_factory=SingleProcessMemory,
            num_classes=EMBEDDING_SIZE,
            takes_padding=False,  # it would take ignore_index for one more label
            loss_scale="world_size",  # the wrapper multiplies by it; DDP's mean undoes that
            writes_state_in_eval=True,  # it writes its memory whatever the mode
        ),
    }
    return dict(zip(cases, check_many(list(cases.values()))))


def failing(report: DdpReport, step: int) -> set[str]:
    return {c.name for c in report.failures() if c.step == step}


def first_failing_step(report: DdpReport) -> int:
    return min(c.step for c in report.failures())


def test_a_loss_that_is_not_ours_passes_with_every_state_check_run():
    report = reports()["clean"]
    assert report.ok, f"{report}\n{report.table()}"
    names = {c.name for c in report.checks}
    for check in ("state identical on every rank", "state vs oracle", "state frozen in eval"):
        assert {c.step for c in report.checks if c.name == check} >= (
            {3} if "eval" in check else set(range(len(BANK_PLAN)))
        ), f"{check} did not run at every step it applies to"
    assert "DDP grads vs oracle" in names
    assert [n.name for n in report.not_checked] == []


def test_a_local_slice_gradient_is_flagged_by_the_gradient_check():
    report = reports()["local_gradient"]
    assert failing(report, 0) == {"DDP grads vs oracle", "params vs free-running oracle"}
    grads = next(c for c in report.checks if c.name == "DDP grads vs oracle")
    assert grads.error == pytest.approx(0.5, rel=1e-6)  # 1 / world_size of the gradient is missing


def test_a_bank_written_in_eval_is_flagged_unless_the_loss_declares_it():
    report = reports()["writes_in_eval"]
    assert first_failing_step(report) == 3  # the eval step
    assert failing(report, 3) == {"state frozen in eval"}
    declared = reports()["writes_in_eval, declared"]
    assert declared.ok, str(declared)
    assert "state frozen in eval" not in {c.name for c in declared.checks}
    assert (
        "not checked: state frozen in eval, because the loss writes its state in eval by design"
        in str(declared)
    )
    assert str(declared).startswith("DDP exactness: PASS (")
    assert "1 not checked" in str(declared).splitlines()[0]


def test_a_rank_local_bank_order_is_flagged_by_the_cross_rank_state_check():
    report = reports()["local_order"]
    assert first_failing_step(report) == 0
    assert "state identical on every rank" in failing(report, 0)


def test_a_write_position_missing_from_the_state_is_flagged_after_a_resume():
    report = reports()["position_not_saved"]
    assert first_failing_step(report) == FIRST_RESUMED_STEP
    assert "state vs oracle" in failing(report, FIRST_RESUMED_STEP)


def test_cross_batch_memory_under_its_distributed_wrapper_is_flagged_where_it_breaks():
    report = reports()["CrossBatchMemory"]
    # Each rank puts its own rows first in the gathered batch, so the memories differ from the
    # first step on (every step has rows on both ranks) ...
    state_across = {c.step for c in report.failures() if c.name == "state identical on every rank"}
    assert state_across == {0, 1, 2}
    # ... rank 0's order is the global order, so its memory matches the single process until the
    # resume by one rank, which restarts writing at slot 0: queue_idx is not in its state_dict.
    vs_oracle = {c.step: c.ok for c in report.checks if c.name == "state vs oracle"}
    assert vs_oracle == {0: True, 1: True, 2: True, 3: False, 4: False}
    # Its value is world_size times the single process's by design, and said so.
    assert {c.step for c in report.failures() if c.name == "loss vs oracle"} == {3, 4}
    text = str(report)
    assert "note: the ranks' loss was divided by the world size" in text
    assert "not checked: state frozen in eval, because the loss writes its state in eval" in text


def test_memory_in_a_plain_attribute_is_not_checked_and_the_report_says_to_pass_state():
    report = reports()["plain attribute memory"]
    text = str(report)
    assert report.ok, text  # nothing the harness can see is wrong ...
    assert "not checked: state, because the loss's state_dict() is empty; pass state=" in text
    assert not [c for c in report.checks if c.name.startswith("state")], text  # ... no state ok
    # ... and with the accessor the report asks for, the per-rank memories are caught at once.
    given = reports()["plain attribute memory, state="]
    assert first_failing_step(given) == 0
    assert "state identical on every rank" in failing(given, 0)


def test_a_gradient_that_is_zero_at_every_step_is_reported_as_not_informative():
    report = reports()["zero gradient"]
    text = str(report)
    assert report.ok, text
    assert "DDP grads vs oracle" not in {c.name for c in report.checks}, text
    trained = ", ".join(str(i) for i, step in enumerate(BANK_PLAN) if step.train)
    assert (
        "not checked: DDP grads vs oracle, because it is not informative: the oracle's gradient "
        f"is 0 at every step it ran (plan steps {trained})" in text
    ), text
    assert "ok   loss vs oracle" in text  # its value is right: only the gradient proves nothing
