"""Deliberately broken losses: each has one classic DDP bug, and the harness must catch it.

They live in their own module so the spawned ranks can import them by name.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from imbalanced_losses import Pool, RecallAtQuantileLoss, _distributed


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class LocalSliceGradient(RecallAtQuantileLoss):
    """Same value, but the gradient of a gather that keeps only the local slice: 1/world_size."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = super().forward(*args, **kwargs)
        world_size = _world()[1]
        loss = out[0] if isinstance(out, tuple) else out
        loss = loss.detach() + (loss - loss.detach()) / world_size
        return (loss, *out[1:]) if isinstance(out, tuple) else loss


class LocalFirstGather(RecallAtQuantileLoss):
    """Pools this rank's rows first, then the others: each rank's pool order (and queue) differs."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        original = _distributed._gather_padded

        def local_first(tensor: torch.Tensor, sizes: list[int], group: Any) -> torch.Tensor:
            rows = original(tensor, sizes, group)
            rank = _world()[0]
            start, stop = sum(sizes[:rank]), sum(sizes[: rank + 1])
            order = [*range(start, stop), *range(start), *range(stop, rows.shape[0])]
            return rows[torch.tensor(order, dtype=torch.long, device=rows.device)]

        _distributed._gather_padded = local_first
        try:
            return super().forward(*args, **kwargs)
        finally:
            _distributed._gather_padded = original


class PerRankSubsampleSeed(RecallAtQuantileLoss):
    """Draws the max_pool_size threshold sample from a generator seeded by the rank."""

    def per_class_loss(self, pool: Pool) -> tuple[torch.Tensor, torch.Tensor]:
        if pool.threshold_rows is not None:
            generator = torch.Generator().manual_seed(1000 * _world()[0] + self.subsample_step)
            rows = torch.randperm(pool.size, generator=generator)[: self.max_pool_size]
            pool.threshold_rows = rows.to(pool.threshold_rows.device)
        return super().per_class_loss(pool)


class SubsampleStepOnRankOne(RecallAtQuantileLoss):
    """Rank 1 advances its saved subsampling step after each forward: the queue, the loss and
    the gradients stay right (no ``max_pool_size``: the step draws nothing), only the
    ``state_dict()``'s extra state differs across ranks."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = super().forward(*args, **kwargs)
        if _world()[0] == 1:
            self.subsample_step += 1
        return out
