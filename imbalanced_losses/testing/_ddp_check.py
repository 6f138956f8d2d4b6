"""Check a queued ranking loss under real DDP against a single-process float64 oracle.

The promise being checked: training with the loss under DistributedDataParallel
is *the same computation* as one process fed the concatenated global batch. So the check trains
a small seeded float64 model (``nn.Linear`` on seeded features, SGD with momentum) on real ranks
under DDP and compares every step with single-process runs on the global batch in rank order:

* the loss: bit-identical on every rank, and equal to the oracle's;
* the gradients DDP leaves on the parameters: equal to the oracle's within ``rtol``;
* the loss's queue (``.queue.scores/targets/weights``, ``ptr``, ``count``): bit-identical on
  every rank, equal to the oracle's, and untouched by eval steps;
* the parameters: identical on every rank, and equal to a free-running oracle's after each
  optimiser step.

Two oracles, because one cannot be both exact and independent: the *replay* recomputes each
step from the very parameters the ranks had before it, so the loss sees bit-identical inputs and
any difference in value or queue is the loss's fault; the *free run* trains on its own, so the
parameters are checked over several steps of a trajectory that never saw the ranks.

Each step of the plan says how many rows every rank gets (uneven, even zero), so the world size
is ``len(step.sizes)``. A plan whose world size changes between steps is a checkpoint test: the
ranks save ``loss.state_dict()`` (and the model's and optimiser's), a new world of the next size
loads it (``torch.load(weights_only=True)``) and carries on, and the oracles never stop.
With NCCL the (CPU) oracle is compared within ``rtol`` instead of bit for bit.

Example, for your own subclass of ``QueuedRankingLoss``::

    from functools import partial
    from imbalanced_losses.testing import Step, check_ddp_exactness

    plan = [Step((5, 3)), Step((0, 7), pad_frac=0.3), Step((4, 4), weighted=True, train=False)]
    check_ddp_exactness(partial(MyLoss, 3, queue_size=8), plan).raise_if_failed()

(``MyLoss`` must be importable by name: every rank is a fresh process.)
"""

from __future__ import annotations

import contextlib
import io
import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from imbalanced_losses.testing._report import (
    Check,
    DdpMismatch,
    DdpReport,
    diff,
    magnitude,
    relative_diff,
)
from imbalanced_losses.testing._spawn import run_ranks

__all__ = ["Case", "Check", "DdpMismatch", "DdpReport", "Step", "check_ddp_exactness", "check_many"]


@dataclass(frozen=True)
class Step:
    """One training (or eval) step: ``sizes[r]`` rows for rank ``r``.

    ``pad_frac`` of the rows get ``ignore_index`` targets; ``weighted`` passes a non-negative
    ``sample_weight`` (some zeros); ``train=False`` runs the step in ``eval()`` mode without
    backward; ``kwargs`` go to the loss's forward (e.g. ``{"return_per_class": True}``).
    """

    sizes: tuple[int, ...]
    pad_frac: float = 0.0
    weighted: bool = False
    train: bool = True
    kwargs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Case:
    """One check: a loss, a plan and the training layout (see :func:`check_ddp_exactness`)."""

    loss_factory: Callable[[], Any]
    plan: Sequence[Step]
    loss_inside_ddp: bool = False
    broadcast_buffers: bool = True
    local_ce_weight: float = 0.0
    oracle_factory: Callable[[], Any] | None = None
    in_features: int = 5
    lr: float = 0.5
    seed: int = 0
    rtol: float = 1e-9


@dataclass(frozen=True)
class _Setup:
    """What a rank needs to rebuild a case (the plan travels separately, segment by segment)."""

    case: Case
    num_classes: int
    ignore_index: int
    backend: str


def check_ddp_exactness(
    loss_factory: Callable[[], Any],
    plan: Sequence[Step],
    *,
    backend: str = "gloo",
    timeout_s: float = 180.0,
    **options: Any,
) -> DdpReport:
    """Run ``plan`` under DDP and on the single-process oracle; return the per-step report.

    ``loss_factory()`` builds the loss (a picklable callable, e.g. ``functools.partial`` of the
    class; leave ``gather_distributed`` on auto); it is cast to float64. Options (fields of
    :class:`Case`): ``oracle_factory`` (default: the same factory) builds the single-process
    loss, e.g. a plain reference implementation; ``loss_inside_ddp`` puts the loss inside the
    DDP-wrapped module; ``broadcast_buffers`` is DDP's option; ``local_ce_weight`` adds a
    per-rank cross-entropy (sum over the rank's rows / its row count), which DDP's average
    turns into the global mean only for equal per-rank batches, so it requires them;
    ``rtol`` bounds the relative error of values and gradients against the oracle.
    """
    case = Case(loss_factory, plan, **options)
    return check_many([case], backend=backend, timeout_s=timeout_s)[0]


