"""Turn what the ranks and the oracles recorded into named checks, and say what was not checked.

A pure function of records (``_records``): nothing here runs a model or a loss. Every check has
a fixed name, so a test can assert *which* promise a broken loss breaks: ``loss identical on
every rank``, ``loss vs oracle``, ``DDP grads vs oracle``, ``state identical on every rank``,
``state vs oracle``, ``state frozen in eval``, ...

No vacuous pass: a state that is empty at every step is "not checked: state" (with the advice
to pass ``state=``) rather than compared as nothing, and a check whose compared values are 0 at
every step it ran (a gradient that never reaches the parameters) is "not checked ... not
informative", naming the plan steps, rather than ``ok``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from imbalanced_losses.testing._adapter import LossAdapter, split_sharded
from imbalanced_losses.testing._plan import Step
from imbalanced_losses.testing._records import (
    SegmentRun,
    StepRecord,
    has_per_rank_part,
    is_empty,
    per_rank_part,
    replicated_part,
)
from imbalanced_losses.testing._report import (
    Check,
    DdpReport,
    NotChecked,
    diff,
    magnitude,
    relative_diff,
)

__all__ = ["CaseRecords", "compare"]

SHARD_CHECK = "each rank's shard vs the oracle's shard of that rank"
STATE_CHECKS = (
    "state identical on every rank",
    "state vs oracle",
    "state frozen in eval",
    SHARD_CHECK,
)

# What a check compares, for the "not informative" reason: "<what> is 0 at every step".
_COMPARED = {
    "logits vs oracle (same parameters)": "the oracle's logits",
    "loss identical on every rank": "the loss",
    "loss vs oracle": "the oracle's loss",
    "grads identical on every rank": "the ranks' gradient",
    "DDP grads vs oracle": "the oracle's gradient",
    "state identical on every rank": "the state",
    "state vs oracle": "the oracle's state",
    "state frozen in eval": "the state",
    SHARD_CHECK: "the oracle's shards",
    "params identical on every rank": "the parameters",
    "params vs free-running oracle": "the free-running oracle's parameters",
    "loss vs free-running oracle": "the free-running oracle's loss",
    "checkpoint identical on every rank": "the checkpoint",
}


@dataclass(frozen=True)
class CaseRecords:
    """Everything one case recorded, indexed by plan step: what the comparison reads."""

    plan: Sequence[Step]
    segments: list[list[int]]  # the plan indices of each segment (one world size each)
    runs: list[list[SegmentRun]]  # runs[s][r]: rank r's run of segment s
    replay: list[StepRecord]  # the replaying oracle, from the ranks' parameters, at each step
    free: list[StepRecord]  # the free-running oracle at each step


def compare(records: CaseRecords, adapter: LossAdapter, *, rtol: float, backend: str) -> DdpReport:
    """The report of one case: every check of every step, what was not checked, and why."""
    exact = 0.0 if backend != "nccl" else rtol  # CPU oracle vs GPU ranks: not bit for bit
    states = [
        state
        for segment in records.runs
        for run in segment
        for state in (run.start_state, *(r.state for r in run.records))
    ]
    has_state = not all(is_empty(state) for state in states)
    oracle_has_state = not all(is_empty(r.state) for r in records.replay)
    per_rank = any(has_per_rank_part(state) for state in states)
    checks: list[Check] = []
    for indices, runs in zip(records.segments, records.runs):
        previous_states = [run.start_state for run in runs]
        for k, i in enumerate(indices):
            ranks = [run.records[k] for run in runs]
            checks += _step_checks(
                i,
                records.plan[i],
                ranks,
                records.replay[i],
                records.free[i],
                previous_states,
                adapter=adapter,
                rtol=rtol,
                exact=exact,
                compare_state=has_state,
                compare_oracle_state=oracle_has_state,
            )
            previous_states = [r.state for r in ranks]
        ends = [_replicated_checkpoint(run.checkpoint, per_rank) for run in runs]
        error = max(diff(end, ends[0]) for end in ends)
        name = "checkpoint identical on every rank"
        checks.append(Check(indices[-1], len(runs), name, error, 0.0, magnitude(ends[0])))
    checks, uninformative = _informative(checks)
    skipped, notes = _unchecked(
        records,
        adapter,
        rtol=rtol,
        backend=backend,
        has_state=has_state,
        oracle_has_state=oracle_has_state,
        states=states,
    )
    final_state = records.runs[-1][0].checkpoint
    return DdpReport(checks, final_state, skipped + uninformative, notes)


def _step_checks(
    i: int,
    step: Step,
    ranks: list[StepRecord],
    replay: StepRecord,
    free: StepRecord,
    previous_states: list[Any],
    *,
    adapter: LossAdapter,
    rtol: float,
    exact: float,
    compare_state: bool,
    compare_oracle_state: bool,
) -> list[Check]:
    """The checks of plan step ``i``: each rank's record against the others and the oracles."""
    world_size = len(step.sizes)
    out: list[Check] = []

    def add(name: str, error: float, limit: float, scale: float) -> None:
        out.append(Check(i, world_size, name, error, limit, scale))

    def across_ranks(values: list[Any]) -> float:
        return max(diff(v, values[0]) for v in values)

    edges = [0, *itertools.accumulate(step.sizes)]
    logits = max(
        relative_diff(r.logits, replay.logits[a:b]) for r, a, b in zip(ranks, edges, edges[1:])
    )
    add("logits vs oracle (same parameters)", logits, exact, magnitude(replay.logits))
    outs = [r.out for r in ranks]
    add("loss identical on every rank", across_ranks(outs), 0.0, magnitude(outs))
    value = _unscaled(ranks[0].out, adapter.scale(world_size))
    add("loss vs oracle", relative_diff(value, replay.out), rtol, magnitude(replay.out))
    if step.train:
        grads = [r.grads for r in ranks]
        add("grads identical on every rank", across_ranks(grads), 0.0, magnitude(grads))
        error = relative_diff(ranks[0].grads, replay.grads)
        add("DDP grads vs oracle", error, rtol, magnitude(replay.grads))
    if compare_state:
        # A per-rank part (a sharded loss's queue shard) is each rank's own: the ranks must
        # match on the rest, and each rank's part must match the oracle's part for that rank.
        replicated = [replicated_part(r.state) for r in ranks]
        add(
            "state identical on every rank",
            across_ranks(replicated),
            0.0,
            magnitude(replicated),
        )
        if compare_oracle_state:
            error = relative_diff(replicated[0], replicated_part(replay.state))
            add("state vs oracle", error, exact, magnitude(replicated_part(replay.state)))
            parts = per_rank_part(replay.state)
            if isinstance(parts, list) and len(parts) == world_size:
                error = max(
                    relative_diff(per_rank_part(r.state), part) for r, part in zip(ranks, parts)
                )
                add(SHARD_CHECK, error, exact, magnitude(parts))
        if not step.train and not adapter.writes_state_in_eval:
            error = max(diff(r.state, before) for r, before in zip(ranks, previous_states))
            add("state frozen in eval", error, 0.0, magnitude([ranks[0].state, *previous_states]))
    params = [r.params for r in ranks]
    add("params identical on every rank", across_ranks(params), 0.0, magnitude(params))
    error = relative_diff(ranks[0].params, free.params)
    add("params vs free-running oracle", error, rtol, magnitude(free.params))
    add("loss vs free-running oracle", relative_diff(value, free.out), rtol, magnitude(free.out))
    return out


