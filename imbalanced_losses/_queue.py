"""A circular memory of past scores: it only stores, it never decides what to store."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class MemoryQueue(nn.Module):
    """Fixed-size circular buffer of ``(scores [C], target, weight)`` rows.

    Rows are written as if one at a time: the write pointer advances by the
    number of rows pushed (mod capacity), so a push of at least ``capacity``
    rows leaves exactly its last ``capacity`` rows. ``ptr`` and ``count`` are
    plain ints (no device sync to read them) saved through the module's extra
    state, so ``state_dict()`` holds everything needed to resume.
    """

    scores: Tensor
    targets: Tensor
    weights: Tensor

    def __init__(self, capacity: int, width: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity = int(capacity)
        self.width = int(width)
        self.register_buffer("scores", torch.zeros(capacity, width, dtype=dtype))
        self.register_buffer("targets", torch.zeros(capacity, dtype=torch.long))
        self.register_buffer("weights", torch.zeros(capacity, dtype=dtype))
        self.ptr = 0
        self.count = 0

    def rows(self) -> tuple[Tensor, Tensor, Tensor]:
        """The filled rows ``(scores [n, C], targets [n], weights [n])``, storage order."""
        n = self.count
        return self.scores[:n], self.targets[:n], self.weights[:n]

    def reset(self) -> None:
        """Forget every stored row."""
        self.ptr = 0
        self.count = 0

    @torch.no_grad()
    def push(self, scores: Tensor, targets: Tensor, weights: Tensor | None = None) -> None:
        """Write rows circularly at the pointer (detached, cast to the buffer dtype)."""
        m = scores.shape[0]
        if self.capacity == 0 or m == 0:
            return
        if weights is None:
            weights = torch.ones(m, dtype=self.weights.dtype, device=scores.device)
        kept = min(m, self.capacity)
        first_kept = m - kept
        slots = (self.ptr + first_kept + torch.arange(kept, device=self.scores.device)) % (
            self.capacity
        )
        self.scores.index_copy_(0, slots, scores[first_kept:].to(self.scores.dtype))
        self.targets.index_copy_(0, slots, targets[first_kept:].to(torch.long))
        self.weights.index_copy_(0, slots, weights[first_kept:].to(self.weights.dtype))
        self.ptr = (self.ptr + m) % self.capacity
        self.count = min(self.count + m, self.capacity)

    def get_extra_state(self) -> dict[str, Any]:
        return {"ptr": self.ptr, "count": self.count}

    def set_extra_state(self, state: Any) -> None:
        ptr, count = int(state["ptr"]), int(state["count"])
        upper = max(self.capacity - 1, 0)
        if not 0 <= ptr <= upper:
            raise ValueError(f"queue state: ptr={ptr} is outside [0, {upper}]")
        if not 0 <= count <= self.capacity:
            raise ValueError(f"queue state: count={count} is outside [0, {self.capacity}]")
        if count < self.capacity and ptr != count % max(self.capacity, 1):
            raise ValueError(
                f"queue state: a partly filled queue (count={count}) must have ptr == count, "
                f"got ptr={ptr}"
            )
        self.ptr, self.count = ptr, count

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # Refuse a checkpoint from a differently sized queue with a message that
        # says which setting differs, instead of torch's generic size mismatch.
        saved = state_dict.get(prefix + "scores")
        if saved is not None and tuple(saved.shape) != (self.capacity, self.width):
            raise ValueError(
                f"cannot load queue state: checkpoint holds scores of shape "
                f"{tuple(saved.shape)} (queue_size={saved.shape[0]}, width={saved.shape[-1]}), "
                f"this loss expects ({self.capacity}, {self.width}) "
                f"(queue_size={self.capacity}, width={self.width})"
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return f"capacity={self.capacity}, width={self.width}, count={self.count}"
