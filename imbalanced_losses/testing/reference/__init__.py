"""Plain reference implementations of every loss of the package, written from the formulas.

Each is a Python loop over classes that keeps the same plain circular queue (:class:`PlainQueue`)
and does no validation, no subsampling of its own and no distributed gather: the oracles of the
test-suite and of the DDP harness, and the baselines of ``scripts/bench.py``.
"""

from imbalanced_losses.testing.reference._queue import PlainQueue, QueuedReference
from imbalanced_losses.testing.reference.pauc import PlainPAUCLoss, plain_pauc_per_class
from imbalanced_losses.testing.reference.recall_at_quantile import (
    ReferenceRecallAtQuantileLoss,
    reference_recall_at_quantile,
    reference_recall_at_quantile_loss,
)
from imbalanced_losses.testing.reference.sharded import ShardedReference
from imbalanced_losses.testing.reference.smooth_ap import (
    ReferenceSmoothAPLoss,
    reference_smooth_ap_loss,
)
from imbalanced_losses.testing.reference.top_quantile_hinge import ReferenceTopQuantileHingeLoss

__all__ = [
    "PlainPAUCLoss",
    "PlainQueue",
    "QueuedReference",
    "ReferenceRecallAtQuantileLoss",
    "ReferenceSmoothAPLoss",
    "ReferenceTopQuantileHingeLoss",
    "ShardedReference",
    "reference_recall_at_quantile",
    "reference_recall_at_quantile_loss",
    "plain_pauc_per_class",
    "reference_smooth_ap_loss",
]
