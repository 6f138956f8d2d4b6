"""A memory-bank loss written the way a user would, without anything from imbalanced_losses.

``BankedMarginLoss`` keeps a bank of past score rows under its own names (``bank``,
``bank_labels``, ``write_at``) and gathers every rank's rows itself. ``bug=`` plants one classic
DDP mistake, so the tests can require the harness to flag each with the right check:

* ``"local_gradient"``: the gather keeps only the local slice's gradient (1/world_size of it);
* ``"writes_in_eval"``: the bank is written in eval too;
* ``"local_order"``: each rank banks its own rows first, so the banks differ across ranks;
* ``"position_not_saved"``: the write position is a plain attribute, missing from the
  ``state_dict``, so a resumed run writes at slot 0 again.

Two more mistakes that leave nothing for a check to compare, which the harness must report as
not checked rather than pass: ``PlainAttributeMemoryLoss`` keeps its memory in a plain tensor
attribute (an empty ``state_dict()``), and ``HardRecallLoss`` has a gradient of 0 everywhere.

Module level, so the spawned ranks can import it by name.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

BUGS = ("local_gradient", "writes_in_eval", "local_order", "position_not_saved")


class _GatherRows(torch.autograd.Function):
    """All ranks' rows in rank order; backward sums the gradient every rank computed for this
    rank's rows (each rank computes the same loss, and DDP then averages over ranks)."""

    @staticmethod
    def forward(ctx: Any, rows: Tensor, sizes: list[int]) -> Tensor:
        ctx.sizes, ctx.rank = sizes, dist.get_rank()
        padded = rows.new_zeros(max(sizes), *rows.shape[1:])
        padded[: rows.shape[0]] = rows
        blocks = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(blocks, padded)
        return torch.cat([block[:n] for block, n in zip(blocks, sizes)])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None


def _gather(scores: Tensor, labels: Tensor, bug: str | None) -> tuple[Tensor, Tensor]:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return scores, labels
    count = torch.tensor([scores.shape[0]], device=scores.device)
    counts = [torch.empty_like(count) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    rank = dist.get_rank()
    all_labels = _GatherRows.apply(labels, sizes)
    if bug == "local_gradient":
        with torch.no_grad():
            all_scores = _GatherRows.apply(scores, sizes)
        start = sum(sizes[:rank])
        all_scores = torch.cat([all_scores[:start], scores, all_scores[start + scores.shape[0] :]])
    else:
        all_scores = _GatherRows.apply(scores, sizes)
    if bug == "local_order":
        start, stop = sum(sizes[:rank]), sum(sizes[: rank + 1])
        order = [*range(start, stop), *range(start), *range(stop, sum(sizes))]
        index = torch.tensor(order, dtype=torch.long, device=scores.device)
        return all_scores[index], all_labels[index]
    return all_scores, all_labels


class BankedMarginLoss(nn.Module):
    """Each positive's score should clear its column's mean over this step's rows (all ranks)
    and a bank of past rows by ``margin``; rows with a negative label are padding."""

    def __init__(
        self, width: int, bank_size: int = 16, margin: float = 0.5, bug: str | None = None
    ):
        super().__init__()
        if bug not in (None, *BUGS):
            raise ValueError(f"bug must be None or one of {BUGS}, got {bug!r}")
        self.margin, self.bug = margin, bug
        self.register_buffer("bank", torch.zeros(bank_size, width))
        self.register_buffer("bank_labels", torch.full((bank_size,), -1, dtype=torch.long))
        if bug == "position_not_saved":
            self.write_at = 0
        else:
            self.register_buffer("write_at", torch.zeros((), dtype=torch.long))

    def forward(self, scores: Tensor, labels: Tensor) -> Tensor:
        keep = labels >= 0
        scores, labels = _gather(scores[keep], labels[keep], self.bug)
        pool = torch.cat([scores.detach(), self.bank[self.bank_labels >= 0]])
        centre = pool.mean(dim=0) if pool.shape[0] else scores.new_zeros(scores.shape[1])
        own = scores.gather(1, labels[:, None])[:, 0]
        loss = F.softplus(centre[labels] + self.margin - own).sum() / max(labels.shape[0], 1)
        if self.training or self.bug == "writes_in_eval":
            self._push(scores.detach(), labels)
        return loss

    def _push(self, scores: Tensor, labels: Tensor) -> None:
        size = self.bank.shape[0]
        for row, label in zip(scores[-size:], labels[-size:]):
            at = int(self.write_at)
            self.bank[at] = row
            self.bank_labels[at] = label
            if isinstance(self.write_at, Tensor):
                self.write_at.fill_((at + 1) % size)
            else:
                self.write_at = (at + 1) % size


class PlainAttributeMemoryLoss(nn.Module):
    """Exact on the gathered rows, with a memory of recent scores (for a later threshold) kept
    in a plain tensor attribute: it is in no ``state_dict()``, and each rank writes only its own
    rows there. The memory does not enter the loss, so only a state check could see it."""

    def __init__(self, width: int, slots: int = 8, margin: float = 0.5):
        super().__init__()
        self.margin = margin
        self.memory = torch.zeros(slots, width)  # not a buffer: state_dict() is empty
        self.write_at = 0

    def forward(self, scores: Tensor, labels: Tensor) -> Tensor:
        keep = labels >= 0
        local = scores[keep].detach()
        scores, labels = _gather(scores[keep], labels[keep], None)
        own = scores.gather(1, labels[:, None])[:, 0]
        loss = F.softplus(self.margin - own).sum() / max(labels.shape[0], 1)
        if self.training:
            for row in local[-self.memory.shape[0] :]:
                self.memory[self.write_at] = row.to(self.memory.dtype)
                self.write_at = (self.write_at + 1) % self.memory.shape[0]
        return loss


def plain_attribute_memory(loss: PlainAttributeMemoryLoss) -> dict[str, Any]:
    """The state accessor the report asks for (``state=``): the memory and its write position."""
    return {"memory": loss.memory.detach().cpu().clone(), "write_at": loss.write_at}


class HardRecallLoss(nn.Module):
    """1 - the share of positives whose own-class score clears ``margin``, counted with
    ``torch.sign``: a hard indicator where a sigmoid belongs. The value is right and exact under
    DDP, but its gradient is 0 everywhere, so the model never learns and a gradient check
    compares zeros with zeros."""

    def __init__(self, margin: float = 0.0):
        super().__init__()
        self.margin = margin

    def forward(self, scores: Tensor, labels: Tensor) -> Tensor:
        keep = labels >= 0
        scores, labels = _gather(scores[keep], labels[keep], None)
        own = scores.gather(1, labels[:, None])[:, 0]
        cleared = (torch.sign(own - self.margin) + 1) / 2
        return 1 - cleared.sum() / max(labels.shape[0], 1)
