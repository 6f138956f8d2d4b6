"""Turn what the ranks and the oracles recorded into named checks, and say what was not checked.

Every check has a fixed name, so a test can assert *which* promise a broken loss breaks:
``loss identical on every rank``, ``loss vs oracle``, ``DDP grads vs oracle``,
``<state> identical on every rank``, ``<state> vs oracle``, ``<state> frozen in eval`` (where
``<state>`` is ``queue`` for this package's losses and ``state`` for any other), ...
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any

from imbalanced_losses.testing._report import (
    Check,
    NotChecked,
    diff,
    magnitude,
    relative_diff,
)

if TYPE_CHECKING:
    from imbalanced_losses.testing._ddp_check import SegmentRun, StepRecord, _Oracle, _Setup

__all__ = ["compare_segment", "unchecked"]


def compare_segment(
    setup: _Setup, indices: list[int], per_rank: list[SegmentRun], oracle: _Oracle
) -> list[Check]:
    """Checks of each step of one segment, plus the agreement of the checkpoints it ends with."""
    checks = []
    previous_state = per_rank[0].start_state
    for k, i in enumerate(indices):
        ranks = [run.records[k] for run in per_rank]
        replay = oracle.replay(i, setup.case.plan[i], ranks[0].params)
        checks += _compare_step(setup, i, ranks, replay, oracle.free[i], previous_state)
        previous_state = ranks[0].state
    ends = [{k: v for k, v in run.checkpoint.items() if k != "loss"} for run in per_rank]
    error = max(diff(end, ends[0]) for end in ends)
    checks.append(
        Check(indices[-1], len(per_rank), "checkpoint identical on every rank", error, 0.0)
    )
    return checks


def _compare_step(
    setup: _Setup,
    i: int,
    ranks: list[StepRecord],
    replay: StepRecord,
    free: StepRecord,
    previous_state: Any,
) -> list[Check]:
    case, adapter = setup.case, setup.adapter
    step = case.plan[i]
    rtol = case.rtol
    exact = 0.0 if setup.backend != "nccl" else rtol  # CPU oracle vs GPU ranks: not bit for bit
    world_size = len(step.sizes)
    out: list[Check] = []

    def add(name: str, error: float, limit: float, scale: float = 0.0) -> None:
        out.append(Check(i, world_size, name, error, limit, scale))

    def across_ranks(values: list[Any]) -> float:
        return max(diff(v, values[0]) for v in values)

    edges = [0, *itertools.accumulate(step.sizes)]
    logits = max(
        relative_diff(r.logits, replay.logits[a:b]) for r, a, b in zip(ranks, edges, edges[1:])
    )
    add("logits vs oracle (same parameters)", logits, exact)
    add("loss identical on every rank", across_ranks([r.out for r in ranks]), 0.0)
    value = _unscaled(ranks[0].out, adapter.scale(world_size))
    add("loss vs oracle", relative_diff(value, replay.out), rtol)
    if step.train:
        add("grads identical on every rank", across_ranks([r.grads for r in ranks]), 0.0)
        scale = magnitude(replay.grads)
        add("DDP grads vs oracle", relative_diff(ranks[0].grads, replay.grads), rtol, scale)
    label = adapter.state_label
    if ranks[0].state is not None:
        add(f"{label} identical on every rank", across_ranks([r.state for r in ranks]), 0.0)
        if replay.state is not None:
            add(f"{label} vs oracle", relative_diff(ranks[0].state, replay.state), exact)
        if not step.train and not adapter.writes_state_in_eval:
            add(f"{label} frozen in eval", diff(ranks[0].state, previous_state), 0.0)
    add("params identical on every rank", across_ranks([r.params for r in ranks]), 0.0)
    add("params vs free-running oracle", relative_diff(ranks[0].params, free.params), rtol)
    add("loss vs free-running oracle", relative_diff(value, free.out), rtol)
    return out


def _unscaled(out: Any, factor: float) -> Any:
    if factor == 1.0:
        return out
    if isinstance(out, tuple):
        return tuple(t / factor for t in out)
    return out / factor


def unchecked(
    setup: _Setup, probe: Any, oracle_has_state: bool
) -> tuple[list[NotChecked], list[str]]:
    """What this case could not check, and the options that changed what was compared.

    ``probe`` is an instance of the case's loss, asked what it has.
    """
    case, adapter = setup.case, setup.adapter
    plan = case.plan
    label = adapter.state_label
    skipped: list[NotChecked] = []
    notes: list[str] = []

    def skip(name: str, reason: str) -> None:
        skipped.append(NotChecked(name, reason))

    has_state = adapter.state(probe) is not None
    if not has_state:
        for name in ("identical on every rank", "vs oracle", "frozen in eval"):
            skip(
                f"{label} {name}",
                "the loss has no state_dict() and no state accessor was given (state=...)",
            )
    else:
        if not oracle_has_state:
            skip(
                f"{label} vs oracle",
                "the oracle has no state to read (give oracle_state=... for it)",
            )
        if adapter.writes_state_in_eval:
            skip(f"{label} frozen in eval", "the loss writes its state in eval by design")
        elif all(step.train for step in plan):
            skip(f"{label} frozen in eval", "the plan has no eval step")
    if not any(step.train for step in plan):
        skip("DDP grads vs oracle", "the plan has no training step")
    if not adapter.takes_padding and any(step.pad_frac for step in plan):
        skip("padding rows", "the loss does not take them (takes_padding=False): no step pads")
    if not adapter.takes_sample_weight and any(step.weighted for step in plan):
        skip(
            "sample weights",
            "the loss's forward takes no sample_weight: weighted steps ran unweighted",
        )
    if len({len(step.sizes) for step in plan}) > 1 and not hasattr(probe, "state_dict"):
        skip(
            "resuming the loss's state",
            "the loss has no state_dict(): a new world starts it afresh",
        )
    if len({len(step.sizes) for step in plan}) == 1:
        skip("a checkpoint resumed at another world size", "the plan keeps one world size")
    if adapter.loss_scale == "world_size":
        notes.append(
            "the ranks' loss was divided by the world size before comparing with the oracle "
            "(loss_scale='world_size')"
        )
    if setup.backend == "nccl":
        notes.append(
            f"GPU ranks vs the CPU oracle: compared within rtol={case.rtol:g}, not bit for bit"
        )
    return skipped, notes
