"""Check a loss under real DDP against a single-process float64 oracle.

The promise being checked: training with the loss under DistributedDataParallel is *the same
computation* as one process fed the concatenated global batch. So the check trains a small
seeded float64 model (``nn.Linear`` on seeded features, SGD with momentum) on real ranks under
DDP and compares every step with single-process runs on the global batch in rank order:

* the loss: bit-identical on every rank, and equal to the oracle's;
* the gradients DDP leaves on the parameters: equal to the oracle's within ``rtol``;
* the loss's state (by default its whole ``state_dict()`` with extra state, for every loss):
  bit-identical on every rank after every step, equal to the oracle's, and untouched by eval
  steps unless the loss writes it in eval by design;
* the parameters: identical on every rank, and equal to a free-running oracle's after each
  optimiser step.

Two oracles, because one cannot be both exact and independent: the *replay* recomputes each
step from the very parameters the ranks had before it, so the loss sees bit-identical inputs and
any difference in value or state is the loss's fault; the *free run* trains on its own, so the
parameters are checked over several steps of a trajectory that never saw the ranks.

A plan whose world size changes between steps is a checkpoint test: the ranks save
``loss.state_dict()`` (and the model's and optimiser's), a new world of the next size loads it
(``torch.load(weights_only=True)``) and carries on, and the oracles never stop. With NCCL the
(CPU) oracle is compared within ``rtol`` instead of bit for bit.

This module runs things (ranks, oracles) and records what each step left (``_records``); the
comparison of those records (``_compare``) runs nothing.

Example (``MyLoss`` must be importable by name: every rank is a fresh process)::

    from functools import partial
    from imbalanced_losses.testing import Step, check_ddp_exactness

    plan = [Step((5, 3)), Step((0, 7), pad_frac=0.3), Step((4, 4), weighted=True, train=False)]
    check_ddp_exactness(partial(MyLoss, 3, queue_size=8), plan).raise_if_failed()
"""

from __future__ import annotations

import contextlib
import inspect
import io
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from imbalanced_losses.testing._adapter import LossAdapter, as_float64, to_device
from imbalanced_losses.testing._compare import CaseRecords, compare
from imbalanced_losses.testing._plan import Case, Step, default_plan, make_batch, segments
from imbalanced_losses.testing._records import SegmentRun, StateAccessor, StepRecord, cpu_copy
from imbalanced_losses.testing._report import DdpMismatch, DdpReport
from imbalanced_losses.testing._spawn import report_progress, run_ranks

__all__ = [
    "Case",
    "DdpMismatch",
    "DdpReport",
    "Step",
    "assert_ddp_exact",
    "check_ddp_exactness",
    "check_many",
]

DEFAULT_TIMEOUT_S = 60.0  # without progress from any rank; a healthy step takes well under 1 s


@dataclass(frozen=True)
class _Setup:
    """What a rank needs to rebuild a case (the plan travels separately, segment by segment)."""

    case: Case
    adapter: LossAdapter
    backend: str