def check_many(
    cases: Sequence[Case], *, backend: str = "gloo", timeout_s: float = 180.0
) -> list[DdpReport]:
    """Like :func:`check_ddp_exactness` for several cases, sharing spawned worlds.

    Spawning ranks costs seconds; the n-th segment of every case with the same world size runs
    in one spawned world, one case after the other.
    """
    setups, segments, oracles, probes = [], [], [], []
    for case in cases:
        if not case.plan:
            raise ValueError("a plan must hold at least one Step")
        for i, step in enumerate(case.plan):
            if case.local_ce_weight and len(set(step.sizes)) != 1:
                raise ValueError(
                    f"step {i}: local_ce_weight needs equal per-rank sizes, got {step.sizes}"
                )
        probe = _as_float64(case.loss_factory())
        ignore_index = int(getattr(probe, "ignore_index", -100))
        setup = _Setup(case, int(probe.num_classes), ignore_index, backend)
        setups.append(setup)
        probes.append(probe)
        oracles.append(_Oracle(setup, case.oracle_factory or case.loss_factory))
        groups = itertools.groupby(enumerate(case.plan), key=lambda item: len(item[1].sizes))
        segments.append([[i for i, _ in group] for _, group in groups])

    checks: list[list[Check]] = [[] for _ in cases]
    states: list[Any] = [None] * len(cases)
    for round_ in range(max(len(s) for s in segments)):
        worlds: dict[int, list[int]] = {}
        for c, segs in enumerate(segments):
            if round_ < len(segs):
                worlds.setdefault(len(cases[c].plan[segs[round_][0]].sizes), []).append(c)
        for world_size, members in sorted(worlds.items()):
            jobs = [
                (
                    setups[c],
                    segments[c][round_][0],
                    [cases[c].plan[i] for i in segments[c][round_]],
                    states[c],
                )
                for c in members
            ]
            results = run_ranks(
                _rank_jobs, world_size, backend=backend, timeout_s=timeout_s, args=(jobs,)
            )
            for j, c in enumerate(members):
                per_rank = [r[j] for r in results]
                checks[c] += _compare_segment(
                    setups[c], segments[c][round_], per_rank, oracles[c], probes[c]
                )
                states[c] = per_rank[0][1]
    return [DdpReport(ch, final_state=st or {}) for ch, st in zip(checks, states)]


# ----------------------------------------------------------------------------- the runs


def _rank_jobs(rank: int, jobs: list) -> list:
    """Body of one rank: run each case's segment in turn in this process group."""
    return [_rank_segment(rank, *job) for job in jobs]


def _rank_segment(rank: int, setup: _Setup, first: int, steps: list[Step], state: Any) -> Any:
    """DDP training over ``steps``; returns per-step records and the end state to resume from."""
    device = torch.device("cuda", rank) if setup.backend == "nccl" else torch.device("cpu")
    model, loss_fn, optimizer = _build(setup, setup.case.loss_factory, device)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optim"])
        loss_fn.load_state_dict(torch.load(io.BytesIO(state["loss"]), weights_only=True))
    net = _Net(model, loss_fn if setup.case.loss_inside_ddp else None)
    ddp = DistributedDataParallel(
        net,
        device_ids=[rank] if device.type == "cuda" else None,
        broadcast_buffers=setup.case.broadcast_buffers,
    )
    records = []
    for i, step in enumerate(steps, start=first):
        x, y, w = _batch(setup, i, step, device)
        lo = sum(step.sizes[:rank])
        rows = slice(lo, lo + step.sizes[rank])
        x, y, w = x[rows], y[rows], (None if w is None else w[rows])

        def forward(x=x, y=y, w=w, kwargs=step.kwargs):
            if setup.case.loss_inside_ddp:
                return ddp(x, y, w, dict(kwargs))
            logits = ddp(x)
            return logits, loss_fn(logits, y, sample_weight=w, **kwargs)

        records.append(
            _train_step(setup, step, forward, (ddp, loss_fn), loss_fn, model, optimizer, y)
        )
    buffer = io.BytesIO()
    torch.save(loss_fn.state_dict(), buffer)
    end = {
        "model": _cpu(model.state_dict()),
        "optim": _cpu(optimizer.state_dict()),
        "loss": buffer.getvalue(),
        "loss_state": _cpu(loss_fn.state_dict()),
    }
    return records, end


