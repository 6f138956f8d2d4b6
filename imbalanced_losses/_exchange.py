"""Every rank validates and agrees before any state changes; a bad rank never leaves others waiting.

The one protocol of a pooled step, used by the ranking losses, the focal losses and the metric:

1. **check**: each rank judges its own inputs. Host checks (shape, dtype, device) give a
   ``problem``; value checks (targets in range, weights finite) stay on the device as flags,
   counts (rows kept, finite rows, positives) too. A rank whose host check failed joins with
   no rows, no flags and zero counts: the one placeholder, so it still takes part below.
2. **agree**: one small collective exchanges each rank's *metadata row* (problem flag, rows
   kept, value flags, counts, then one column per agreed value: options, call options, state),
   read on the host once (the forward's one sync). Every rank takes the same decision: raise,
   naming the rank at fault or each value the ranks disagree on with every rank's value and
   the likely fix, or go on. Ranks that disagree would otherwise gather rows of different
   sizes (a crash inside the transport) or train on different pools (silent divergence).
3. **filter**: :meth:`Exchange.keep` drops this rank's padding rows by a count the host now
   knows (no further sync).
4. **gather**: :meth:`Exchange.gather`, every rank's rows in rank order; a caller with its
   own gradient rule gathers with :attr:`Exchange.sizes`. The sharded mode (``sharded=True``)
   skips it: each rank keeps its rows and the loss *reduces* per-class statistics instead,
   with the same agreed sizes and decision (the queue shards' row counts ride in the
   metadata row as a count), and nothing else from the steps above.

Host numbers reach a CUDA device by an asynchronous copy from pinned memory; values that
already live on the device are converted there, never read on the host.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from . import _distributed
from ._device import host_copy, to_device, true_indices

MUST_MATCH = "every rank must match"
CHECKPOINT_FIX = (
    "the loss state differs between ranks: load the checkpoint on every rank "
    "(load_state_dict on one rank only leaves the others behind)"
)
QUEUE_FIX = CHECKPOINT_FIX + ", and call reset_queue() on every rank or on none"
TEMPERATURE_FIX = (
    "set loss_fn.temperature to the same value on every rank (run the annealing schedule on "
    "every rank), or load the checkpoint on every rank"
)
LOGITS_DTYPE_FIX = (
    "pass logits of one dtype on every rank (the same model precision, autocast and "
    ".to(dtype) on every rank)"
)
LOSS_DTYPE_FIX = "convert the loss the same way on every rank (loss_fn.to(dtype), .double())"

# Floating dtypes by a stable code; others get a code from their name's checksum.
_DTYPES = ("float16", "bfloat16", "float32", "float64")


def number(value: float) -> str:
    """An integral value without its ``.0``, anything else as Python prints it."""
    return str(int(value)) if math.isfinite(value) and value == int(value) else repr(value)


def dtype_code(dtype: torch.dtype | None) -> float:
    """``dtype`` as a number that travels in a float64 column (-1: no dtype, bad input)."""
    if dtype is None:
        return -1.0
    name = str(dtype).removeprefix("torch.")
    if name in _DTYPES:
        return float(_DTYPES.index(name))
    return float(1000 + zlib.crc32(name.encode()) % 1_000_000)


def dtype_name(code: float) -> str:
    """The inverse of :func:`dtype_code`, for messages."""
    if 0 <= code < len(_DTYPES) and code == int(code):
        return f"torch.{_DTYPES[int(code)]}"
    return "no tensor" if code == -1 else f"dtype code {number(code)}"


@dataclass(frozen=True)
class Agreed:
    """One value every rank must hold: how the error names and shows it, and how to fix it.

    ``value`` is a host number, or a 0-d tensor when the loss keeps it on the device (it is
    then converted on the device, never read on the host).
    """

    name: str
    value: float | Tensor
    fix: str = MUST_MATCH
    show: Callable[[float], str] = number


def columns(agreed: Sequence[Agreed], device: torch.device) -> Tensor:
    """The agreed values as float64 columns on ``device``, without a host sync."""
    host = [0.0 if isinstance(a.value, Tensor) else float(a.value) for a in agreed]
    row = to_device(torch.tensor(host, dtype=torch.float64), device)
    for i, a in enumerate(agreed):
        if isinstance(a.value, Tensor):
            row[i] = a.value.detach().reshape(())  # copied and converted on the device
    return row


def raise_on_disagreement(metas: list[list[float]], first: int, agreed: Sequence[Agreed]) -> None:
    """Raise the same ``ValueError`` on every rank when any agreed column differs.

    ``metas`` is every rank's exchanged row; the agreed columns start at ``first``. The
    message lists every value that differs (per rank) and then each distinct fix once.
    """
    differing, fixes = [], []
    for i, a in enumerate(agreed):
        seen = [m[first + i] for m in metas]
        if all(v == seen[0] for v in seen):
            continue
        by_rank = ", ".join(f"rank {r}: {a.show(v)}" for r, v in enumerate(seen))
        differing.append(f"{a.name} ({by_rank})")
        if a.fix not in fixes:
            fixes.append(a.fix)
    if differing:
        raise ValueError(f"ranks disagree on {', '.join(differing)}; {'; '.join(fixes)}")


@dataclass
class Check:
    """One rank's verdict on its inputs, before anything is exchanged.

    ``problem``: a host check failed (the rank then joins with no rows, no flags and zero
    counts, whatever the other fields hold). ``rows``: how many rows this rank keeps.
    ``flags``: value problems found on the device, by name. ``counts``: more numbers every
    rank learns from each rank (row counts the host needs to select without a sync).
    """

    problem: str | None = None
    rows: Tensor | int = 0
    flags: Mapping[str, Tensor | bool] = field(default_factory=dict)
    counts: Mapping[str, Tensor | int] = field(default_factory=dict)


@dataclass
class Exchange:
    """What the ranks agreed on: the decision was "go on"; the sizes and counts to do it with."""

    rank: int
    distributed: bool
    group: Any
    sizes: list[int]
    counts: dict[str, list[float]]

    def total(self, name: str) -> int:
        """A count summed over the ranks."""
        return int(sum(self.counts[name]))

    def mine(self, name: str) -> float:
        """This rank's own value of a count."""
        return self.counts[name][self.rank]

    def keep(self, keep: Tensor, *tensors: Tensor) -> tuple[Tensor, ...]:
        """``tensors``' rows where ``keep`` is True, selected by the agreed count (no sync)."""
        count = self.sizes[self.rank]
        if count == keep.shape[0]:
            return tensors
        index = true_indices(keep, count)
        return tuple(t[index] for t in tensors)

    def gather(self, rows: Tensor) -> Tensor:
        """Every rank's rows in rank order (the replicated gradient rule); as is when alone."""
        if not self.distributed:
            return rows
        return _distributed.gather_rows(rows, self.sizes, group=self.group)


