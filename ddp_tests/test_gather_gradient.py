"""Under DDP the recall loss's backward builds no dense [global rows, C] gradient.

Only each row's own-class score carries gradient through the gather (a [global rows] vector);
the rows themselves travel detached. Every tensor the backward creates is recorded (shapes, via
a dispatch mode) and none may span the global rows and the class columns. The gradient itself
is checked against one process fed the global batch, here and in test_ddp_exactness.py.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from imbalanced_losses import RecallAtQuantileLoss
from imbalanced_losses.testing import run_ranks

NUM_CLASSES = 6
SIZES = (5, 9)  # rows per rank; 14 global rows
GLOBAL = sum(SIZES)


class ShapeRecorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.shapes.append((str(func), tuple(t.shape)))
        return out


def _global_batch():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(GLOBAL, NUM_CLASSES, generator=gen, dtype=torch.float64)
    return logits, torch.randint(0, NUM_CLASSES, (GLOBAL,), generator=gen)


def _loss():
    return RecallAtQuantileLoss(NUM_CLASSES, quantile=0.3, queue_size=0, temperature=0.5).double()


def _backward_on_rank(rank: int) -> dict:
    logits, targets = _global_batch()
    start = sum(SIZES[:rank])
    mine = logits[start : start + SIZES[rank]].clone().requires_grad_(True)
    loss = _loss()(mine, targets[start : start + SIZES[rank]])
    with ShapeRecorder() as recorder:
        loss.backward()
    return {"grad": mine.grad, "shapes": recorder.shapes}


def test_the_gathered_gradient_is_a_vector_and_the_gradient_is_exact():
    results = run_ranks(_backward_on_rank, len(SIZES), timeout_s=120)
    logits, targets = _global_batch()
    logits.requires_grad_(True)
    _loss()(logits, targets).backward()
    for rank, result in enumerate(results):
        dense = [
            (op, shape)
            for op, shape in result["shapes"]
            if len(shape) == 2 and shape[0] == GLOBAL and shape[1] >= NUM_CLASSES
        ]
        assert not dense, f"rank {rank}: dense [global rows, C] tensors in backward: {dense}"
        vectors = [shape for _, shape in result["shapes"] if shape == (GLOBAL,)]
        assert vectors, f"rank {rank}: no [global rows] gradient seen; was the gather used?"
        start = sum(SIZES[:rank])
        # DDP averages over the 2 ranks; each rank holds world_size x its slice.
        expected = logits.grad[start : start + SIZES[rank]] * len(SIZES)
        torch.testing.assert_close(result["grad"], expected, rtol=1e-12, atol=1e-15)
