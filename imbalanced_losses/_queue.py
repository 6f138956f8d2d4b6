"""A circular memory of past scores: it only stores, it never decides what to store."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class MemoryQueue(nn.Module):
    """Fixed-size circular buffer of ``(scores [C], target, weight, iid)`` rows.

    A push of fewer than ``capacity`` rows writes them at the pointer, wrapping
    round and overwriting the oldest rows. A push of at least ``capacity`` rows
    replaces the queue: slot ``i`` holds the ``i``-th of its last ``capacity``
    rows and the pointer goes back to 0, so the result does not depend on where
    the pointer was. Either way the oldest row sits at ``ptr``. ``ptr`` and ``count`` are
    plain ints (no device sync to read them) saved through the module's extra
    state, so ``state_dict()`` holds everything needed to resume. A checkpoint saved
    before ``iid`` was stored loads with every row iid (what ``iid_mask=None`` means).

    ``per_rank=True`` (a sharded loss's shard): the rows are this rank's own, so they are kept
    as plain tensor attributes rather than buffers. DDP broadcasts a module's buffers from
    rank 0 (at construction, and before each forward with ``broadcast_buffers``), which would
    overwrite every shard with rank 0's when the loss sits inside the DDP module. They still
    move with ``.to()``/``.double()`` and are saved and loaded under the same keys.
    """

    scores: Tensor
    targets: Tensor
    weights: Tensor
    iid: Tensor

    def __init__(
        self,
        capacity: int,
        width: int,
        dtype: torch.dtype = torch.float32,
        *,
        per_rank: bool = False,
    ) -> None:
        super().__init__()
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity = int(capacity)
        self.width = int(width)
        self.per_rank = per_rank
        rows = {
            "scores": torch.zeros(capacity, width, dtype=dtype),
            "targets": torch.zeros(capacity, dtype=torch.long),
            "weights": torch.zeros(capacity, dtype=dtype),
            "iid": torch.ones(capacity, dtype=torch.bool),
        }
        for name, tensor in rows.items():
            if per_rank:
                setattr(self, name, tensor)  # a plain attribute: no DDP buffer broadcast
            else:
                self.register_buffer(name, tensor)
        self.ptr = 0
        self.count = 0
        # The capacity the next load_state_dict accepts (and resizes to) when it is not this
        # queue's: set by a sharded loss, whose shard size depends on the saving world.
        self.load_capacity: int | None = None

    def resize(self, capacity: int) -> None:
        """Empty the queue and give it room for ``capacity`` rows (same device and dtype)."""
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity = int(capacity)
        for name in _ROWS:
            old = getattr(self, name)
            fresh = old.new_ones if name == "iid" else old.new_zeros
            setattr(self, name, fresh((self.capacity, *old.shape[1:])))
        self.reset()

    @torch.no_grad()
    def keep_every(self, step: int, offset: int, capacity: int) -> None:
        """Keep rows ``offset, offset + step, ...`` of the FIFO order (oldest first) in a queue
        of ``capacity`` rows: rank ``offset``'s part of a whole queue split over ``step``."""
        n = self.count
        oldest = self.ptr if n == self.capacity else 0
        order = (oldest + torch.arange(n, device=self.scores.device)) % max(self.capacity, 1)
        kept = order[offset::step]
        rows = (self.scores[kept], self.targets[kept], self.weights[kept], self.iid[kept])
        self.resize(capacity)
        self.push(*rows)

    def rows(self) -> tuple[Tensor, Tensor, Tensor]:
        """The filled rows ``(scores [n, C], targets [n], weights [n])``, storage order."""
        n = self.count
        return self.scores[:n], self.targets[:n], self.weights[:n]

    def iid_rows(self) -> Tensor:
        """The filled rows' ``iid`` flags ``[n]``, storage order (as :meth:`rows`)."""
        return self.iid[: self.count]

    def reset(self) -> None:
        """Forget every stored row."""
        self.ptr = 0
        self.count = 0

    @torch.no_grad()
    def push(
        self,
        scores: Tensor,
        targets: Tensor,
        weights: Tensor | None = None,
        iid: Tensor | None = None,
    ) -> None:
        """Write rows at the pointer, or replace the queue (detached, cast to its dtype).

        ``weights`` default to 1 and ``iid`` to True.
        """
        m = scores.shape[0]
        if self.capacity == 0 or m == 0:
            return
        if weights is None:
            weights = torch.ones(m, dtype=self.weights.dtype, device=scores.device)
        if m >= self.capacity:  # replace: the last `capacity` rows, oldest at slot 0
            first, start = m - self.capacity, 0
        else:
            first, start = 0, self.ptr
        kept = m - first
        slots = (start + torch.arange(kept, device=self.scores.device)) % self.capacity
        self.scores.index_copy_(0, slots, scores[first:].to(self.scores.dtype))
        self.targets.index_copy_(0, slots, targets[first:].to(torch.long))
        self.weights.index_copy_(0, slots, weights[first:].to(self.weights.dtype))
        if iid is None:
            self.iid.index_fill_(0, slots, True)
        else:
            self.iid.index_copy_(0, slots, iid[first:].to(torch.bool))
        self.ptr = (start + kept) % self.capacity
        self.count = min(self.count + kept, self.capacity)

    def get_extra_state(self) -> dict[str, Any]:
        return {"ptr": self.ptr, "count": self.count}

    def _apply(self, fn: Any, recurse: bool = True) -> MemoryQueue:
        super()._apply(fn, recurse)
        if self.per_rank:  # the rows are no buffers: convert them as buffers would be
            for name in _ROWS:
                setattr(self, name, fn(getattr(self, name)))
        return self

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.per_rank:  # under the keys buffers would have
            for name in _ROWS:
                tensor = getattr(self, name)
                destination[prefix + name] = tensor if keep_vars else tensor.detach()

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
        accepted, self.load_capacity = self.load_capacity, None
        if saved is not None and accepted is not None and saved.shape[0] == accepted:
            if accepted != self.capacity and tuple(saved.shape[1:]) == (self.width,):
                self.resize(accepted)  # a shard saved at another world size: see the loss
        if saved is not None and tuple(saved.shape) != (self.capacity, self.width):
            raise ValueError(
                f"cannot load queue state: checkpoint holds scores of shape "
                f"{tuple(saved.shape)} (queue_size={saved.shape[0]}, width={saved.shape[-1]}), "
                f"this loss expects ({self.capacity}, {self.width}) "
                f"(queue_size={self.capacity}, width={self.width})"
            )
        if saved is not None and prefix + "iid" not in state_dict:
            # Saved before the queue stored iid flags: its rows were all iid (no iid_mask).
            state_dict = {**state_dict, prefix + "iid": torch.ones(self.capacity, dtype=torch.bool)}
        if self.per_rank:
            for name in _ROWS:
                key = prefix + name
                if key not in state_dict:
                    missing_keys.append(key)
                    continue
                with torch.no_grad():
                    getattr(self, name).copy_(state_dict[key])
            # The rows are loaded; the rest (the extra state) as a module loads it.
            ours = {prefix + name for name in _ROWS}
            state_dict = {k: v for k, v in state_dict.items() if k not in ours}
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return f"capacity={self.capacity}, width={self.width}, count={self.count}"


_ROWS = ("scores", "targets", "weights", "iid")  # the tensors of the rows, in state_dict order
