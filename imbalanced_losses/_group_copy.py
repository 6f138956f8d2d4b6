"""Copying a module that holds a ``process_group``: deep copies share it, pickles leave it behind.

A process group is a handle to live ranks: ``copy.deepcopy`` (EMA copies) and pickle
(module-tree checkpoints) fail on it (``TypeError: cannot pickle 'ProcessGroup'``). A deep copy
lives in the same process and talks to the same ranks, so it shares the group; a pickle cannot
carry it, so the unpickled module uses the default group, warns, and its repr names the group it
was pickled with, until one is assigned (``module.process_group = group``).

:class:`GroupCopyMixin` is written for every loss with a ``process_group`` attribute; the queued
losses' base (``_base.QueuedRankingLoss``) keeps its own copy of these methods until it adopts
the mixin.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

from torch import nn

from . import _distributed


class GroupCopyMixin(nn.Module):
    """``__getstate__``/``__setstate__``/``__deepcopy__`` for a module with ``process_group``."""

    process_group: Any

    def __getstate__(self) -> dict[str, Any]:
        """Pickle without ``process_group``: a handle to live ranks cannot travel.

        The unpickled module uses the default group (``process_group`` is ``None``; its repr
        names the group it was pickled with) until one is assigned.
        """
        state = super().__getstate__()
        if self.process_group is not None:
            state["process_group"] = None
            state["_pickled_with_group"] = _distributed.describe_group(self.process_group)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if self.__dict__.get("_pickled_with_group"):
            from ._base import _caller_stacklevel  # lazy: the base will import this module

            warnings.warn(
                f"this {type(self).__name__} was pickled with process_group="
                f"{self._pickled_with_group}; a process group cannot be pickled, so it uses "
                "the default group now: assign loss_fn.process_group to pool another group",
                UserWarning,
                stacklevel=_caller_stacklevel(),
            )

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        """Copy all but ``process_group``, which the copy shares (same process, same ranks)."""
        if self.process_group is not None:
            memo[id(self.process_group)] = self.process_group
        twin = type(self).__new__(type(self))
        memo[id(self)] = twin
        nn.Module.__setstate__(twin, copy.deepcopy(nn.Module.__getstate__(self), memo))
        return twin

    def _group_repr(self) -> str:
        """``, process_group=...`` for ``extra_repr`` unless the module pools the default group."""
        if self.process_group is not None:
            return f", process_group={_distributed.describe_group(self.process_group)!r}"
        pickled = self.__dict__.get("_pickled_with_group")
        if pickled:
            return f", process_group=None (the default group; pickled with {pickled})"
        return ""