def check_ddp_exactness(
    loss_factory: Callable[[], Any],
    plan: Sequence[Step],
    *,
    backend: str = "gloo",
    timeout_s: float = DEFAULT_TIMEOUT_S,
    **options: Any,
) -> DdpReport:
    """Run ``plan`` under DDP and on the single-process oracle; return the per-step report.

    ``loss_factory()`` builds the loss: any ``nn.Module`` or callable taking
    ``(logits, targets, **step.kwargs)``; a picklable callable, e.g. ``functools.partial`` of a
    module-level class. It is cast to float64. Options (fields of :class:`Case`):

    * ``num_classes`` / ``ignore_index``: the model's output width and label range, and the
      padding label, for a loss without these attributes (default ``ignore_index`` -100);
    * ``takes_padding=False``: the loss has no padding label, so no step pads;
      ``takes_sample_weight`` (default: whether its forward accepts ``sample_weight``);
    * ``state`` / ``oracle_state``: picklable accessors returning the loss's state (nested
      dicts, lists, tensors, numbers), by default the whole ``state_dict()`` with extra state,
      for every loss (``state=queue_state`` compares only the queue, e.g. with the plain
      reference implementation as the oracle); an empty state is reported as not checked.
      A state dict with a ``"per_rank"`` key holds a per-rank part (a sharded loss's queue
      shard: the default splits it, ``state=shard_state`` reads only it): the ranks must
      match on the rest, and each rank's part must equal the oracle's ``"per_rank"[rank]``;
    * ``writes_state_in_eval=True``: the loss writes its state in eval by design (default:
      a ``QueuedRankingLoss``'s ``update_queue_in_eval``, else False);
    * ``loss_scale="world_size"``: the ranks' loss value is world_size times the oracle's
      (a wrapper that multiplies by the world size so that DDP's average gives the sum);
    * ``oracle_factory`` (default: the same factory): the single-process loss, e.g. a plain
      reference implementation. An oracle with a ``set_rank_sizes(sizes)`` method is told
      each step's per-rank row counts (``step.sizes``, padding rows included) before the
      step: an oracle of per-rank state needs them (``reference.ShardedReference``, the
      queue shards of a ``sharded=True`` loss);
    * ``loss_inside_ddp``, ``broadcast_buffers``: the layout under DDP;
    * ``local_ce_weight``: adds a per-rank cross-entropy (equal per-rank batches only);
    * ``rtol``: the relative error allowed against the oracle.

    Raises ``RankFailure`` naming the rank that failed first and the plan step it was at, or
    ``RankTimeout`` with every rank's stack when no rank made progress for ``timeout_s``.
    """
    case = Case(loss_factory, plan, **options)
    return check_many([case], backend=backend, timeout_s=timeout_s)[0]


def assert_ddp_exact(
    loss_factory: Callable[[], Any],
    plan: Sequence[Step] | None = None,
    *,
    backend: str = "gloo",
    timeout_s: float = DEFAULT_TIMEOUT_S,
    **options: Any,
) -> DdpReport:
    """For a test suite: check the loss (by default on :func:`default_plan`) and raise
    :class:`DdpMismatch` with the report if any check failed. Returns the report, whose
    ``not_checked`` lists what could not be checked for this loss."""
    report = check_ddp_exactness(
        loss_factory,
        default_plan() if plan is None else plan,
        backend=backend,
        timeout_s=timeout_s,
        **options,
    )
    report.raise_if_failed()
    return report


def check_many(
    cases: Sequence[Case], *, backend: str = "gloo", timeout_s: float = DEFAULT_TIMEOUT_S
) -> list[DdpReport]:
    """Like :func:`check_ddp_exactness` for several cases, sharing spawned worlds.

    Spawning ranks costs seconds; the n-th segment of every case with the same world size runs
    in one spawned world, one case after the other.
    """
    setups, plans, oracles = [], [], []
    for case in cases:
        _validate(case)
        probe = as_float64(case.loss_factory())
        setup = _Setup(case, LossAdapter.for_case(case, probe), backend)
        setups.append(setup)
        oracles.append(_Oracle(setup, case.oracle_factory or case.loss_factory))
        plans.append(segments(case.plan))

    runs: list[list[list[SegmentRun]]] = [[] for _ in cases]  # [case][segment][rank]
    replays: list[list[StepRecord]] = [[] for _ in cases]  # [case][plan step]
    for round_ in range(max(len(p) for p in plans)):
        worlds: dict[int, list[int]] = {}
        for c, segs in enumerate(plans):
            if round_ < len(segs):
                worlds.setdefault(len(cases[c].plan[segs[round_][0]].sizes), []).append(c)
        for world_size, members in sorted(worlds.items()):
            previous = [runs[c][-1][0].checkpoint if runs[c] else None for c in members]
            jobs = [(setups[c], plans[c][round_], ckpt) for c, ckpt in zip(members, previous)]
            results = run_ranks(
                _rank_jobs, world_size, backend=backend, timeout_s=timeout_s, args=(jobs,)
            )
            for j, c in enumerate(members):
                per_rank = [r[j] for r in results]
                runs[c].append(per_rank)
                for k, i in enumerate(plans[c][round_]):
                    params_after = per_rank[0].records[k].params
                    replays[c].append(oracles[c].replay(i, cases[c].plan[i], params_after))
    return [
        compare(
            CaseRecords(setup.case.plan, segs, case_runs, replay, oracle.free),
            setup.adapter,
            rtol=setup.case.rtol,
            backend=backend,
        )
        for setup, segs, case_runs, replay, oracle in zip(setups, plans, runs, replays, oracles)
    ]


