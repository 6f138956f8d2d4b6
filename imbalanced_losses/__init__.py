"""Training losses for class-imbalanced, alert-budget problems, exact under DDP."""

from ._base import Pool, QueuedRankingLoss, Rows
from ._distributed import all_gather_no_grad, all_gather_with_grad
from ._queue import MemoryQueue
from .metrics import recall_at_quantile
from .recall_loss import RecallAtQuantileLoss
from .smooth_ap import SmoothAPLoss
from .warmup import LossWarmupWrapper

__version__ = "0.1.0"

__all__ = [
    "LossWarmupWrapper",
    "MemoryQueue",
    "Pool",
    "QueuedRankingLoss",
    "RecallAtQuantileLoss",
    "Rows",
    "SmoothAPLoss",
    "all_gather_no_grad",
    "all_gather_with_grad",
    "recall_at_quantile",
]


def __getattr__(name: str) -> object:
    # RecallAtQuantile subclasses torchmetrics.Metric: import it (and torchmetrics) only when
    # asked for, so that the losses never need torchmetrics.
    if name == "RecallAtQuantile":
        from ._metric_class import RecallAtQuantile

        return RecallAtQuantile
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
