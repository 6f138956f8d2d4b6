"""The example loss of ``docs/ddp.md`` ("A subclass of ``QueuedRankingLoss``"), verbatim.

A new loss written the way the docs teach: an options table and ``per_class_loss``. It lives
in the package so the harness's spawned ranks can import it by name, and so the family's
tests can list it beside the shipped losses; ``tests/test_options.py`` keeps the docs' copy
equal to this one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from imbalanced_losses import Pool, QueuedRankingLoss
from imbalanced_losses.options import BASE_OPTIONS, TEMPERATURE, real


class TopQuantileHingeLoss(QueuedRankingLoss):
    """Mean soft hinge (width ``temperature``) of each positive below the (1 - quantile)
    quantile of its column, plus a margin."""

    options = (
        *BASE_OPTIONS,
        TEMPERATURE.with_default(0.1),  # served by the base: validated, annealable, agreed
        real("quantile", lambda q: 0 < q < 1, "a float in (0, 1)", default=0.2),
        real("margin", lambda m: m >= 0, "a finite float >= 0", default=0.1),
    )
    quantile: float
    margin: float

    def per_class_loss(self, pool: Pool) -> tuple[Tensor, Tensor]:
        rows = torch.cat(pool.threshold_blocks())  # detached; the max_pool_size sample if capped
        theta = torch.quantile(rows, 1 - self.quantile, dim=0, interpolation="higher")
        score, cls, weight = pool.positives()  # live positives carry the gradient
        tau = self.temperature
        # softplus is linear past `threshold`; 40 keeps it exact in float64 too
        hinge = tau * F.softplus((theta[cls] + self.margin - score) / tau, threshold=40)
        mass = torch.zeros_like(theta).index_add(0, cls, weight)
        total = torch.zeros_like(theta).index_add(0, cls, weight * hinge)
        return total / mass.clamp_min(1e-12), mass > 0