def _validate(case: Case) -> None:
    if not case.plan:
        raise ValueError("plan: must hold at least one Step, got an empty plan")
    for i, step in enumerate(case.plan):
        if case.local_ce_weight and len(set(step.sizes)) != 1:
            raise ValueError(
                f"local_ce_weight: step {i} has per-rank sizes {step.sizes}; "
                "a per-rank cross-entropy needs equal per-rank sizes"
            )


# ----------------------------------------------------------------------------- the ranks


_Job = tuple[_Setup, list[int], dict[str, Any] | None]  # a case, its segment, its resume point


def _rank_jobs(rank: int, jobs: list[_Job]) -> list[SegmentRun]:
    """Body of one rank: run each case's segment in turn in this process group."""
    return [_rank_segment(rank, *job) for job in jobs]


def _rank_segment(
    rank: int, setup: _Setup, indices: list[int], checkpoint: dict[str, Any] | None
) -> SegmentRun:
    """DDP training over the plan steps ``indices``; records each step and the end state."""
    case, adapter = setup.case, setup.adapter
    device = torch.device("cuda", rank) if setup.backend == "nccl" else torch.device("cpu")
    report_progress(
        f"building the loss and model before {case.plan[indices[0]].describe(indices[0])}"
    )
    model, loss_fn, optimizer = _build(setup, case.loss_factory, device)
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optim"])
        if checkpoint["loss"] is not None:
            loss_fn.load_state_dict(torch.load(io.BytesIO(checkpoint["loss"]), weights_only=True))
    start_state = adapter.state(loss_fn)
    net = _Net(model, loss_fn if case.loss_inside_ddp else None, adapter)
    ddp = _wrap_ddp(net, device, case.broadcast_buffers)
    records = []
    for i in indices:
        step = case.plan[i]
        report_progress(step.describe(i))
        x, y, w = make_batch(case, adapter, i, step, device)
        lo = sum(step.sizes[:rank])
        rows = slice(lo, lo + step.sizes[rank])
        x, y, w = x[rows], y[rows], (None if w is None else w[rows])

        def forward(
            x: Tensor = x, y: Tensor = y, w: Tensor | None = w, kwargs: Any = step.kwargs
        ) -> tuple[Tensor, Any]:
            if case.loss_inside_ddp:
                return ddp(x, y, w, dict(kwargs))
            logits = ddp(x)
            return logits, adapter.call(loss_fn, logits, y, w, kwargs)

        records.append(
            _train_step(
                setup,
                step,
                forward=forward,
                modules=(ddp, loss_fn),
                model=model,
                optimizer=optimizer,
                targets=y,
                read_state=lambda: adapter.state(loss_fn),
            )
        )
    report_progress(f"saving the checkpoint after {case.plan[indices[-1]].describe(indices[-1])}")
    return SegmentRun(records, start_state, _checkpoint(model, optimizer, loss_fn))


