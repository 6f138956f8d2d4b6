"""Public gather helpers, at the module path code written for the reference library imports.

``from imbalanced_losses.distributed import all_gather_with_grad`` works as it does there.
One deliberate difference: without an initialised process group (or with one rank) the
helpers return their input instead of raising, so the same code runs unlaunched. The
implementation lives in ``imbalanced_losses._distributed``, the only module that talks to
``torch.distributed``.
"""

from ._distributed import all_gather_no_grad, all_gather_with_grad

__all__ = ["all_gather_no_grad", "all_gather_with_grad"]
