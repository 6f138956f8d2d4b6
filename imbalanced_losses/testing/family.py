"""The family of queued ranking losses, one line per loss, for tests that run every loss.

A :class:`LossSpec` names a loss, its typical options, its plain reference and the options it
has beyond the base's (with values each must refuse). The family tests
(``tests/test_family_contract.py``) and the DDP scenarios (``ddp_tests/test_family_ddp.py``)
are parametrized over :data:`LOSS_SPECS`: adding a loss adds one entry here.

The per-row losses (the focal losses) have no queue, no state and no ``num_classes``, so
the queued family's checks do not fit them; :data:`PER_ROW_LOSS_SPECS` lists them, with a plain
per-element reference, for the checks that do (``tests/test_per_row_contract.py``): values,
low precision, validation, copies with and without a process group.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from imbalanced_losses import (
    PAUCAtBudgetLoss,
    QueuedRankingLoss,
    RecallAtQuantileLoss,
    SigmoidFocalLoss,
    SmoothAPLoss,
    SoftmaxFocalLoss,
)
from imbalanced_losses.testing._example_loss import TopQuantileHingeLoss
from imbalanced_losses.testing.reference import (
    PlainPAUCLoss,
    QueuedReference,
    ReferenceRecallAtQuantileLoss,
    ReferenceSmoothAPLoss,
    ReferenceTopQuantileHingeLoss,
    ShardedReference,
)

__all__ = ["BASE_OPTIONS", "LOSS_SPECS", "PER_ROW_LOSS_SPECS", "LossSpec", "PerRowLossSpec"]

# Every loss of the family takes these (the base's); the references take the first five.
BASE_OPTIONS = (
    "queue_size",
    "temperature",
    "reduction",
    "ignore_index",
    "update_queue_in_eval",
    "gather_distributed",
    "max_pool_size",
    "seed",
    "sharded",
    "process_group",
)
_ONLY_THE_LOSS_TAKES = ("gather_distributed", "max_pool_size", "seed", "sharded", "process_group")


@dataclass(frozen=True)
class LossSpec:
    """One loss of the family: how to build it and its reference with the same settings."""

    name: str
    loss: Callable[..., QueuedRankingLoss]
    reference: Callable[..., QueuedReference]
    options: Mapping[str, Any]  # typical options, beyond num_classes, for loss and reference
    # Options beyond the base's, each with values the constructor must refuse.
    own_options: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    # Options the loss has but its reference does not model (no reference for those cases).
    unmodelled: tuple[str, ...] = ()

    def make(self, num_classes: int, **overrides: Any) -> QueuedRankingLoss:
        return self.loss(num_classes, **{**self.options, **overrides})

    def make_reference(
        self, num_classes: int, *, dtype: torch.dtype = torch.float64, **overrides: Any
    ) -> QueuedReference:
        """The reference with the same settings (options it cannot model are refused)."""
        options = {**self.options, **overrides}
        unmodelled = [k for k in options if k in self.unmodelled]
        if unmodelled:
            raise ValueError(f"the {self.name} reference does not model {unmodelled}")
        kept = {k: v for k, v in options.items() if k not in _ONLY_THE_LOSS_TAKES}
        return self.reference(num_classes, dtype=dtype, **kept)

    def make_sharded_reference(
        self, num_classes: int, *, dtype: torch.dtype = torch.float64, **overrides: Any
    ) -> ShardedReference:
        """The oracle of ``sharded=True``: the reference over one queue shard per rank."""
        reference = self.make_reference(num_classes, dtype=dtype, **overrides)
        return ShardedReference(reference, reference.queue.size)

    def __str__(self) -> str:
        return self.name


LOSS_SPECS: tuple[LossSpec, ...] = (
    LossSpec(
        "recall_at_quantile",
        RecallAtQuantileLoss,
        ReferenceRecallAtQuantileLoss,
        {"quantile": 0.3, "temperature": 0.5},
        own_options={
            "quantile": (0.0, 1.0, -0.1, 1.5, math.nan, "0.1"),
            "quantile_interpolation": ("cubic", None),
            "positives": ("all", None),
        },
        unmodelled=("positives",),
    ),
    LossSpec("smooth_ap", SmoothAPLoss, ReferenceSmoothAPLoss, {"temperature": 0.5}),
    LossSpec(
        "pauc_at_budget",
        PAUCAtBudgetLoss,
        PlainPAUCLoss,
        # beta: (1 - beta) * (n - 1) is far from an integer for every pool here, so the band's
        # order statistic is the same in float32 and float64 (the reference library computes
        # the level in the scores' dtype; at a knife edge the dtypes pick neighbours).
        {"beta": 0.3719, "temperature": 0.5, "surrogate": "pairwise"},
        own_options={
            "alpha": (-0.1, 1.0, math.nan, "0"),
            "beta": (0.0, 1.5, math.inf, None),
            "surrogate": ("dense", None),
            "n_knots": (1, 2.0, True),
            "tau_scale": ("std", None),
            "pos_numerator": ("all", None),
            "budget_basis": ("tpr", None),
            "quantile_interpolation": ("cubic", None),
        },
    ),
    # The own-loss example of docs/ddp.md (an options table and per_class_loss), checked like
    # the shipped losses so the docs teach a loss that passes every family check.
    LossSpec(
        "top_quantile_hinge_example",
        TopQuantileHingeLoss,
        ReferenceTopQuantileHingeLoss,
        {"quantile": 0.3, "margin": 0.2, "temperature": 0.5},
        own_options={"quantile": (0.0, 1.0, -0.1, math.nan, "0.1"), "margin": (-0.1, math.nan)},
    ),
)


# ------------------------------------------------------------------ per-row losses


def _reduce(loss: Tensor, counted: Tensor, reduction: str) -> Tensor:
    """A plain reduction of per-element ``loss`` (weights applied) by the ``counted`` mass."""
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    mass = counted.sum()
    return loss.sum() / mass if mass > 0 else loss.sum() * 0


def reference_sigmoid_focal(
    x: Tensor, t: Tensor, w: Tensor | None, *, alpha: float, gamma: float, reduction: str
) -> Tensor:
    """Lin et al. (2017), eq. 5, written out: ``-alpha_t (1 - p_t)^gamma log p_t``."""
    p = torch.sigmoid(x)
    p_t = p * t + (1 - p) * (1 - t)
    log_p_t = t * F.logsigmoid(x) + (1 - t) * F.logsigmoid(-x)
    loss = -((1 - p_t) ** gamma) * log_p_t
    if alpha >= 0:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    weight = torch.ones_like(loss) if w is None else w.expand_as(loss)
    return _reduce(loss * weight, weight, reduction)


def reference_softmax_focal(
    x: Tensor,
    y: Tensor,
    w: Tensor | None,
    *,
    alpha: list[float] | None,
    gamma: float,
    reduction: str,
    ignore_index: int = -100,
    background_class: int = 0,
) -> Tensor:
    """``-alpha_y (1 - p_y)^gamma log p_y`` per position (no label smoothing)."""
    log_p = torch.log_softmax(x, 1)
    valid = y != ignore_index
    safe = torch.where(valid, y, 0)
    log_p_y = log_p.gather(1, safe.unsqueeze(1)).squeeze(1)
    loss = -((1 - log_p_y.exp()) ** gamma) * log_p_y
    if alpha is not None:
        loss = torch.tensor(alpha, dtype=x.dtype)[safe] * loss
    weight = torch.ones_like(loss) if w is None else w
    loss = torch.where(valid, loss * weight, 0)
    counted = valid & (y != background_class) if reduction == "mean_positive" else valid
    return _reduce(loss, torch.where(counted, weight, 0), reduction)


def _binary_batch(gen: torch.Generator, n: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    x = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    return x.to(dtype), (torch.rand(n, 3, generator=gen) < 0.3).to(dtype)


def _class_batch(gen: torch.Generator, n: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    x = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=gen)
    y[::7] = -100  # ignored positions
    return x.to(dtype), y


@dataclass(frozen=True)
class PerRowLossSpec:
    """One per-row loss: how to build it, a batch for it and its plain reference."""

    name: str
    loss: Callable[..., nn.Module]
    options: Mapping[str, Any]  # typical options, passed to the loss and the reference
    reference: Callable[..., Tensor]  # (inputs, targets, weight, **options, reduction=)
    batch: Callable[[torch.Generator, int, torch.dtype], tuple[Tensor, Tensor]]
    weight_shape: Callable[[Tensor], tuple[int, ...]]  # sample_weight's shape for the targets
    reductions: tuple[str, ...]
    # Constructor options, each with values the constructor must refuse.
    bad_options: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)

    def make(self, **overrides: Any) -> nn.Module:
        return self.loss(**{**self.options, **overrides})

    def __str__(self) -> str:
        return self.name


_COMMON_BAD = {
    "gamma": (-1.0, math.nan, math.inf, "2", True),
    "reduction": ("average", None),
    "gather_distributed": ("auto", 1),
}

PER_ROW_LOSS_SPECS: tuple[PerRowLossSpec, ...] = (
    PerRowLossSpec(
        "sigmoid_focal",
        SigmoidFocalLoss,
        {"alpha": 0.25, "gamma": 1.5},
        reference_sigmoid_focal,
        _binary_batch,
        lambda t: (t.shape[0], 1),
        ("mean", "sum", "none"),
        bad_options={**_COMMON_BAD, "alpha": (1.5, -0.5, math.nan, "0.25", None)},
    ),
    PerRowLossSpec(
        "softmax_focal",
        SoftmaxFocalLoss,
        {"alpha": [0.5, 1.0, 2.0], "gamma": 1.5},
        reference_softmax_focal,
        _class_batch,
        lambda t: tuple(t.shape),
        ("mean", "mean_positive", "sum", "none"),
        bad_options={
            **_COMMON_BAD,
            "alpha": ([1.0, -1.0, 1.0], [[1.0, 2.0, 3.0]], [1.0, math.nan, 1.0]),
            "label_smoothing": (-0.1, 1.5, "0.1"),
            "ignore_index": (1.5, None),
            "background_class": (0.0, None),
        },
    ),
)
