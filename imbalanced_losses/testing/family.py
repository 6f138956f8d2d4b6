"""The family of queued ranking losses, one line per loss, for tests that run every loss.

A :class:`LossSpec` names a loss, its typical options, its plain reference and the options it
has beyond the base's (with values each must refuse). The family tests
(``tests/test_family_contract.py``) and the DDP scenarios (``ddp_tests/test_family_ddp.py``)
are parametrized over :data:`LOSS_SPECS`: adding a loss adds one entry here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from imbalanced_losses import QueuedRankingLoss, RecallAtQuantileLoss, SmoothAPLoss
from imbalanced_losses.testing.reference import (
    QueuedReference,
    ReferenceRecallAtQuantileLoss,
    ReferenceSmoothAPLoss,
)

__all__ = ["BASE_OPTIONS", "LOSS_SPECS", "LossSpec"]

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
    "process_group",
)
_ONLY_THE_LOSS_TAKES = ("gather_distributed", "max_pool_size", "seed", "process_group")


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
)
