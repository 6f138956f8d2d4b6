"""Everything that talks to ``torch.distributed`` lives here.

Gathers are rank-ordered and accept uneven (even empty) per-rank row counts.
Two gradient rules are offered:

* ``all_gather_with_grad`` (public, general): the backward sums every rank's
  gradient for this rank's rows (one all-reduce), which is right whatever each
  rank does with the gathered tensor.
* ``replicated`` (used by the losses): every rank computes the *same* loss
  from the *same* gathered pool, so every rank already holds the full
  gradient. Returning ``world_size x`` the local slice then makes DDP's
  gradient *average* equal the single-process gradient exactly, with no
  collective in backward. Keeping only the slice without the factor is the
  well-known silent ``1 / world_size`` bug.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default group, ``(0, 1)`` when not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def should_gather(gather_distributed: bool | None) -> bool:
    """Resolve the ``gather_distributed`` option *now* (auto = initialised and world > 1)."""
    active = world()[1] > 1
    if gather_distributed is None:
        return active
    if gather_distributed and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "gather_distributed=True but torch.distributed is not initialised; "
            "call torch.distributed.init_process_group first or pass gather_distributed=None"
        )
    return bool(gather_distributed) and active


def all_gather_rows_of_equal_shape(tensor: Tensor) -> list[Tensor]:
    """One ``all_gather`` of a tensor that has the same shape on every rank."""
    out = [torch.empty_like(tensor) for _ in range(world()[1])]
    dist.all_gather(out, tensor.contiguous())
    return out


def _gather_padded(tensor: Tensor, sizes: list[int]) -> Tensor:
    """Rank-ordered concatenation of uneven row blocks via one padded ``all_gather``."""
    rank, _ = world()
    longest = max(sizes)
    if longest == 0:
        return tensor.new_empty((0, *tensor.shape[1:]))
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: sizes[rank]] = tensor
    blocks = all_gather_rows_of_equal_shape(padded)
    return torch.cat([block[:n] for block, n in zip(blocks, sizes)], dim=0)


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: Tensor, sizes: list[int], replicated: bool) -> Tensor:
        ctx.sizes, ctx.replicated = sizes, replicated
        return _gather_padded(tensor, sizes)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None]:
        rank, world_size = world()
        start = sum(ctx.sizes[:rank])
        if ctx.replicated:
            local = grad[start : start + ctx.sizes[rank]] * world_size
        else:
            grad = grad.contiguous()
            dist.all_reduce(grad, op=dist.ReduceOp.SUM)
            local = grad[start : start + ctx.sizes[rank]]
        return local, None, None


def gather_rows(tensor: Tensor, sizes: list[int], *, replicated: bool = True) -> Tensor:
    """Differentiable rank-ordered gather when the per-rank row counts are already known."""
    if tensor.requires_grad:
        return _GatherRows.apply(tensor, sizes, replicated)
    return _gather_padded(tensor, sizes)


def gather_sizes(tensor: Tensor) -> list[int]:
    """Row count of every rank (one small collective)."""
    n = torch.tensor([tensor.shape[0]], dtype=torch.long, device=tensor.device)
    return [int(t.item()) for t in all_gather_rows_of_equal_shape(n)]


def all_gather_with_grad(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` (``[n_r, ...]``, ``n_r`` may differ) from all ranks in rank order.

    The result is differentiable: its backward sums, across ranks, the
    gradients that flow into this rank's rows (one all-reduce in backward), so
    the usual DDP average of a per-rank loss is exact. Returns ``tensor``
    unchanged when not running distributed.
    """
    if world()[1] == 1:
        return tensor
    return _GatherRows.apply(tensor, gather_sizes(tensor), False)


def all_gather_no_grad(tensor: Tensor) -> Tensor:
    """Like :func:`all_gather_with_grad` without gradient (for metrics and queues)."""
    if world()[1] == 1:
        return tensor.detach()
    with torch.no_grad():
        return _gather_padded(tensor.detach(), gather_sizes(tensor))
