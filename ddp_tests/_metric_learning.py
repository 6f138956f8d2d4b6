"""pytorch-metric-learning's cross-batch memory, built for the harness (module level, so that
spawned ranks import it by name; a factory, so that every call builds a fresh memory)."""

from __future__ import annotations

from pytorch_metric_learning.losses import ContrastiveLoss, CrossBatchMemory
from pytorch_metric_learning.utils.distributed import DistributedLossWrapper
from torch import Tensor, nn

EMBEDDING_SIZE = 4  # the harness's model output width (its num_classes) and the label range
MEMORY_SIZE = 16


def distributed_cross_batch_memory() -> nn.Module:
    """What its documentation suggests for DDP: the memory inside ``DistributedLossWrapper``."""
    memory = CrossBatchMemory(ContrastiveLoss(), EMBEDDING_SIZE, memory_size=MEMORY_SIZE)
    return DistributedLossWrapper(memory)


class SingleProcessMemory(nn.Module):
    """The oracle: the same memory fed the global batch by one process. Held as ``.loss`` so that
    its ``state_dict`` has the wrapper's keys (the wrapper itself refuses to run outside DDP)."""

    def __init__(self) -> None:
        super().__init__()
        self.loss = CrossBatchMemory(ContrastiveLoss(), EMBEDDING_SIZE, memory_size=MEMORY_SIZE)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return self.loss(embeddings, labels)
