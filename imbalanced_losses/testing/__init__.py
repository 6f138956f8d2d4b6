"""Test tooling shipped with the package, so users can check their own losses under DDP.

``run_ranks`` spawns real rank processes (gloo or NCCL) and fails fast, with tracebacks and
stack dumps, instead of hanging.
"""

from imbalanced_losses.testing._spawn import NotEnoughGPUs, RankFailure, RankTimeout, run_ranks

__all__ = ["NotEnoughGPUs", "RankFailure", "RankTimeout", "run_ranks"]
