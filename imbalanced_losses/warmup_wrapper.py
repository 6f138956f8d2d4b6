"""``LossWarmupWrapper`` at the module path code written for the reference library imports.

The implementation lives in ``imbalanced_losses.warmup``; this is the same object.
"""

from .warmup import LossWarmupWrapper

__all__ = ["LossWarmupWrapper"]
