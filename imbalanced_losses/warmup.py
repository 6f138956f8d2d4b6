"""Warm up with one loss, blend into another, and anneal the second one's temperature."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn


def _check_count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return value


def _check_optional_count(name: str, value: Any) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"{name} must be None or an int >= 0, got {value!r}")
    return value


def _check_positive(name: str, value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not (math.isfinite(value) and value > 0)
    ):
        raise ValueError(f"{name} must be a finite float > 0, got {value!r}")
    return float(value)


class LossWarmupWrapper(nn.Module):
    r"""``(1 - w) * warmup_loss + w * main_loss`` with ``w`` rising on a schedule.

    Ranking losses learn little from a random model: their threshold and ranks
    mean nothing yet. The usual recipe trains with a plain loss first (e.g.
    BCE), then blends the ranking loss in. With ``W`` warm-up units and ``B``
    blend units (epochs, or steps; one pair or the other), ``f = final_main_weight``:

    * units ``0 … W-1``: ``w = 0`` (the warm-up loss alone);
    * unit ``W + k``, ``k = 0 … B-1``: ``w = f (k + 1) / (B + 1)``;
    * from unit ``W + B`` on: ``w = f`` (``f < 1`` keeps a permanent mix).

    E.g. steps, ``W=500, B=3, f=1``: ``w`` is 0 up to step 499, then 0.25, 0.5,
    0.75, and 1 from step 503. From the first training step after the warm-up,
    the main loss's ``temperature`` (when it has one) decays geometrically,
    ``temp_start * (temp_end / temp_start) ** min(1, elapsed / temp_decay_steps)``,
    ``elapsed`` counting training steps since the warm-up ended.

    During the warm-up the main loss still runs (without gradient) on every
    training step, so a queued loss starts with a full queue. Eval-mode forwards
    never advance the schedule. The schedule's position is in ``state_dict()``
    (with both losses' own state), so a resumed run continues mid-blend and
    mid-decay.

    Drive it with the hooks (names as in Lightning): call
    ``on_train_epoch_start(epoch)`` at each epoch (needed for epoch units) and,
    optionally, ``on_train_batch_start(global_step)``; without the latter each
    training forward counts as one step.

    Args:
        warmup_loss: loss used alone during the warm-up (called with the same arguments).
        main_loss: loss blended in after it.
        warmup_epochs: epochs of warm-up (``W`` in epochs).
        blend_epochs: epochs of blending (``B`` in epochs).
        warmup_steps: steps of warm-up; giving steps (instead of epochs) makes steps the unit.
        blend_steps: steps of blending.
        final_main_weight: ``f`` in ``(0, 1]``.
        temp_start: the main loss's temperature on the first step after the warm-up.
        temp_end: its temperature once the decay is over.
        temp_decay_steps: training steps over which the temperature decays.
    """

    def __init__(
        self,
        warmup_loss: Callable[..., Tensor],
        main_loss: Callable[..., Tensor],
        *,
        warmup_epochs: int = 0,
        blend_epochs: int = 0,
        warmup_steps: int | None = None,
        blend_steps: int | None = None,
        final_main_weight: float = 1.0,
        temp_start: float = 0.05,
        temp_end: float = 0.005,
        temp_decay_steps: int = 10_000,
    ) -> None:
        super().__init__()
        for name, loss in (("warmup_loss", warmup_loss), ("main_loss", main_loss)):
            if not callable(loss):
                raise ValueError(f"{name} must be a loss module or callable, got {loss!r}")
        _check_count("warmup_epochs", warmup_epochs)
        _check_count("blend_epochs", blend_epochs)
        _check_optional_count("warmup_steps", warmup_steps)
        _check_optional_count("blend_steps", blend_steps)
        self.by_steps = warmup_steps is not None or blend_steps is not None
        if self.by_steps and (warmup_epochs or blend_epochs):
            raise ValueError(
                "give the schedule in epochs or in steps, not both: got "
                f"warmup_epochs={warmup_epochs}, blend_epochs={blend_epochs}, "
                f"warmup_steps={warmup_steps}, blend_steps={blend_steps}"
            )
        if (
            isinstance(final_main_weight, bool)
            or not isinstance(final_main_weight, (int, float))
            or not 0.0 < final_main_weight <= 1.0
        ):
            raise ValueError(f"final_main_weight must be in (0, 1], got {final_main_weight!r}")
        self.temp_start = _check_positive("temp_start", temp_start)
        self.temp_end = _check_positive("temp_end", temp_end)
        self.temp_decay_steps = _check_count("temp_decay_steps", temp_decay_steps)
        self.warmup_units = (warmup_steps or 0) if self.by_steps else warmup_epochs
        self.blend_units = (blend_steps or 0) if self.by_steps else blend_epochs
        self.final_main_weight = float(final_main_weight)
        self.warmup_loss = warmup_loss
        self.main_loss = main_loss
        self.epoch = 0
        self.step = 0  # index of the next training step
        self.decay_step = 0  # training steps taken since the warm-up ended

    # --------------------------------------------------------------- schedule
    @property
    def unit(self) -> int:
        """Where the schedule stands: the epoch, or the step, depending on the units."""
        return self.step if self.by_steps else self.epoch

    @property
    def in_warmup(self) -> bool:
        """Whether the warm-up loss runs alone (``w = 0``)."""
        return self.unit < self.warmup_units

    @property
    def in_blend(self) -> bool:
        """Whether ``w`` is still rising towards ``final_main_weight``."""
        return self.warmup_units <= self.unit < self.warmup_units + self.blend_units

    @property
    def main_weight(self) -> float:
        """``w``: the main loss's share of the loss at the current unit."""
        if self.in_warmup:
            return 0.0
        if self.in_blend:
            k = self.unit - self.warmup_units
            return self.final_main_weight * (k + 1) / (self.blend_units + 1)
        return self.final_main_weight

    @property
    def current_temperature(self) -> float:
        """The main loss's temperature for the next training step."""
        if self.temp_decay_steps == 0:
            progress = 1.0
        else:
            progress = min(1.0, self.decay_step / self.temp_decay_steps)
        return self.temp_start * (self.temp_end / self.temp_start) ** progress

    # ------------------------------------------------------------------ hooks
    def on_train_epoch_start(self, epoch: int) -> None:
        """Call at the start of each training epoch (``epoch`` counts from 0)."""
        self.epoch = _check_count("epoch", epoch)

    def on_train_batch_start(self, global_step: int) -> None:
        """Optionally call before each training step: sets the step (and, for steps, the decay)."""
        self.step = _check_count("global_step", global_step)
        if self.by_steps:
            self.decay_step = max(0, self.step - self.warmup_units)

    # ---------------------------------------------------------------- forward
    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        """The blended loss; both losses get the same arguments."""
        weight = self.main_weight
        warming_up = self.in_warmup
        if self.training and hasattr(self.main_loss, "temperature"):
            self.main_loss.temperature = self.current_temperature
        if weight == 0.0:
            if self.training:  # keep the main loss's queue filling
                with torch.no_grad():
                    self.main_loss(*args, **kwargs)
            loss = self.warmup_loss(*args, **kwargs)
        elif weight == 1.0:
            loss = self.main_loss(*args, **kwargs)
        else:
            warm = self.warmup_loss(*args, **kwargs)
            loss = (1.0 - weight) * warm + weight * self.main_loss(*args, **kwargs)
        if self.training:
            self.step += 1
            if not warming_up:
                self.decay_step += 1
        return loss

    # ------------------------------------------------------------------ state
    def get_extra_state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step, "decay_step": self.decay_step}

    def set_extra_state(self, state: Any) -> None:
        epoch, step, decay_step = (
            _check_count(name, int(state[name])) for name in ("epoch", "step", "decay_step")
        )
        self.epoch, self.step, self.decay_step = epoch, step, decay_step

    def extra_repr(self) -> str:
        units = "steps" if self.by_steps else "epochs"
        return (
            f"warmup_{units}={self.warmup_units}, blend_{units}={self.blend_units}, "
            f"final_main_weight={self.final_main_weight}, temp_start={self.temp_start}, "
            f"temp_end={self.temp_end}, temp_decay_steps={self.temp_decay_steps}"
        )