def _replicated_checkpoint(checkpoint: dict[str, Any], per_rank: bool) -> dict[str, Any]:
    """What every rank's checkpoint must hold alike: all of it (the loss's bytes aside), or,
    for a loss with per-rank state, all but its queue shard (``split_sharded``)."""
    kept = {k: v for k, v in checkpoint.items() if k != "loss"}
    if per_rank and isinstance(kept.get("loss_state"), dict):
        kept["loss_state"] = replicated_part(split_sharded(kept["loss_state"]))
    return kept


def _unscaled(out: Any, factor: float) -> Any:
    if factor == 1.0:
        return out
    if isinstance(out, tuple):
        return tuple(t / factor for t in out)
    return out / factor


def _informative(checks: list[Check]) -> tuple[list[Check], list[NotChecked]]:
    """Move each passing check whose compared values are 0 at every step it ran to the list of
    what was not checked: agreeing on zeros proves nothing (a failing one stays a failure)."""
    dropped: list[NotChecked] = []
    for name in dict.fromkeys(c.name for c in checks):
        group = [c for c in checks if c.name == name]
        if all(c.scale == 0.0 for c in group) and all(c.ok for c in group):
            steps = sorted({c.step for c in group})
            shown = ", ".join(map(str, steps[:10])) + (", ..." if len(steps) > 10 else "")
            what = _COMPARED.get(name, "what it compares")
            plural = "s" if len(steps) > 1 else ""
            dropped.append(
                NotChecked(
                    name,
                    f"it is not informative: {what} is 0 at every step it ran "
                    f"(plan step{plural} {shown})",
                )
            )
    zero_names = {n.name for n in dropped}
    kept = [c for c in checks if c.name not in zero_names]
    return kept, dropped


