"""Every plain reference lives in ``imbalanced_losses.testing.reference`` and keeps the one plain
queue (issue 17): one ``__call__`` (``QueuedReference``), one ``PlainQueue``, none of the
package's loss code."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import imbalanced_losses.testing as testing
from imbalanced_losses.testing.reference import (
    PlainPAUCLoss,
    PlainQueue,
    QueuedReference,
    ReferenceRecallAtQuantileLoss,
    ReferenceSmoothAPLoss,
)

REFERENCES = [ReferenceRecallAtQuantileLoss, ReferenceSmoothAPLoss, PlainPAUCLoss]
PACKAGE = Path(testing.__file__).parent


def test_no_reference_module_sits_outside_the_reference_package():
    assert sorted(p.name for p in PACKAGE.glob("*reference*.py")) == []


@pytest.mark.parametrize("cls", REFERENCES, ids=lambda c: c.__name__)
def test_every_reference_is_called_through_the_one_queued_call(cls):
    assert issubclass(cls, QueuedReference)
    assert "__call__" not in vars(cls), f"{cls.__name__} re-implements QueuedReference.__call__"


def test_references_import_nothing_from_the_package_but_the_plain_queue():
    for path in (PACKAGE / "reference").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("imbalanced"):
                assert node.module.startswith("imbalanced_losses.testing.reference"), (
                    path.name,
                    node.module,
                )


def test_the_pauc_reference_keeps_its_rows_and_iid_flags_in_the_plain_queue():
    plain = PlainPAUCLoss(2, queue_size=4, alpha=0.0, beta=0.5)
    assert isinstance(plain.queue, PlainQueue)
    logits = torch.tensor([[0.1, 0.9], [0.4, 0.6], [float("inf"), 0.0], [0.3, 0.2], [0.8, 0.1]])
    targets = torch.tensor([0, 1, 1, -100, 1])
    iid = torch.tensor([True, False, True, True, False])
    plain(logits.double(), targets, iid_mask=iid)
    # Rows that count: finite scores and a target; the others never enter the queue.
    scores, queued_targets, _ = plain.queue.rows()
    assert queued_targets.tolist() == [0, 1, 1]
    assert plain.queue.iid_rows().tolist() == [True, False, False]
    torch.testing.assert_close(scores, logits[[0, 1, 4]].double())
    # The next step pools them, with their flags, after its own live rows.
    pooled = plain.pool(
        logits[:1].double(), targets[:1], iid[:1], torch.ones(1, dtype=torch.float64)
    )
    assert pooled[3].tolist() == [True, True, False, False]
    assert pooled[4].tolist() == [True, False, False, False]
