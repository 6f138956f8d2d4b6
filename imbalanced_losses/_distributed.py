"""Everything that talks to ``torch.distributed`` lives here.

Gathers are rank-ordered within a process group (``group=None``: the default
group) and accept uneven (even empty) per-rank row counts. Rank order and the
gradient factor come from that group, never from the whole world, so a loss
used under DDP on the data-parallel group of a 2-D mesh pools exactly the rows
that DDP averages over. Three gradient rules are offered:

* ``all_gather_with_grad`` (public, general): the backward sums every rank's
  gradient for this rank's rows (one all-reduce), which is right whatever each
  rank does with the gathered tensor.
* ``replicated`` (used by the losses): every rank computes the *same* loss
  from the *same* gathered pool, so every rank already holds the full
  gradient. Returning ``group size x`` the local slice then makes DDP's
  gradient *average* equal the single-process gradient exactly, with no
  collective in backward. Keeping only the slice without the factor is the
  well-known silent ``1 / world_size`` bug.
* ``gather_own_column`` (the replicated rule for losses whose gradient only
  flows through each row's own-class score): the rows travel detached and only
  a ``[global rows]`` vector carries gradient, never a dense ``[rows, C]`` one.

Collective tensors live where the group's backend needs them
(:func:`collective_device`): a CPU tensor under NCCL (or a CUDA tensor under
gloo) is moved for the collective and back.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ._autograd import once_differentiable

Group = Any  # a torch.distributed ProcessGroup, or None for the default group


def world(group: Group = None) -> tuple[int, int]:
    """``(rank, size)`` within ``group``, ``(0, 1)`` when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def describe_group(group: Group) -> str:
    """``group`` for messages and reprs: its global ranks, or "the default group"."""
    if group is None:
        return "the default group"
    try:
        return f"the group of ranks {dist.get_process_group_ranks(group)}"
    except (RuntimeError, ValueError):  # destroyed, or not a member: no ranks to show
        return "a process group"


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def should_gather(gather_distributed: bool | None, group: Group = None) -> bool:
    """Resolve ``gather_distributed`` *now* (auto: initialised and the group has > 1 rank)."""
    active = world(group)[1] > 1
    if gather_distributed is None:
        return active
    if gather_distributed and not is_initialized():
        raise RuntimeError(
            "gather_distributed=True but torch.distributed is not initialised; "
            "call torch.distributed.init_process_group first or pass gather_distributed=None"
        )
    return bool(gather_distributed) and active


def collective_device(group: Group = None) -> torch.device:
    """Device that collective tensors must live on for ``group``'s backend.

    NCCL only moves CUDA tensors (the current device, one GPU per rank); gloo
    and the others take CPU tensors, which also makes the host read of the
    metadata row a plain copy.
    """
    if is_initialized() and "nccl" in str(dist.get_backend(group)).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _on_backend(tensor: Tensor, group: Group) -> Tensor:
    """``tensor`` where the backend can move it (CPU under NCCL, CUDA under gloo move)."""
    device = collective_device(group)
    if tensor.device.type != device.type:
        return tensor.to(device)
    return tensor


def all_gather_rows_of_equal_shape(tensor: Tensor, group: Group = None) -> list[Tensor]:
    """One ``all_gather`` of a tensor that has the same shape on every rank of ``group``.

    The results come back on ``tensor``'s device.
    """
    return _all_gather_equal(tensor, group, rows=False)


def _all_gather_equal(tensor: Tensor, group: Group, *, rows: bool) -> list[Tensor]:
    """The one ``all_gather``, counted as rows or as other (metadata) bytes."""
    sendable = _on_backend(tensor.contiguous(), group)
    out = [torch.empty_like(sendable) for _ in range(world(group)[1])]
    dist.all_gather(out, sendable, group=group)
    _count_gather(out, rows=rows)
    return [t.to(tensor.device) for t in out]


def _gather_padded(tensor: Tensor, sizes: list[int], group: Group) -> Tensor:
    """Rank-ordered concatenation of uneven row blocks via one padded ``all_gather``."""
    rank, _ = world(group)
    longest = max(sizes)
    if longest == 0:
        return tensor.new_empty((0, *tensor.shape[1:]))
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: sizes[rank]] = tensor
    blocks = _all_gather_equal(padded, group, rows=True)
    return torch.cat([block[:n] for block, n in zip(blocks, sizes)], dim=0)


def _local_slice(grad: Tensor, sizes: list[int], group: Group) -> Tensor:
    rank, _ = world(group)
    start = sum(sizes[:rank])
    return grad[start : start + sizes[rank]]