def _unchecked(
    records: CaseRecords,
    adapter: LossAdapter,
    *,
    rtol: float,
    backend: str,
    has_state: bool,
    oracle_has_state: bool,
    states: list[Any],
) -> tuple[list[NotChecked], list[str]]:
    """What this case could not check, and the options that changed what was compared."""
    plan = records.plan
    skipped: list[NotChecked] = []
    notes: list[str] = []

    def skip(name: str, reason: str) -> None:
        skipped.append(NotChecked(name, reason))

    if not has_state:
        if not adapter.state_is_default:
            reason = "the state accessor (state=...) returned nothing at every step"
        elif all(state is None for state in states):
            reason = "the loss has no state_dict(); pass state=... to read its memory"
        else:
            reason = (
                "the loss's state_dict() is empty; pass state=... (a function returning "
                "what the loss keeps between steps, e.g. memory in plain tensor attributes, "
                "which a checkpoint would not save either)"
            )
        skip("state", reason)
    else:
        if not oracle_has_state:
            skip(
                "state vs oracle",
                "the oracle has no state to read (give oracle_state=... for it)",
            )
        per_rank = any(has_per_rank_part(state) for state in states)
        if per_rank:
            notes.append(
                "per-rank state (a sharded loss's queue shard): 'state identical on every rank' "
                "and 'state vs oracle' compare the rest of the state; each rank's shard is "
                "compared with the oracle's shard of that rank"
            )
            parts = [per_rank_part(r.state) for r in records.replay]
            if oracle_has_state and not all(
                isinstance(p, list) and len(p) == len(step.sizes) for p, step in zip(parts, plan)
            ):
                skip(
                    SHARD_CHECK,
                    "the oracle keeps no shard per rank; pass an oracle of the same shards "
                    "(oracle_factory=reference.ShardedReference(...), state=shard_state)",
                )
        if adapter.writes_state_in_eval:
            skip("state frozen in eval", "the loss writes its state in eval by design")
        elif all(step.train for step in plan):
            skip("state frozen in eval", "the plan has no eval step")
    if not any(step.train for step in plan):
        skip("DDP grads vs oracle", "the plan has no training step")
    if not adapter.takes_padding and any(step.pad_frac for step in plan):
        skip("padding rows", "the loss does not take them (takes_padding=False): no step pads")
    if not adapter.takes_sample_weight and any(step.weighted for step in plan):
        skip(
            "sample weights",
            "the loss's forward takes no sample_weight: weighted steps ran unweighted",
        )
    if len(records.segments) > 1 and records.runs[0][0].checkpoint["loss"] is None:
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
    if backend == "nccl":
        notes.append(f"GPU ranks vs the CPU oracle: compared within rtol={rtol:g}, not bit for bit")
    return skipped, notes
