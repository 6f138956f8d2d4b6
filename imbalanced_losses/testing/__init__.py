"""Test tooling shipped with the package, so users can check their own losses under DDP.

``run_ranks`` spawns real rank processes (gloo or NCCL) and fails fast, with tracebacks and
stack dumps, instead of hanging. ``check_ddp_exactness`` trains a small float64 model under
DistributedDataParallel with a loss and compares every step with one process fed the global
batch: loss on every rank, DDP gradients, queues bit for bit, parameters.
"""

from imbalanced_losses.testing._ddp_check import (
    Case,
    Check,
    DdpMismatch,
    DdpReport,
    Step,
    check_ddp_exactness,
    check_many,
)
from imbalanced_losses.testing._spawn import NotEnoughGPUs, RankFailure, RankTimeout, run_ranks

__all__ = [
    "Case",
    "Check",
    "DdpMismatch",
    "DdpReport",
    "NotEnoughGPUs",
    "RankFailure",
    "RankTimeout",
    "Step",
    "check_ddp_exactness",
    "check_many",
    "run_ranks",
]