class _GatherRows(torch.autograd.Function):
    """Replicated rule: the backward keeps this rank's slice times the group size.

    Not twice differentiable: a second derivative would need the other ranks' terms
    (another collective), so differentiating the gradient raises rather than dropping them.
    """

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, sizes: list[int], group: Group) -> Tensor:
        ctx.sizes, ctx.group = sizes, group
        return _gather_padded(tensor, sizes, group)

    @staticmethod
    @once_differentiable("the gather of rows across ranks (replicated gradient rule)")
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        return _local_slice(grad, ctx.sizes, ctx.group) * world(ctx.group)[1], None, None


def gather_rows(tensor: Tensor, sizes: list[int], *, group: Group = None) -> Tensor:
    """Rank-ordered gather of rows whose per-rank counts are known (replicated gradient rule)."""
    if tensor.requires_grad:
        return _GatherRows.apply(tensor, sizes, group)
    return _gather_padded(tensor, sizes, group)


class _GatherOwnColumn(torch.autograd.Function):
    """Gather detached rows; only each row's own-class score carries gradient back."""

    @staticmethod
    def forward(
        ctx: Any, own: Tensor, packed: Tensor, width: int, sizes: list[int], group: Group
    ) -> tuple[Tensor, Tensor]:
        ctx.sizes, ctx.group = sizes, group
        ctx.set_materialize_grads(False)  # no zero [rows, C] gradient for the detached rows
        gathered = _gather_padded(packed, sizes, group)
        ctx.mark_non_differentiable(gathered)
        return gathered, _own_scores(gathered, width)

    @staticmethod
    @once_differentiable("the gather of own-class scores across ranks (replicated rule)")
    def backward(
        ctx: Any, _grad_rows: Tensor | None, grad_own: Tensor | None
    ) -> tuple[Tensor | None, None, None, None, None]:
        if grad_own is None:
            return None, None, None, None, None
        # The replicated rule on a [global rows] vector: local slice times the group size.
        local = _local_slice(grad_own, ctx.sizes, ctx.group) * world(ctx.group)[1]
        return local, None, None, None, None


def _own_scores(packed: Tensor, width: int) -> Tensor:
    """Each packed row's score in the column stored in its last entry."""
    return packed[:, :width].gather(1, packed[:, -1:].long()).squeeze(1)


