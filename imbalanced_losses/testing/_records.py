"""What a step leaves behind, on a rank or on the oracle: plain CPU data, nothing that runs.

The bottom of the harness: the runner (``_ddp_check``) writes these records and the comparison
(``_compare``) reads them; this module imports neither. Everything in a record is a CPU copy
(:func:`cpu_copy`), so a record can cross from a rank to the parent and outlive the step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

__all__ = [
    "PER_RANK",
    "SegmentRun",
    "StateAccessor",
    "StepRecord",
    "cpu_copy",
    "is_empty",
    "per_rank_part",
    "replicated_part",
]

# Reads a loss's state: nested dicts, lists, tensors and numbers (None: it has none).
StateAccessor = Callable[[Any], Any]

# The key of a state's per-rank part (a sharded loss's queue shard): on a rank, that rank's
# part; on an oracle, a list with one part per rank. The rest of the state is replicated.
PER_RANK = "per_rank"


@dataclass(frozen=True)
class StepRecord:
    """What one step left behind, on a rank or on the oracle (all on CPU)."""

    out: Any  # the loss's output, detached
    logits: Tensor
    grads: list[Tensor] | None  # None on eval steps
    params: list[Tensor]  # after the optimiser step
    state: Any  # the loss's state after the step, as read by the case's accessor


@dataclass(frozen=True)
class SegmentRun:
    """One rank's run of a segment: its steps and what the next world resumes from."""

    records: list[StepRecord]
    start_state: Any  # the loss's state before the segment's first step
    checkpoint: dict[str, Any]


def cpu_copy(obj: Any) -> Any:
    """A detached CPU copy of every tensor in nested dicts, lists and tuples (the rest as is)."""
    if isinstance(obj, Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v) for v in obj)
    return obj


def is_empty(state: Any) -> bool:
    """Nothing to compare: no state, or containers that hold nothing (an empty state_dict)."""
    if state is None:
        return True
    if isinstance(state, dict):
        return all(is_empty(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return all(is_empty(v) for v in state)
    return False


def has_per_rank_part(state: Any) -> bool:
    """Whether ``state`` splits into a replicated part and a per-rank part (:data:`PER_RANK`)."""
    return isinstance(state, dict) and PER_RANK in state


def replicated_part(state: Any) -> Any:
    """``state`` without its per-rank part (the whole state when it has none)."""
    if not has_per_rank_part(state):
        return state
    return {k: v for k, v in state.items() if k != PER_RANK}


def per_rank_part(state: Any) -> Any:
    """The per-rank part of ``state`` (None when it has none)."""
    return state[PER_RANK] if has_per_rank_part(state) else None