def _checkpoint(model: nn.Module, optimizer: Any, loss_fn: Any) -> dict[str, Any]:
    """What the next world resumes from: the loss's ``state_dict()`` goes as the bytes of
    ``torch.save`` (``loss``, None for a loss without one), to be read with ``weights_only``."""
    loss_bytes, loss_state = None, None
    if hasattr(loss_fn, "state_dict"):
        loss_state = cpu_copy(loss_fn.state_dict())
        buffer = io.BytesIO()
        torch.save(loss_fn.state_dict(), buffer)
        loss_bytes = buffer.getvalue()
    return {
        "model": cpu_copy(model.state_dict()),
        "optim": cpu_copy(optimizer.state_dict()),
        "loss": loss_bytes,
        "loss_state": loss_state,
    }


def _wrap_ddp(net: nn.Module, device: torch.device, broadcast_buffers: bool) -> nn.Module:
    """DDP, with the buffer option spelled the way this torch wants (torch 2.13 deprecates
    ``broadcast_buffers``; its successor differs only in syncing at init, which is a no-op
    here because every rank built or loaded the same state)."""
    options: dict[str, Any] = {"device_ids": [device.index] if device.type == "cuda" else None}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
        options["forward_sync_buffers"] = broadcast_buffers
    else:
        options["broadcast_buffers"] = broadcast_buffers
    return DistributedDataParallel(net, **options)


# ---------------------------------------------------------------------------- the oracle


class _Oracle:
    """The single-process side of a case: CPU, one thread (the ranks' BLAS path), float64.

    Two runs. The *replay* recomputes each step on the global batch with the very parameters
    the ranks had before that step, so everything the loss sees is bit-identical to what the
    ranks fed it, and its value and state must be too (the DDP gradient differs only by the
    order of a float64 sum over ranks: ``rtol``); its loss object runs on across checkpoints.
    The *free run* trains its own model from the same start, so the parameters after several
    optimiser steps are compared with a trajectory that never saw the ranks.
    """

    def __init__(self, setup: _Setup, factory: Callable[[], Any]) -> None:
        self.setup = setup
        read = setup.adapter.oracle_state
        with _one_thread():
            model, loss_fn, optimizer = _build(setup, factory, torch.device("cpu"))
            self.free = [
                _oracle_step(
                    setup, i, step, model=model, loss_fn=loss_fn, optimizer=optimizer, read=read
                )
                for i, step in enumerate(setup.case.plan)
            ]
        self.model, self.loss_fn, _ = _build(setup, factory, torch.device("cpu"))
        self.params = [p.detach().clone() for p in self.model.parameters()]

    def replay(self, i: int, step: Step, params_after: list[Tensor]) -> StepRecord:
        """Step ``i`` from the ranks' parameters; remember theirs after it for the next step."""
        with torch.no_grad():
            for p, value in zip(self.model.parameters(), self.params):
                p.copy_(value)
        with _one_thread():
            record = _oracle_step(
                self.setup,
                i,
                step,
                model=self.model,
                loss_fn=self.loss_fn,
                optimizer=None,
                read=self.setup.adapter.oracle_state,
            )
        self.params = params_after
        return record


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks run one thread each: same BLAS path, same bits
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _oracle_step(
    setup: _Setup,
    i: int,
    step: Step,
    *,
    model: nn.Module,
    loss_fn: Any,
    optimizer: torch.optim.Optimizer | None,
    read: StateAccessor,
) -> StepRecord:
    """Step ``i`` on the global batch, logits computed on the ranks' row blocks in rank order."""
    adapter = setup.adapter
    x, y, w = make_batch(setup.case, adapter, i, step, torch.device("cpu"))
    edges = [0, *itertools.accumulate(step.sizes)]
    set_rank_sizes = getattr(loss_fn, "set_rank_sizes", None)
    if callable(set_rank_sizes):  # an oracle of per-rank state: whose rows are whose
        set_rank_sizes(tuple(step.sizes))

    def forward() -> tuple[Tensor, Any]:
        logits = torch.cat([model(x[a:b]) for a, b in zip(edges, edges[1:])])
        return logits, adapter.call(loss_fn, logits, y, w, step.kwargs)

    try:
        return _train_step(
            setup,
            step,
            forward=forward,
            modules=(model, loss_fn),
            model=model,
            optimizer=optimizer,
            targets=y,
            read_state=lambda: read(loss_fn),
        )
    except Exception as exc:
        raise RuntimeError(
            f"the single-process oracle failed at {step.describe(i)}: {exc}"
        ) from exc


