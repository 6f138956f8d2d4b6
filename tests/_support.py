"""Helpers shared by the tests: random batches, the library/reference pair, comparisons."""

from __future__ import annotations

import torch

from imbalanced_losses import RecallAtQuantileLoss
from imbalanced_losses.testing.reference import ReferenceRecallAtQuantileLoss

INTERPOLATIONS = ("linear", "lower", "higher", "nearest", "midpoint")
REDUCTIONS = ("mean", "sum", "none")
TIGHT = dict(rtol=1e-12, atol=1e-12)


def make_pair(num_classes, *, dtype=torch.float64, **kwargs):
    """The library loss (cast to ``dtype``) and the reference with the same settings."""
    lib = RecallAtQuantileLoss(num_classes, **kwargs).to(dtype)
    ref_kwargs = {k: v for k, v in kwargs.items() if k not in ("max_pool_size", "seed")}
    ref = ReferenceRecallAtQuantileLoss(num_classes, dtype=dtype, **ref_kwargs)
    return lib, ref


def random_batch(
    gen,
    n,
    num_classes,
    *,
    dtype=torch.float64,
    ties=False,
    pad_frac=0.0,
    ignore_index=-100,
    weighted=False,
    pos_rate=0.3,
):
    """``(logits [n, C], targets [n], sample_weight [n] or None)`` from a torch.Generator."""
    if ties:
        logits = torch.randint(-2, 3, (n, num_classes), generator=gen).to(dtype)
    else:
        logits = (torch.randn(n, num_classes, generator=gen, dtype=torch.float64) * 2).to(dtype)
    if num_classes == 1:
        targets = (torch.rand(n, generator=gen) < pos_rate).long()
    else:
        targets = torch.randint(0, num_classes, (n,), generator=gen)
    if pad_frac > 0:
        pad = torch.rand(n, generator=gen) < pad_frac
        targets = torch.where(pad, torch.full_like(targets, ignore_index), targets)
    weights = None
    if weighted:
        weights = torch.rand(n, generator=gen, dtype=torch.float64) * 3
        weights = torch.where(torch.rand(n, generator=gen) < 0.25, 0.0, weights).to(dtype)
    return logits, targets, weights


def queue_state(loss_fn):
    """``(scores, targets, weights, ptr, count)`` of the filled part of a queue, as copies."""
    q = loss_fn.queue if hasattr(loss_fn, "queue") else loss_fn
    n = q.count
    return q.scores[:n].clone(), q.targets[:n].clone(), q.weights[:n].clone(), q.ptr, q.count


def assert_same_queue(lib, ref):
    """The library's queue holds exactly the reference's rows, slot for slot."""
    mine, theirs = lib.queue, ref.queue
    assert (mine.ptr, mine.count) == (theirs.ptr, theirs.count)
    n = theirs.count
    assert torch.equal(mine.scores[:n], theirs.scores[:n])
    assert torch.equal(mine.targets[:n], theirs.targets[:n])
    assert torch.equal(mine.weights[:n], theirs.weights[:n])


def assert_queue_unchanged(loss_fn, before):
    after = queue_state(loss_fn)
    assert after[3:] == before[3:], f"ptr/count changed: {before[3:]} -> {after[3:]}"
    for a, b in zip(after[:3], before[:3]):
        assert torch.equal(a, b)


def fill_queue(loss_fn, gen, steps=3, n=8):
    """Run a few training steps so the queue holds real rows."""
    c = loss_fn.num_classes
    dtype = loss_fn.queue.scores.dtype
    for _ in range(steps):
        logits, targets, _ = random_batch(gen, n, c, dtype=dtype)
        loss_fn(logits, targets)
    assert loss_fn.queue.count > 0


def objective(loss, valid, gen_seed=0):
    """A scalar to differentiate: the loss itself, or a random mix of the valid classes."""
    if loss.dim() == 0:
        return loss
    coef = (
        torch.rand(
            loss.shape[0], generator=torch.Generator().manual_seed(gen_seed), dtype=torch.float64
        ).to(loss.dtype)
        + 0.5
    )
    return (coef * torch.where(valid, loss, torch.zeros_like(loss))).sum()
