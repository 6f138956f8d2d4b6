"""Test tooling shipped with the package, so users can check their own losses under DDP.

``run_ranks`` spawns real rank processes (gloo or NCCL) and fails fast, with tracebacks and
stack dumps, instead of hanging. ``check_ddp_exactness`` trains a small float64 model under
DistributedDataParallel with any loss and compares every step with one process fed the global
batch: loss on every rank, DDP gradients, the loss's state bit for bit, parameters.
``assert_ddp_exact`` is the same for a test suite: it raises with the report on a mismatch.
``SyncCounter`` counts the ops of a step that would make the host wait for a CUDA device, on any
build (CPU included).
"""

from imbalanced_losses.testing._adapter import queue_state, shard_state, whole_state_dict
from imbalanced_losses.testing._ddp_check import (
    assert_ddp_exact,
    check_ddp_exactness,
    check_many,
)
from imbalanced_losses.testing._host_syncs import SyncCounter
from imbalanced_losses.testing._plan import Case, Step, default_plan
from imbalanced_losses.testing._report import Check, DdpMismatch, DdpReport, NotChecked
from imbalanced_losses.testing._spawn import (
    NotEnoughGPUs,
    RankFailure,
    RanksInterrupted,
    RankTimeout,
    report_progress,
    run_ranks,
)

__all__ = [
    "Case",
    "Check",
    "DdpMismatch",
    "DdpReport",
    "NotChecked",
    "NotEnoughGPUs",
    "RankFailure",
    "RankTimeout",
    "RanksInterrupted",
    "Step",
    "SyncCounter",
    "assert_ddp_exact",
    "check_ddp_exactness",
    "check_many",
    "default_plan",
    "queue_state",
    "report_progress",
    "run_ranks",
    "shard_state",
    "whole_state_dict",
]