class _Oracle:
    """The single-process side of a case: CPU, one thread (the ranks' BLAS path), float64.

    Two runs. The *replay* recomputes each step on the global batch with the very parameters
    the ranks had before that step, so everything the loss sees is bit-identical to what the
    ranks fed it, and its value and queue must be too (the DDP gradient differs only by the
    order of a float64 sum over ranks: ``rtol``); its loss object runs on across checkpoints.
    The *free run* trains its own model from the same start, so the parameters after several
    optimiser steps are compared with a trajectory that never saw the ranks.
    """

    def __init__(self, setup: _Setup, factory: Callable[[], Any]) -> None:
        self.setup = setup
        with _one_thread():
            model, loss_fn, optimizer = _build(setup, factory, torch.device("cpu"))
            self.free = [
                _single_process_step(setup, i, step, model, loss_fn, optimizer)
                for i, step in enumerate(setup.case.plan)
            ]
        self.model, self.loss_fn, _ = _build(setup, factory, torch.device("cpu"))
        self.params = [p.detach().clone() for p in self.model.parameters()]
        self.replayed: list[dict] = []

    def replay(self, i: int, step: Step, params_after: list[Tensor]) -> dict:
        """Step ``i`` from the ranks' parameters; remember theirs after it for the next step."""
        with torch.no_grad():
            for p, value in zip(self.model.parameters(), self.params):
                p.copy_(value)
        with _one_thread():
            record = _single_process_step(self.setup, i, step, self.model, self.loss_fn, None)
        self.params = params_after
        self.replayed.append(record)
        return record


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks run one thread each: same BLAS path, same bits
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _single_process_step(setup, i, step, model, loss_fn, optimizer) -> dict:
    """Step ``i`` on the global batch, logits computed on the ranks' row blocks in rank order."""
    x, y, w = _batch(setup, i, step, torch.device("cpu"))
    edges = [0, *itertools.accumulate(step.sizes)]

    def forward() -> tuple[Tensor, Any]:
        logits = torch.cat([model(x[a:b]) for a, b in zip(edges, edges[1:])])
        return logits, loss_fn(logits, y, sample_weight=w, **step.kwargs)

    return _train_step(setup, step, forward, (model, loss_fn), loss_fn, model, optimizer, y)


def _train_step(setup, step, forward, modules, loss_fn, model, optimizer, y) -> dict:
    """One step, identical for ranks and oracle; records what the comparison needs."""
    for module in modules:
        module.train(step.train)
    params = list(model.parameters())
    for p in params:
        p.grad = None
    with torch.set_grad_enabled(step.train):
        logits, out = forward()
        if step.train:
            total = _scalar(out)
            if setup.case.local_ce_weight:
                total = total + setup.case.local_ce_weight * _local_ce(logits, y, setup)
            total.backward()
            if optimizer is not None:
                optimizer.step()
    return {
        "out": _cpu(_detach(out)),
        "logits": logits.detach().cpu(),
        "grads": [p.grad.detach().cpu().clone() for p in params] if step.train else None,
        "params": [p.detach().cpu().clone() for p in params],
        "queue": _queue_state(loss_fn),
    }


# ------------------------------------------------------------------------------ pieces


class _Net(nn.Module):
    """What DDP wraps: the model, and optionally the loss (the 'loss inside DDP' layout)."""

    def __init__(self, model: nn.Module, loss_fn: nn.Module | None) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(
        self,
        x: Tensor,
        y: Tensor | None = None,
        w: Tensor | None = None,
        kwargs: dict | None = None,
    ) -> Any:
        logits = self.model(x)
        if self.loss_fn is None:
            return logits
        return logits, self.loss_fn(logits, y, sample_weight=w, **(kwargs or {}))


def _build(setup: _Setup, factory: Callable[[], Any], device: torch.device) -> tuple:
    gen = torch.Generator().manual_seed(setup.case.seed)
    model = nn.Linear(setup.case.in_features, setup.num_classes, dtype=torch.float64)
    with torch.no_grad():
        model.weight.copy_(torch.randn(model.weight.shape, generator=gen, dtype=torch.float64))
        model.bias.copy_(0.1 * torch.randn(model.bias.shape, generator=gen, dtype=torch.float64))
    model = model.to(device)
    loss_fn = _as_float64(factory())
    if isinstance(loss_fn, nn.Module):
        loss_fn = loss_fn.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=setup.case.lr, momentum=0.9)
    return model, loss_fn, optimizer


def _batch(setup: _Setup, index: int, step: Step, device: torch.device) -> tuple:
    """The global batch of step ``index`` (rank ``r`` takes rows ``sizes[:r]`` onwards)."""
    gen = torch.Generator().manual_seed(setup.case.seed * 1_000_003 + index)
    n = sum(step.sizes)
    x = torch.randn(n, setup.case.in_features, generator=gen, dtype=torch.float64)
    if setup.num_classes == 1:
        y = (torch.rand(n, generator=gen) < 0.3).long()
    else:
        y = torch.randint(0, setup.num_classes, (n,), generator=gen)
    y = torch.where(torch.rand(n, generator=gen) < step.pad_frac, setup.ignore_index, y)
    w = None
    if step.weighted:
        w = 2 * torch.rand(n, generator=gen, dtype=torch.float64)
        w = torch.where(torch.rand(n, generator=gen) < 0.2, 0.0, w).to(device)
    return x.to(device), y.to(device), w


