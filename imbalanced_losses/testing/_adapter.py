"""What the harness needs from a loss, in one place.

Any ``nn.Module`` or callable can be checked: it is called as ``loss(logits, targets,
**step_kwargs)``, with ``sample_weight=`` added only on weighted steps and only when its forward
takes one. The label range and the padding label come from the loss's ``num_classes`` /
``ignore_index`` attributes when it has them, else from the case. Its state, the thing that must
be identical on every rank, equal to the single process's and (usually) frozen in eval, is read
by an accessor: by default the loss's whole ``state_dict()`` (buffers and extra state), for every
loss, this package's included. Nothing is guessed from attribute names: a loss says what it is
through the documented attributes above, through its type (a ``QueuedRankingLoss`` says whether
it writes its queue in eval), or the case's options say it.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from imbalanced_losses import QueuedRankingLoss
from imbalanced_losses.testing._records import PER_RANK, StateAccessor, cpu_copy

__all__ = ["LossAdapter", "queue_state", "shard_state", "split_sharded", "whole_state_dict"]


def whole_state_dict(loss_fn: Any) -> dict[str, Any] | None:
    """The default state accessor: ``loss_fn.state_dict()`` copied to CPU (None: it has none).

    A sharded loss's state is split (:func:`split_sharded`): its queue shard is its rank's own.
    """
    state_dict = getattr(loss_fn, "state_dict", None)
    if state_dict is None:
        return None
    state = cpu_copy(state_dict())
    return split_sharded(state) if getattr(loss_fn, "sharded", False) is True else state


def split_sharded(state: dict[str, Any]) -> dict[str, Any]:
    """A sharded loss's ``state_dict()`` as ``{replicated..., PER_RANK: its rank's own}``.

    The rank's own: the queue shard (``queue.*``) and the extra state's ``shard`` (whose rows)
    and ``version`` (a shard's format); everything else must match on every rank.
    """
    own = {k: v for k, v in state.items() if k.startswith("queue.")}
    rest = {k: v for k, v in state.items() if not k.startswith("queue.")}
    extra = dict(rest.get("_extra_state", {}))
    own["_extra_state"] = {k: extra.pop(k) for k in ("shard", "version") if k in extra}
    if "_extra_state" in rest:
        rest["_extra_state"] = extra
    return {**rest, PER_RANK: own}


def shard_state(loss_fn: Any) -> dict[str, Any] | None:
    """The queue as a per-rank part: a sharded loss's shard on a rank, and on an oracle of the
    same shards (``reference.ShardedReference``) the list of every rank's shard.

    Pass ``state=shard_state`` to compare a sharded loss with that oracle (as ``queue_state``
    does for a gathered loss and its plain reference)."""
    shards = getattr(loss_fn, "shards", None)
    if shards is not None:
        return {PER_RANK: [queue_state(shard) for shard in shards]}
    queue = queue_state(loss_fn)
    return None if queue is None else {PER_RANK: queue}


def queue_state(loss_fn: Any) -> dict[str, Any] | None:
    """The memory queue alone, of a ``QueuedRankingLoss`` or of the plain reference loss.

    Pass ``state=queue_state`` to compare a loss with a plain reference implementation as the
    oracle (``oracle_factory``), whose state is only its queue; the default, the whole
    ``state_dict()``, also holds the subsampling step and the temperature."""
    queue = getattr(loss_fn, "queue", loss_fn)
    if not hasattr(queue, "scores"):
        return None
    rows = {"scores": queue.scores, "targets": queue.targets, "weights": queue.weights}
    return {**cpu_copy(rows), "ptr": int(queue.ptr), "count": int(queue.count)}


@dataclass(frozen=True)
class LossAdapter:
    """How one case calls a loss and reads its state (built by :meth:`for_case`)."""

    num_classes: int
    ignore_index: int
    takes_padding: bool
    takes_sample_weight: bool
    state: StateAccessor
    oracle_state: StateAccessor
    state_is_default: bool  # read by whole_state_dict (the report's advice depends on it)
    writes_state_in_eval: bool
    loss_scale: float | str  # the ranks' loss is this times the oracle's (1 or "world_size")

    @classmethod
    def for_case(cls, case: Any, probe: Any) -> LossAdapter:
        """Fill what the case leaves open from a probe instance of the loss."""
        num_classes = case.num_classes
        if num_classes is None:
            num_classes = getattr(probe, "num_classes", None)
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(
                f"num_classes: the loss {type(probe).__name__} has no num_classes attribute "
                f"(saw {num_classes!r}); pass num_classes=<int >= 1> to the check (it is the "
                "model's output width and the label range)"
            )
        ignore_index = case.ignore_index
        if ignore_index is None:
            ignore_index = int(getattr(probe, "ignore_index", -100))
        accessor = case.state or whole_state_dict
        writes_in_eval = case.writes_state_in_eval
        if writes_in_eval is None:  # a loss of ours says so; any other: the default, False
            writes_in_eval = isinstance(probe, QueuedRankingLoss) and probe.update_queue_in_eval
        takes_weight = case.takes_sample_weight
        if takes_weight is None:
            takes_weight = _accepts_keyword(probe, "sample_weight")
        if case.loss_scale not in (1, 1.0, "world_size"):
            raise ValueError(f"loss_scale must be 1 or 'world_size', got {case.loss_scale!r}")
        return cls(
            num_classes=num_classes,
            ignore_index=ignore_index,
            takes_padding=case.takes_padding,
            takes_sample_weight=takes_weight,
            state=accessor,
            oracle_state=case.oracle_state or accessor,
            state_is_default=case.state is None,
            writes_state_in_eval=writes_in_eval,
            loss_scale=case.loss_scale,
        )

    def call(
        self, loss_fn: Any, logits: Tensor, targets: Tensor, weight: Tensor | None, kwargs: Any
    ) -> Any:
        """``loss_fn(logits, targets, **kwargs)``, with ``sample_weight`` on weighted steps."""
        if weight is not None:
            kwargs = {**kwargs, "sample_weight": weight}
        return loss_fn(logits, targets, **kwargs)

    def scale(self, world_size: int) -> float:
        """Factor between the ranks' loss value and the oracle's."""
        return float(world_size) if self.loss_scale == "world_size" else 1.0


def _accepts_keyword(loss_fn: Any, name: str) -> bool:
    target = loss_fn.forward if isinstance(loss_fn, nn.Module) else loss_fn
    try:
        parameters = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is p.VAR_KEYWORD for p in parameters)


def as_float64(loss_fn: Any) -> Any:
    """The loss in float64 (a callable that is not a module is taken as it is)."""
    return loss_fn.double() if isinstance(loss_fn, nn.Module) else loss_fn


def to_device(loss_fn: Any, device: torch.device) -> Any:
    return loss_fn.to(device) if isinstance(loss_fn, nn.Module) else loss_fn
