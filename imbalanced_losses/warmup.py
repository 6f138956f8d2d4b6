"""Warm up with one loss, blend into another, and anneal the second one's temperature."""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

STATE_VERSION = 2  # format of get_extra_state(); version 1 had no "version" key


def _check_count(name: str, value: Any) -> int:
    """An int >= 0 (the reference's own text for a negative one)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _loss_takes_sample_weight(loss: Callable[..., Any]) -> bool:
    """Whether ``loss`` can be handed ``sample_weight=`` (by name, or through ``**kwargs``)."""
    target = loss.forward if isinstance(loss, nn.Module) else loss
    try:
        parameters = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(
        (p.name == "sample_weight" and p.kind is not p.VAR_POSITIONAL) or p.kind is p.VAR_KEYWORD
        for p in parameters
    )


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
    0.75, and 1 from step 503. From the first training step after the warm-up
    (step ``s0``), the main loss's ``temperature`` (when it has one) is
    ``temp_start * (temp_end / temp_start) ** min(1, (step - s0) / temp_decay_steps)``;
    during the warm-up it is left alone. The signature, the schedule and the
    properties are the reference library's (imbalanced-losses 0.6.0).

    Drive it with the hooks (names as in Lightning): ``on_train_epoch_start(epoch)``
    at each epoch (needed for epoch units and for ``reset_queue_each_epoch``), and
    ``on_train_batch_start(global_step)`` before each training step. Without the
    batch hook, each training forward counts as one step. ``in_warmup``,
    ``in_blend``, ``main_weight`` and ``current_temperature`` describe the step the
    last hook (or hook-less forward) set: read after a forward, they are what
    that forward used.

    Beyond the reference: during the warm-up the main loss still runs (without
    gradient) on every training forward when it keeps a queue, so a queued loss
    starts with a full queue, and the switch does not empty it; eval-mode
    forwards never advance the schedule; the schedule's position is in
    ``state_dict()`` (with both losses' own state), so a resumed run continues
    mid-blend and mid-decay.

    Args:
        warmup_loss: loss used alone during the warm-up, called as
            ``warmup_loss(logits, targets)`` (plus ``sample_weight=`` when its
            forward takes one); nothing else reaches it, so it may be
            ``nn.CrossEntropyLoss()``.
        main_loss: loss blended in after it; gets every argument of the forward.
        warmup_epochs: epochs of warm-up (``W`` in epochs).
        temp_start: the main loss's temperature on the first step after the warm-up.
        temp_end: its temperature once the decay is over.
        temp_decay_steps: training steps over which the temperature decays (> 0).
        blend_epochs: epochs of blending (``B`` in epochs).
        warmup_steps: steps of warm-up; giving it makes steps the unit.
        blend_steps: steps of blending (needs ``warmup_steps``).
        final_main_weight: ``f`` in ``(0, 1]``.
        reset_queue_each_epoch: empty the main loss's queue (``reset_queue()``) at
            the start of every epoch after the warm-up.
        gather_distributed: when given, set as the main loss's ``gather_distributed``.
    """

    def __init__(
        self,
        warmup_loss: Callable[..., Any],
        main_loss: Callable[..., Any],
        warmup_epochs: int = 0,
        temp_start: float = 0.05,
        temp_end: float = 0.005,
        temp_decay_steps: int = 10_000,
        *,
        blend_epochs: int = 0,
        warmup_steps: int | None = None,
        blend_steps: int | None = None,
        final_main_weight: float = 1.0,
        reset_queue_each_epoch: bool = False,
        gather_distributed: bool | None = None,
    ) -> None:
        super().__init__()
        for name, loss in (("warmup_loss", warmup_loss), ("main_loss", main_loss)):
            if not callable(loss):
                raise ValueError(f"{name} must be a loss module or callable, got {loss!r}")
        if warmup_steps is not None and warmup_epochs != 0:
            raise ValueError(
                "Cannot specify both warmup_epochs (non-zero) and warmup_steps; "
                f"use one or the other (got warmup_epochs={warmup_epochs!r}, "
                f"warmup_steps={warmup_steps!r})"
            )
        if blend_steps is not None and blend_epochs != 0:
            raise ValueError(
                "Cannot specify both blend_epochs (non-zero) and blend_steps; "
                f"use one or the other (got blend_epochs={blend_epochs!r}, "
                f"blend_steps={blend_steps!r})"
            )
        if blend_steps is not None and warmup_steps is None:
            raise ValueError(
                "blend_steps requires warmup_steps (step mode); "
                "use blend_epochs with warmup_epochs instead."
            )
        if warmup_steps is not None and blend_epochs != 0:
            raise ValueError(
                f"blend_epochs={blend_epochs!r} counts epochs, but warmup_steps puts the "
                "schedule in steps; use blend_steps"
            )
        self.warmup_epochs = _check_count("warmup_epochs", warmup_epochs)
        self.blend_epochs = _check_count("blend_epochs", blend_epochs)
        self._step_mode = warmup_steps is not None
        self.warmup_steps = (
            0 if warmup_steps is None else _check_count("warmup_steps", warmup_steps)
        )
        self.blend_steps = 0 if blend_steps is None else _check_count("blend_steps", blend_steps)
        if (
            isinstance(final_main_weight, bool)
            or not isinstance(final_main_weight, (int, float))
            or not 0.0 < final_main_weight <= 1.0
        ):
            raise ValueError(f"final_main_weight must be in (0, 1], got {final_main_weight!r}")
        temps = (temp_start, temp_end)
        if any(
            isinstance(t, bool)
            or not isinstance(t, (int, float))
            or not (math.isfinite(t) and t > 0)
            for t in temps
        ):
            raise ValueError(
                "temp_start and temp_end must be positive (finite numbers > 0), got "
                f"temp_start={temp_start!r}, temp_end={temp_end!r}"
            )
        if isinstance(temp_decay_steps, bool) or not isinstance(temp_decay_steps, int):
            raise ValueError(f"temp_decay_steps must be a positive int, got {temp_decay_steps!r}")
        if temp_decay_steps <= 0:
            raise ValueError(f"temp_decay_steps must be positive, got {temp_decay_steps}")
        if not isinstance(reset_queue_each_epoch, bool):
            raise ValueError(
                f"reset_queue_each_epoch must be a bool, got {reset_queue_each_epoch!r}"
            )
        if gather_distributed is not None and not isinstance(gather_distributed, bool):
            raise ValueError(
                f"gather_distributed must be None, True or False, got {gather_distributed!r}"
            )
        self.temp_start = float(temp_start)
        self.temp_end = float(temp_end)
        self.temp_decay_steps = temp_decay_steps
        self.final_main_weight = float(final_main_weight)
        self.reset_queue_each_epoch = reset_queue_each_epoch
        self.warmup_loss = warmup_loss
        self.main_loss = main_loss
        if gather_distributed is not None and hasattr(main_loss, "gather_distributed"):
            main_loss.gather_distributed = gather_distributed

        self._has_temperature = hasattr(main_loss, "temperature")
        self._has_reset_queue = callable(getattr(main_loss, "reset_queue", None))
        self._warmup_takes_sample_weight = _loss_takes_sample_weight(warmup_loss)
        if not self._has_temperature:
            warnings.warn(
                f"{type(main_loss).__name__} has no 'temperature' attribute; "
                "temperature scheduling will be skipped.",
                UserWarning,
                stacklevel=2,
            )
        if reset_queue_each_epoch and not self._has_reset_queue:
            warnings.warn(
                f"{type(main_loss).__name__} has no 'reset_queue' method; "
                "reset_queue_each_epoch will have no effect.",
                UserWarning,
                stacklevel=2,
            )

        self._epoch = 0
        self._global_step = 0  # the step the properties describe
        self._step_entered = False  # the schedule of _global_step has been applied
        self._step_used = False  # a training forward ran at _global_step
        self._switch_step: int | None = None  # the main phase's first step, once known
        if (self.warmup_steps if self._step_mode else self.warmup_epochs) == 0:
            self._switch_step = 0
            self._apply_temperature(self.temp_start)

    # --------------------------------------------------------------- schedule
    @property
    def in_warmup(self) -> bool:
        """Whether the warm-up loss runs alone (``w = 0``)."""
        if self._step_mode:
            return self._global_step < self.warmup_steps
        return self._epoch < self.warmup_epochs

    @property
    def in_blend(self) -> bool:
        """Whether ``w`` is still rising towards ``final_main_weight``."""
        if self.in_warmup:
            return False
        if self._step_mode:
            return self._global_step < self.warmup_steps + self.blend_steps
        return self._epoch < self.warmup_epochs + self.blend_epochs

    @property
    def main_weight(self) -> float:
        """``w``: the main loss's share of the loss."""
        if self.in_warmup:
            return 0.0
        if not self.in_blend:
            return self.final_main_weight
        if self._step_mode:
            k, blend = self._global_step - self.warmup_steps, self.blend_steps
        else:
            k, blend = self._epoch - self.warmup_epochs, self.blend_epochs
        return (k + 1) / (blend + 1) * self.final_main_weight

    @property
    def current_temperature(self) -> float | None:
        """The main loss's ``temperature`` (None when it has none)."""
        if not self._has_temperature:
            return None
        return float(self.main_loss.temperature)  # type: ignore[attr-defined]

    def scheduled_temperature(self, step: int) -> float:
        """The temperature of training step ``step`` after the main phase began."""
        switch = 0 if self._switch_step is None else self._switch_step
        progress = min(1.0, max(0, step - switch) / self.temp_decay_steps)
        return self.temp_start * math.exp(progress * math.log(self.temp_end / self.temp_start))

    def _apply_temperature(self, value: float) -> None:
        if self._has_temperature:
            self.main_loss.temperature = value  # type: ignore[attr-defined]

    def _enter_step(self) -> None:
        """Apply the schedule of ``_global_step``: latch the switch, set the temperature."""
        self._step_entered = True
        if self.in_warmup:
            return
        if self._switch_step is None:
            self._switch_step = self._global_step
        self._apply_temperature(self.scheduled_temperature(self._global_step))

    # ------------------------------------------------------------------ hooks
    def on_train_epoch_start(self, epoch: int) -> None:
        """Call at the start of each training epoch (``epoch`` counts from 0)."""
        self._epoch = _check_count("epoch", epoch)
        if not self._step_mode:
            self._step_entered = False  # the phase may have changed: re-apply at the next step
        if not self.in_warmup and self.reset_queue_each_epoch and self._has_reset_queue:
            self.main_loss.reset_queue()  # type: ignore[attr-defined]

    def on_train_batch_start(self, global_step: int) -> None:
        """Call before each training step with the global step (sets the temperature now)."""
        self._global_step = _check_count("global_step", global_step)
        self._step_used = False
        self._enter_step()

    # ---------------------------------------------------------------- forward
    def forward(self, logits: Tensor, targets: Tensor, *args: Any, **kwargs: Any) -> Any:
        """The blended loss.

        The main loss gets every argument; the warm-up loss gets ``(logits, targets)``
        and ``sample_weight`` when its forward takes it. When the main loss returns
        a tuple (``return_per_class=True``), its first element is blended and the
        rest passed through. During the warm-up the warm-up loss's value is returned.
        """
        if self.training:
            if self._step_used:  # no hook since the last training forward: the next step
                self._global_step += 1
                self._step_entered = False
            if not self._step_entered:
                self._enter_step()
            self._step_used = True
        weight = self.main_weight
        if weight == 0.0:
            if self.training and self._fills_queue():
                with torch.no_grad():  # keep the main loss's queue filling
                    self.main_loss(logits, targets, *args, **kwargs)
            return self._warmup(logits, targets, kwargs)
        if weight >= 1.0:
            return self.main_loss(logits, targets, *args, **kwargs)
        warm = self._warmup(logits, targets, kwargs)
        main = self.main_loss(logits, targets, *args, **kwargs)
        if isinstance(main, tuple):
            return ((1.0 - weight) * warm + weight * main[0], *main[1:])
        return (1.0 - weight) * warm + weight * main

    def _warmup(self, logits: Tensor, targets: Tensor, kwargs: dict[str, Any]) -> Tensor:
        passed = {}
        if self._warmup_takes_sample_weight and "sample_weight" in kwargs:
            passed["sample_weight"] = kwargs["sample_weight"]
        out = self.warmup_loss(logits, targets, **passed)
        return out[0] if isinstance(out, tuple) else out

    def _fills_queue(self) -> bool:
        """Whether the main loss keeps a queue worth filling during the warm-up."""
        return self._has_reset_queue and getattr(self.main_loss, "queue_size", 1) > 0

    # ------------------------------------------------------------------ state
    def get_extra_state(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "epoch": self._epoch,
            "global_step": self._global_step,
            "step_entered": self._step_entered,
            "step_used": self._step_used,
            "switch_step": self._switch_step,
        }

    def set_extra_state(self, state: Any) -> None:
        """Load this format or version 1's (``step``: the next step, ``decay_step``)."""
        if not isinstance(state, dict):
            raise ValueError(f"LossWarmupWrapper state must be a dict, got {type(state).__name__}")
        epoch = _check_count("epoch", int(state["epoch"]))
        if "version" not in state:  # version 1: the index of the next step
            upcoming = _check_count("step", int(state["step"]))
            decayed = _check_count("decay_step", int(state["decay_step"]))
            step, used = max(0, upcoming - 1), upcoming > 0
            switch = upcoming - decayed if decayed else None
        else:
            step = _check_count("global_step", int(state["global_step"]))
            used = bool(state["step_used"])
            raw = state["switch_step"]
            switch = None if raw is None else _check_count("switch_step", int(raw))
        self._epoch, self._global_step, self._step_used = epoch, step, used
        self._switch_step = switch
        self._step_entered = bool(state.get("step_entered", used))
        if self._step_entered and not self.in_warmup and switch is not None:
            self._apply_temperature(self.scheduled_temperature(step))

    def extra_repr(self) -> str:
        if self._step_mode:
            units = f"warmup_steps={self.warmup_steps}, blend_steps={self.blend_steps}"
        else:
            units = f"warmup_epochs={self.warmup_epochs}, blend_epochs={self.blend_epochs}"
        return (
            f"{units}, final_main_weight={self.final_main_weight}, temp_start={self.temp_start}, "
            f"temp_end={self.temp_end}, temp_decay_steps={self.temp_decay_steps}, "
            f"reset_queue_each_epoch={self.reset_queue_each_epoch}"
        )