def agree(
    check: Check,
    agreed: Sequence[Agreed],
    *,
    flags: Mapping[str, Callable[[], str]],
    counts: Sequence[str] = (),
    device: torch.device,
    distributed: bool,
    group: Any = None,
) -> Exchange:
    """Exchange every rank's metadata row and raise the same decision on every rank.

    ``flags`` names the value flags in order, each with how to describe it from this
    rank's inputs (called only where flagged); ``counts`` names the counts. Alone (not
    ``distributed``), a host problem raises at once, with no exchange.
    """
    if check.problem is not None and not distributed:
        raise ValueError(check.problem)
    failed = check.problem is not None
    values: list[Tensor | int | bool] = [failed, 0 if failed else check.rows]
    values += [False if failed else check.flags.get(name, False) for name in flags]
    values += [0 if failed else check.counts.get(name, 0) for name in counts]
    head = torch.stack(
        [torch.as_tensor(v, device=device).to(torch.float64).reshape(()) for v in values]
    )
    row = torch.cat([head, columns(agreed, device)])
    if distributed:
        metas = host_copy(
            torch.stack(_distributed.all_gather_rows_of_equal_shape(row, group))
        ).tolist()
    else:
        metas = host_copy(row[None]).tolist()
    rank = _distributed.world(group)[0] if distributed else 0
    describe = {0: lambda: check.problem or ""}
    describe.update({2 + i: d for i, d in enumerate(flags.values())})
    for column, explain in describe.items():
        flagged = [r for r, m in enumerate(metas) if m[column]]
        if not flagged:
            continue
        if rank in flagged:
            message = explain()
            raise ValueError(message if len(metas) == 1 else f"rank {rank}: {message}")
        raise ValueError(
            f"invalid input on rank(s) {flagged} (see their error); "
            "no rank changed its state this step"
        )
    first = 2 + len(flags)
    raise_on_disagreement(metas, first + len(counts), agreed)
    return Exchange(
        rank=rank,
        distributed=distributed,
        group=group,
        sizes=[int(m[1]) for m in metas],
        counts={name: [m[first + i] for m in metas] for i, name in enumerate(counts)},
    )
