"""A module that holds a handle to live ranks (``process_group``), and warns at the user's line.

A process group cannot be pickled and must not be duplicated: a deep copy shares it (same
process, same ranks), a pickle leaves it behind and says so, and the repr names it. Warnings
of the losses point at the first frame outside this package and torch, so a user sees the
line of their own code that triggered them.
"""

from __future__ import annotations

import copy
import os
import sys
import warnings
from typing import Any

import torch
from torch import nn

from . import _distributed


class ProcessGroupHandle(nn.Module):
    """An ``nn.Module`` with a ``process_group`` that survives deep copies and pickling."""

    process_group: Any

    def __getstate__(self) -> dict[str, Any]:
        """Pickle without ``process_group``: a handle to live ranks cannot travel.

        The unpickled loss uses the default group (``process_group`` is
        ``None``; its repr names the group it was pickled with) until one is
        assigned: ``loss_fn.process_group = group``.
        """
        state = super().__getstate__()
        if self.process_group is not None:
            state["process_group"] = None
            state["_pickled_with_group"] = _distributed.describe_group(self.process_group)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if self.__dict__.get("_pickled_with_group"):
            warnings.warn(
                f"this {type(self).__name__} was pickled with process_group="
                f"{self._pickled_with_group}; a process group cannot be pickled, so it uses "
                "the default group now: assign loss_fn.process_group to pool another group",
                UserWarning,
                stacklevel=caller_stacklevel(),
            )

    def __deepcopy__(self, memo: dict[int, Any]) -> ProcessGroupHandle:
        """Copy all but ``process_group``, which the copy shares (same process, same ranks)."""
        if self.process_group is not None:
            memo[id(self.process_group)] = self.process_group
        twin = type(self).__new__(type(self))
        memo[id(self)] = twin
        nn.Module.__setstate__(twin, copy.deepcopy(nn.Module.__getstate__(self), memo))
        return twin

    def _group_repr(self) -> str:
        """``, process_group=...`` for ``extra_repr`` unless the loss pools the default group."""
        if self.process_group is not None:
            return f", process_group={_distributed.describe_group(self.process_group)!r}"
        pickled = self.__dict__.get("_pickled_with_group")
        if pickled:
            return f", process_group=None (the default group; pickled with {pickled})"
        return ""


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))


def caller_stacklevel() -> int:
    """``stacklevel`` that points a warning at the first frame outside this package and torch."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(
        (_PACKAGE_DIR, _TORCH_DIR)
    ):
        frame, level = frame.f_back, level + 1
    return level
