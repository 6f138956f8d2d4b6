"""Training losses for class-imbalanced, alert-budget problems, exact under DDP."""

import importlib

from ._base import QueuedRankingLoss
from ._distributed import all_gather_no_grad, all_gather_with_grad
from ._pool import Pool, Rows
from ._queue import MemoryQueue
from .focal_loss import SigmoidFocalLoss, SoftmaxFocalLoss
from .functional import recall_at_quantile_loss
from .metrics import recall_at_quantile
from .pauc_loss import PAUCAtBudgetLoss
from .recall_loss import RecallAtQuantileLoss
from .smooth_ap import SmoothAPLoss
from .warmup import LossWarmupWrapper

__version__ = "0.1.0"

__all__ = [
    "LossWarmupWrapper",
    "MemoryQueue",
    "PAUCAtBudgetLoss",
    "Pool",
    "QueuedRankingLoss",
    "RecallAtQuantileLoss",
    "Rows",
    "SigmoidFocalLoss",
    "SmoothAPLoss",
    "SoftmaxFocalLoss",
    "all_gather_no_grad",
    "all_gather_with_grad",
    "recall_at_quantile",
    "recall_at_quantile_loss",
]


# Public names that need an optional dependency: imported on first access, so that
# `import imbalanced_losses` and the losses never need it. Name -> (module, extra).
_OPTIONAL_EXPORTS = {"RecallAtQuantile": ("._metric_class", "metrics")}


def __getattr__(name: str) -> object:
    if name in _OPTIONAL_EXPORTS:
        module = importlib.import_module(_OPTIONAL_EXPORTS[name][0], __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_OPTIONAL_EXPORTS])
