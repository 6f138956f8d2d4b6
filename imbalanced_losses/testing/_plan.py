"""What a check runs: the steps of a plan, the case around them, and each step's seeded batch.

A :class:`Step` gives the rows of every rank, so the world size is ``len(step.sizes)``; a plan
whose world size changes is cut into *segments*, each run in a fresh world that resumes from the
previous one's checkpoint.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from imbalanced_losses.testing._adapter import LossAdapter

__all__ = ["Batch", "Case", "Step", "default_plan", "make_batch", "segments"]


@dataclass(frozen=True)
class Step:
    """One training (or eval) step: ``sizes[r]`` rows for rank ``r``.

    ``pad_frac`` of the rows get ``ignore_index`` targets; ``weighted`` passes a non-negative
    ``sample_weight`` (some zeros); ``train=False`` runs the step in ``eval()`` mode without
    backward; ``kwargs`` go to the loss's forward (e.g. ``{"return_per_class": True}``), the
    same on every rank. ``iid_frac`` passes a per-row ``iid_mask`` (bool) in which that share of
    the rows is False (not drawn i.i.d.; 0.0: a mask of all True), each rank its own rows of it,
    as the forward's third argument (or ``iid_mask=``), to a loss whose forward takes one;
    the oracle gets the global mask. None (the default): no mask is passed.
    """

    sizes: tuple[int, ...]
    pad_frac: float = 0.0
    weighted: bool = False
    train: bool = True
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    iid_frac: float | None = None

    def __post_init__(self) -> None:
        frac = self.iid_frac
        if frac is not None and (
            isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 <= frac <= 1
        ):
            raise ValueError(f"iid_frac: expected None or a number in [0, 1], got {frac!r}")
        if "iid_mask" in self.kwargs:
            raise ValueError(
                "kwargs: iid_mask is per-row, and kwargs are the same on every rank; "
                "use Step(iid_frac=...) instead"
            )

    def describe(self, index: int) -> str:
        """How errors name this step: ``plan step 3 (eval, 2 ranks, rows (4, 4), weighted)``."""
        extras = [f"pad_frac={self.pad_frac:g}"] if self.pad_frac else []
        extras += ["weighted"] if self.weighted else []
        extras += [f"iid_frac={self.iid_frac:g}"] if self.iid_frac is not None else []
        extras += [f"kwargs={dict(self.kwargs)}"] if self.kwargs else []
        mode = "train" if self.train else "eval"
        return (
            f"plan step {index} ({mode}, {len(self.sizes)} ranks, rows {self.sizes}"
            + "".join(f", {e}" for e in extras)
            + ")"
        )


@dataclass(frozen=True)
class Case:
    """One check: a loss, a plan, the training layout and how to read the loss.

    See :func:`check_ddp_exactness` for every option. Every callable must be picklable
    (module-level, or a ``functools.partial`` of one): each rank is a fresh process.
    """

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
    num_classes: int | None = None
    ignore_index: int | None = None
    takes_padding: bool = True
    takes_sample_weight: bool | None = None
    state: Callable[[Any], Any] | None = None
    oracle_state: Callable[[Any], Any] | None = None
    writes_state_in_eval: bool | None = None
    loss_scale: float | str = 1


def default_plan() -> list[Step]:
    """A plan that exercises what usually breaks: uneven and empty ranks, padding, weights, an
    eval step, and a checkpoint saved by 2 ranks and resumed by 3."""
    return [
        Step((5, 3)),
        Step((0, 7), pad_frac=0.3),
        Step((4, 4), weighted=True),
        Step((3, 5), train=False),
        Step((6, 2)),
        Step((3, 0, 4)),
        Step((2, 3, 2), pad_frac=0.2, weighted=True),
    ]


def segments(plan: Sequence[Step]) -> list[list[int]]:
    """Indices of the plan's runs of equal world size, in order."""
    groups = itertools.groupby(range(len(plan)), key=lambda i: len(plan[i].sizes))
    return [list(group) for _, group in groups]


class Batch(NamedTuple):
    """One step's global rows: features, targets, and the optional per-row columns."""

    x: torch.Tensor
    y: torch.Tensor
    weight: torch.Tensor | None
    iid: torch.Tensor | None

    def rows(self, sizes: Sequence[int], rank: int) -> Batch:
        """Rank ``rank``'s block of every column: rows ``sum(sizes[:rank])`` onwards."""
        lo = sum(sizes[:rank])
        block = slice(lo, lo + sizes[rank])
        return Batch(
            self.x[block],
            self.y[block],
            None if self.weight is None else self.weight[block],
            None if self.iid is None else self.iid[block],
        )


def make_batch(
    case: Case, adapter: LossAdapter, index: int, step: Step, device: torch.device
) -> Batch:
    """The global batch of step ``index`` (rank ``r`` takes rows ``sizes[:r]`` onwards).

    Padding rows only for a loss that takes them, a ``sample_weight`` and an ``iid_mask`` only
    for one whose forward accepts them (the report says what was left out). The iid mask is
    drawn last, so a step without one draws the same rows as before it existed.
    """
    gen = torch.Generator().manual_seed(case.seed * 1_000_003 + index)
    n = sum(step.sizes)
    x = torch.randn(n, case.in_features, generator=gen, dtype=torch.float64)
    if adapter.num_classes == 1:
        y = (torch.rand(n, generator=gen) < 0.3).long()
    else:
        y = torch.randint(0, adapter.num_classes, (n,), generator=gen)
    padding = torch.rand(n, generator=gen) < step.pad_frac
    if adapter.takes_padding:
        y = torch.where(padding, adapter.ignore_index, y)
    w = None
    if step.weighted:
        w = 2 * torch.rand(n, generator=gen, dtype=torch.float64)
        w = torch.where(torch.rand(n, generator=gen) < 0.2, 0.0, w).to(device)
    if not adapter.takes_sample_weight:
        w = None
    iid = None
    if step.iid_frac is not None:
        iid = (torch.rand(n, generator=gen) >= step.iid_frac).to(device)
    if not adapter.takes_iid_mask:
        iid = None
    return Batch(x.to(device), y.to(device), w, iid)