def _local_ce(logits: Tensor, y: Tensor, setup: _Setup) -> Tensor:
    """Cross-entropy summed over this block's counted rows, divided by the block's row count."""
    keep = y != setup.ignore_index
    if setup.num_classes == 1:
        terms = F.binary_cross_entropy_with_logits(
            logits[:, 0], y.clamp(0, 1).to(logits.dtype), reduction="none"
        )
        total = (terms * keep).sum()
    else:
        total = F.cross_entropy(logits, y, ignore_index=setup.ignore_index, reduction="sum")
    return total / max(y.shape[0], 1)


def _as_float64(loss_fn: Any) -> Any:
    return loss_fn.double() if isinstance(loss_fn, nn.Module) else loss_fn


def _scalar(out: Any) -> Tensor:
    """What to backpropagate: the loss, or the sum of its finite per-class entries ('none')."""
    loss = out[0] if isinstance(out, tuple) else out
    return torch.where(torch.isnan(loss), 0.0, loss).sum() if loss.dim() else loss


def _queue_state(loss_fn: Any) -> tuple | None:
    q = getattr(loss_fn, "queue", loss_fn)
    if not hasattr(q, "scores"):
        return None
    return (
        q.scores.detach().cpu().clone(),
        q.targets.detach().cpu().clone(),
        q.weights.detach().cpu().clone(),
        int(q.ptr),
        int(q.count),
    )


def _detach(out: Any) -> Any:
    return tuple(t.detach() for t in out) if isinstance(out, tuple) else out.detach()


def _cpu(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj


# ------------------------------------------------------------------------- comparison


def _compare_segment(setup, indices, per_rank, oracle, probe) -> list[Check]:
    """Checks of each step of one segment, plus the agreement of the states it ends with."""
    checks = []
    for k, i in enumerate(indices):
        ranks = [records[k] for records, _ in per_rank]
        previous_queue = oracle.replayed[-1]["queue"] if oracle.replayed else None
        step = setup.case.plan[i]
        replay = oracle.replay(i, step, ranks[0]["params"])
        checks += _compare(setup, i, step, ranks, replay, oracle.free[i], previous_queue, probe)
    states = [_no_bytes(state) for _, state in per_rank]
    error = max(diff(s, states[0]) for s in states)
    checks.append(
        Check(indices[-1], len(per_rank), "checkpoint identical on every rank", error, 0.0)
    )
    return checks


def _compare(setup, i, step, ranks, replay, free, previous_queue, probe) -> list[Check]:
    rtol = setup.case.rtol
    exact = 0.0 if setup.backend != "nccl" else rtol  # CPU oracle vs GPU ranks: not bit for bit
    out = []

    def add(name: str, error: float, limit: float, scale: float = 0.0) -> None:
        out.append(Check(i, len(step.sizes), name, error, limit, scale))

    def across_ranks(key: str) -> float:
        return max(diff(r[key], ranks[0][key]) for r in ranks)

    edges = [0, *itertools.accumulate(step.sizes)]
    slices = zip(ranks, edges, edges[1:])
    logits = max(relative_diff(r["logits"], replay["logits"][a:b]) for r, a, b in slices)
    add("logits vs oracle (same parameters)", logits, exact)
    add("loss identical on every rank", across_ranks("out"), 0.0)
    add("loss vs oracle", relative_diff(ranks[0]["out"], replay["out"]), rtol)
    if step.train:
        add("grads identical on every rank", across_ranks("grads"), 0.0)
        scale = magnitude(replay["grads"])
        add("DDP grads vs oracle", relative_diff(ranks[0]["grads"], replay["grads"]), rtol, scale)
    if replay["queue"] is not None and ranks[0]["queue"] is not None:
        add("queue identical on every rank", across_ranks("queue"), 0.0)
        add("queue vs oracle", relative_diff(ranks[0]["queue"], replay["queue"]), exact)
        frozen = not step.train and not getattr(probe, "update_queue_in_eval", False)
        if frozen and previous_queue is not None:
            add("queue frozen in eval", diff(ranks[0]["queue"], previous_queue), 0.0)
    add("params identical on every rank", across_ranks("params"), 0.0)
    add("params vs free-running oracle", relative_diff(ranks[0]["params"], free["params"]), rtol)
    add("loss vs free-running oracle", relative_diff(ranks[0]["out"], free["out"]), rtol)
    return out


def _no_bytes(state: dict) -> dict:
    return {k: v for k, v in state.items() if not isinstance(v, bytes)}
