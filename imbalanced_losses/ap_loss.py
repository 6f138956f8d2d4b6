"""``SmoothAPLoss`` at the module path code written for the reference library imports.

The implementation lives in ``imbalanced_losses.smooth_ap``; this is the same object.
"""

from .smooth_ap import SmoothAPLoss

__all__ = ["SmoothAPLoss"]