def gather_own_column(
    scores: Tensor, own_column: Tensor, extra: Tensor, sizes: list[int], group: Group = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Gather ``scores [n, C]`` detached with ``extra [n, k]`` columns, in one collective.

    Returns ``(scores [M, C], extra [M, k], own [M])`` in rank order, where
    ``own[i]`` is row ``i``'s score in column ``own_column[i]``: the only output
    that carries gradient back to ``scores`` (``group size x`` the local slice).
    """
    width = scores.shape[1]
    packed = torch.cat(
        [scores.detach(), extra.to(scores.dtype), own_column[:, None].to(scores.dtype)], dim=1
    )
    own_local = scores.gather(1, own_column[:, None]).squeeze(1)
    if own_local.requires_grad:
        gathered, own = _GatherOwnColumn.apply(own_local, packed, width, sizes, group)
    else:
        gathered = _gather_padded(packed, sizes, group)
        own = _own_scores(gathered, width)
    return gathered[:, :width], gathered[:, width:-1], own


def gather_sizes(tensor: Tensor, group: Group = None) -> list[int]:
    """Row count of every rank of ``group`` (one small collective, one host read)."""
    return [row[0] for row in gather_counts(torch.tensor([tensor.shape[0]]), group)]


def all_gather_with_grad(tensor: Tensor, *, process_group: Group = None) -> Tensor:
    """Concatenate ``tensor`` (``[n_r, ...]``, ``n_r`` may differ) from all ranks in rank order.

    The result is differentiable: its backward sums, across ranks, the
    gradients that flow into this rank's rows (one all-reduce in backward), so
    the usual DDP average of a per-rank loss is exact. ``process_group``: the
    ranks to gather from (default: all), e.g. the data-parallel group that DDP
    averages gradients over. Returns ``tensor`` unchanged when not running
    distributed. Differentiable once: differentiating the gradient again raises
    (a second derivative would need the other ranks' terms).
    """
    if world(process_group)[1] == 1:
        return tensor
    return _GatherRowsWithSum.apply(tensor, gather_sizes(tensor, process_group), process_group)


class _GatherRowsWithSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: Tensor, sizes: list[int], group: Group) -> Tensor:
        ctx.sizes, ctx.group, ctx.device = sizes, group, tensor.device
        return _gather_padded(tensor, sizes, group)

    @staticmethod
    @once_differentiable("all_gather_with_grad (its backward is an all-reduce)")
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        summed = _on_backend(grad.contiguous(), ctx.group)
        dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=ctx.group)
        _count_reduce(summed)
        return _local_slice(summed, ctx.sizes, ctx.group).to(ctx.device), None, None


def all_gather_no_grad(tensor: Tensor, *, process_group: Group = None) -> Tensor:
    """Like :func:`all_gather_with_grad` without gradient (for metrics and queues)."""
    if world(process_group)[1] == 1:
        return tensor.detach()
    with torch.no_grad():
        return _gather_padded(tensor.detach(), gather_sizes(tensor, process_group), process_group)


# --------------------------------------------------------------------------- traffic
# Every collective of this module is counted where it is issued, as the bytes this rank
# RECEIVES (the logical payload; a ring all-reduce moves about twice the reduced size over the
# wire, an all_gather (W - 1)/W of its output), so a benchmark reads it per step without a
# profiler. The cost when nobody reads it is a few integer additions per collective.


@dataclass
class Traffic:
    """Collectives issued by this process through this module, and the bytes each received.

    ``bytes = reduced + gathered``. ``reduced``: for each ``all_reduce``, the size of the
    reduced tensor (the sharded mode's statistics, and the backward of
    :func:`all_gather_with_grad`). ``gathered``: for each ``all_gather``, every rank's block
    (this rank's own included, padding included: the size of the output). ``rows``: the part
    of ``gathered`` that carried rows (the padded row gathers), the rest being metadata (the
    agreed row, the row counts). ``recent``: the bytes of each of the last 64 calls.
    """

    calls: int = 0
    bytes: int = 0
    reduced: int = 0
    gathered: int = 0
    rows: int = 0
    recent: deque[int] = field(default_factory=lambda: deque(maxlen=64))


_TRAFFIC = Traffic()


def traffic() -> Traffic:
    """A copy of the counters since the last :func:`reset_traffic`."""
    t = _TRAFFIC
    return Traffic(t.calls, t.bytes, t.reduced, t.gathered, t.rows, deque(t.recent, maxlen=64))


def reset_traffic() -> None:
    _TRAFFIC.calls = _TRAFFIC.bytes = _TRAFFIC.reduced = _TRAFFIC.gathered = _TRAFFIC.rows = 0
    _TRAFFIC.recent.clear()


def _count(size: int) -> None:
    _TRAFFIC.calls += 1
    _TRAFFIC.bytes += size
    _TRAFFIC.recent.append(size)


def _count_reduce(reduced: Tensor) -> None:
    size = reduced.numel() * reduced.element_size()
    _TRAFFIC.reduced += size
    _count(size)


def _count_gather(blocks: list[Tensor], *, rows: bool) -> None:
    size = sum(b.numel() * b.element_size() for b in blocks)
    _TRAFFIC.gathered += size
    if rows:
        _TRAFFIC.rows += size
    _count(size)


# --------------------------------------------------------------------------- statistics, not rows
# The sharded mode exchanges fixed-size statistics (each call counted, as ``reduced``).


def _all_reduce(tensor: Tensor, op: Any, group: Group) -> Tensor:
    """A reduced copy of ``tensor`` on its own device (``tensor`` itself is left alone)."""
    if world(group)[1] == 1:
        return tensor.clone()
    reduced = _on_backend(tensor.contiguous(), group)
    if reduced is tensor:
        reduced = tensor.clone()
    dist.all_reduce(reduced, op=op, group=group)
    _count_reduce(reduced)
    return reduced.to(tensor.device)


def all_reduce_sum(tensor: Tensor, group: Group = None) -> Tensor:
    """Element-wise sum over the ranks of ``group`` (one counted collective, none alone)."""
    return _all_reduce(tensor, dist.ReduceOp.SUM, group)


def all_reduce_min(tensor: Tensor, group: Group = None) -> Tensor:
    """Element-wise minimum over the ranks of ``group`` (one counted collective, none alone)."""
    return _all_reduce(tensor, dist.ReduceOp.MIN, group)


class _AllReduceReplicated(torch.autograd.Function):
    """Sum over ranks whose result feeds a loss every rank computes identically.

    The replicated rule for statistics (sharded mode): each rank's incoming gradient is
    the same, so the sum over ranks of it, which the exact backward of a sum would
    all-reduce, is ``group size x`` this rank's own; no collective in backward.
    """

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, group: Group) -> Tensor:
        ctx.group = group
        return _all_reduce(tensor, dist.ReduceOp.SUM, group)

    @staticmethod
    @once_differentiable("the all-reduce of per-rank statistics (replicated gradient rule)")
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * world(ctx.group)[1], None


def all_reduce_replicated(tensor: Tensor, group: Group = None) -> Tensor:
    """Element-wise sum over the ranks (one counted collective) with the replicated gradient rule.

    For a loss that every rank computes from the same reduced statistics: the gradient
    reaching ``tensor`` is ``group size x`` the local one, so DDP's average over ranks equals
    the single-process gradient. Keeping the local gradient alone is the ``1 / W`` bug.
    """
    if tensor.requires_grad:
        return _AllReduceReplicated.apply(tensor, group)
    return _all_reduce(tensor, dist.ReduceOp.SUM, group)


def gather_counts(counts: Tensor, group: Group = None) -> list[list[int]]:
    """Every rank's ``[k]`` integer counts, read on the host (one counted ``all_gather``).

    The host read makes the host wait for the collective (a sync on CUDA): for counts the
    host must hold, e.g. to select rows without a device sync of its own.
    """
    if world(group)[1] == 1:
        return [counts.to("cpu", copy=True).tolist()]
    blocks = all_gather_rows_of_equal_shape(counts.long(), group)
    return torch.stack(blocks).to("cpu", copy=True).tolist()


class _GatherSummingOwn(torch.autograd.Function):
    """Gather rows detached; the ``own`` column's backward sums every rank's gradient.

    Only the leading ``grad_sizes[r]`` rows of each rank's block take part in the backward's
    all-reduce (the others, e.g. queued rows, have nowhere to send a gradient).
    """

    @staticmethod
    def forward(
        ctx: Any,
        own: Tensor,
        packed: Tensor,
        sizes: list[int],
        grad_sizes: list[int],
        group: Group,
    ) -> tuple[Tensor, Tensor]:
        ctx.sizes, ctx.grad_sizes, ctx.group = sizes, grad_sizes, group
        gathered = _gather_or_copy(packed, sizes, group)
        ctx.mark_non_differentiable(gathered)
        return gathered, gathered[:, 0].clone()

    @staticmethod
    @once_differentiable("the gather of positives across ranks (summed gradient rule)")
    def backward(
        ctx: Any, _grad_rows: Tensor | None, grad_own: Tensor
    ) -> tuple[Tensor, None, None, None, None]:
        sizes, grad_sizes = ctx.sizes, ctx.grad_sizes
        rank = world(ctx.group)[0]
        local = grad_own.new_zeros(sizes[rank])
        if sum(grad_sizes) == 0:  # the same on every rank: no collective anywhere
            return local, None, None, None, None
        if grad_sizes != sizes:
            starts = [sum(sizes[:r]) for r in range(len(sizes))]
            grad_own = torch.cat([grad_own[a : a + n] for a, n in zip(starts, grad_sizes)])
        # Exact rule: this rank's rows get the sum, over ranks, of each rank's gradient.
        summed = all_reduce_sum(grad_own, ctx.group)
        mine = _local_slice(summed, grad_sizes, ctx.group)
        local[: mine.shape[0]] = mine
        return local, None, None, None, None


def _gather_or_copy(packed: Tensor, sizes: list[int], group: Group) -> Tensor:
    """:func:`_gather_padded`, or a copy when alone (no collective for one rank)."""
    if world(group)[1] == 1:
        return packed.clone()
    return _gather_padded(packed, sizes, group)


def gather_summing_grad(
    own: Tensor,
    extra: Tensor,
    sizes: list[int],
    group: Group = None,
    *,
    grad_sizes: list[int] | None = None,
) -> tuple[Tensor, Tensor]:
    """Rank-ordered gather of ``own [n]`` (with gradient) and ``extra [n, k]`` (detached).

    One counted ``all_gather`` of ``[n, 1 + k]`` rows (padded to the longest rank). The
    gradient of the gathered ``own`` is the exact (summing) rule of
    :func:`all_gather_with_grad`, for a vector: one counted ``all_reduce`` in backward, so
    each rank's rows get every rank's gradient for them. ``grad_sizes[r]`` (default
    ``sizes``): how many leading rows of rank ``r``'s block can take a gradient; only those
    travel in the backward (``[sum(grad_sizes)]``), the others get zero. Returns
    ``(own [K], extra [K, k])``.
    """
    packed = torch.cat([own.detach()[:, None], extra.to(own.dtype)], dim=1)
    if own.requires_grad:
        grad_sizes = list(sizes) if grad_sizes is None else grad_sizes
        gathered, own_all = _GatherSummingOwn.apply(own, packed, sizes, grad_sizes, group)
    else:
        gathered = _gather_or_copy(packed, sizes, group)
        own_all = gathered[:, 0]
    return own_all, gathered[:, 1:]