def _train_step(
    setup: _Setup,
    step: Step,
    *,
    forward: Callable[[], tuple[Tensor, Any]],
    modules: tuple[Any, ...],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    targets: Tensor,
    read_state: Callable[[], Any],
) -> StepRecord:
    """One step, identical for ranks and oracle: ``forward()`` gives ``(logits, loss output)``;
    ``modules`` are put in the step's mode; no optimiser (the replay) leaves the parameters."""
    for module in modules:
        if hasattr(module, "train"):
            module.train(step.train)
    params = list(model.parameters())
    for p in params:
        p.grad = None
    with torch.set_grad_enabled(step.train):
        logits, out = forward()
        if step.train:
            total = _scalar(out)
            if setup.case.local_ce_weight:
                total = total + setup.case.local_ce_weight * _local_ce(logits, targets, setup)
            total.backward()
            if optimizer is not None:
                optimizer.step()
    return StepRecord(
        out=cpu_copy(out),
        logits=cpu_copy(logits),
        grads=[_grad(p) for p in params] if step.train else None,
        params=cpu_copy(params),
        state=read_state(),
    )


# ------------------------------------------------------------------------------ pieces


class _Net(nn.Module):
    """What DDP wraps: the model, and optionally the loss (the 'loss inside DDP' layout)."""

    def __init__(self, model: nn.Module, loss_fn: Any, adapter: LossAdapter) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        self.adapter = adapter

    def forward(
        self,
        x: Tensor,
        y: Tensor | None = None,
        w: Tensor | None = None,
        kwargs: dict | None = None,
    ) -> Any:
        logits = self.model(x)
        if self.loss_fn is None or y is None:
            return logits
        return logits, self.adapter.call(self.loss_fn, logits, y, w, kwargs or {})


def _build(setup: _Setup, factory: Callable[[], Any], device: torch.device) -> tuple:
    case, width = setup.case, setup.adapter.num_classes
    gen = torch.Generator().manual_seed(case.seed)
    model = nn.Linear(case.in_features, width, dtype=torch.float64)
    with torch.no_grad():
        model.weight.copy_(torch.randn(model.weight.shape, generator=gen, dtype=torch.float64))
        model.bias.copy_(0.1 * torch.randn(model.bias.shape, generator=gen, dtype=torch.float64))
    model = model.to(device)
    loss_fn = to_device(as_float64(factory()), device)
    optimizer = torch.optim.SGD(model.parameters(), lr=case.lr, momentum=0.9)
    return model, loss_fn, optimizer


def _local_ce(logits: Tensor, y: Tensor, setup: _Setup) -> Tensor:
    """Cross-entropy summed over this block's counted rows, divided by the block's row count."""
    ignore_index = setup.adapter.ignore_index
    keep = y != ignore_index
    if setup.adapter.num_classes == 1:
        terms = F.binary_cross_entropy_with_logits(
            logits[:, 0], y.clamp(0, 1).to(logits.dtype), reduction="none"
        )
        total = (terms * keep).sum()
    else:
        total = F.cross_entropy(logits, y, ignore_index=ignore_index, reduction="sum")
    return total / max(y.shape[0], 1)


def _grad(p: Tensor) -> Tensor:
    """The parameter's gradient (zeros when the loss left none: nothing reached it)."""
    return torch.zeros_like(p, device="cpu") if p.grad is None else cpu_copy(p.grad)


def _scalar(out: Any) -> Tensor:
    """What to backpropagate: the loss, or the sum of its finite per-class entries ('none')."""
    loss = out[0] if isinstance(out, tuple) else out
    return torch.where(torch.isnan(loss), 0.0, loss).sum() if loss.dim() else loss
