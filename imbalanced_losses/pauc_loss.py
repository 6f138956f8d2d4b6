"""Partial AUC in a false-positive-rate band (the alert budget), on the queued-loss base."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ._base import BASE_OPTIONS, TEMPERATURE, QueuedRankingLoss
from ._device import HostCopy
from ._options import arguments, choice, integer, real
from ._pauc_math import (
    BUDGET_BASES,
    POS_NUMERATORS,
    SURROGATES,
    TAU_SCALES,
    PAUCOptions,
    grad_pos_count,
    pauc_per_class,
)
from ._pool import Pool
from .functional import INTERPOLATIONS

PAUCOutput = (
    Tensor
    | tuple[Tensor, Tensor, Tensor]
    | tuple[Tensor, dict[str, Tensor]]
    | tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]
)


class PAUCAtBudgetLoss(QueuedRankingLoss):
    r"""``1 - pAUC`` of each class over the false-positive-rate band ``[alpha, beta]``.

    The reference library's (imbalanced-losses 0.6.0) ``PAUCAtBudgetLoss``, value for
    value, on the family's base (queue, exact DDP gather, agreement, ``max_pool_size``).
    For class ``c``, with ``ref`` the pooled *iid* negatives of ``c``
    (``budget_basis="fpr"``) or all pooled iid rows (``"population"``), the band edges
    ``t_alpha = quantile(ref, 1 - alpha)``, ``t_beta = quantile(ref, 1 - beta)`` carry no
    gradient, and ``tau = temperature * scale`` with ``scale`` the IQR of ``ref``
    (``tau_scale="iqr"``) or ``t_alpha - t_beta`` (``"band"``).

    * ``"trapezoid"``: soft TPR of the numerator positives at ``n_knots`` thresholds of
      equally spaced FPR levels in ``[alpha, beta]``, integrated by the normalised
      trapezoid rule; the gradient reaches positives only.
    * ``"pairwise"``: weighted mean over numerator positives ``i`` and band negatives
      ``j`` (``t_beta <= s_j <= t_alpha``) of ``sigmoid((s_i - s_j) / tau)``; the gradient
      reaches both, computed in tiles (memory linear in the pool).

    A class counts when the pool holds a positive and an iid negative of it, a numerator
    positive with weight > 0, a scale above 1e-12 (else it is *degenerate*: one warning
    per instance, re-armed by ``reset_queue()``) and, pairwise, a band negative.

    Args:
        num_classes: number of columns of ``logits``; 1 for binary (positives: target 1).
        alpha, beta: the FPR band, ``0 <= alpha < beta <= 1``.
        surrogate: ``"trapezoid"`` or ``"pairwise"``.
        n_knots: trapezoid knots, at least 2.
        tau_scale: ``"iqr"`` or ``"band"``.
        pos_numerator: ``"pool"`` (every pooled positive) or ``"live"`` (this step's, of
            every rank; the queue then only sets the band).
        budget_basis: ``"fpr"`` (edges from iid negatives) or ``"population"`` (all iid rows).
        queue_size: rows of past (detached) scores pooled; 0 disables the queue.
        temperature: relative sigmoid width; settable between steps, saved in ``state_dict()``.
        reduction: ``"mean"`` / ``"sum"`` over valid classes, or ``"none"`` (``[C]``, NaN
            where invalid).
        ignore_index: target of padding rows; they never count nor enter the queue.
        update_queue_in_eval: also write the queue in ``eval()`` mode.
        gather_distributed: pool all ranks' rows (``None``: whenever ``torch.distributed``
            is initialised with world size > 1).
        quantile_interpolation: as in ``torch.quantile``, for every edge, knot and quartile.
        max_pool_size: compute over a uniform sample of this many pooled rows (live and
            queued alike), redrawn at each training step.
        seed: seed of that sample's private generator (the global RNG is untouched).
        sharded: keep each rank's rows on its rank (docs/ddp.md, "Sharded mode"); not
            available for this loss (``ValueError``).
        process_group: the ranks whose rows are pooled (default: all).

    Shape:
        ``logits`` ``[N, C]``, ``targets`` ``[N]``, ``iid_mask`` ``[N]`` bool (default: all
        rows iid; it travels with the rows through the gather and the queue),
        ``sample_weight`` ``[N]`` non-negative (weights the numerator positives only).
    """

    options = (
        *BASE_OPTIONS,
        real("alpha", lambda a: 0.0 <= a < 1.0, "a float in [0, 1)", default=0.0),
        real("beta", lambda b: 0.0 < b <= 1.0, "a float in (0, 1]", default=0.005),
        choice("surrogate", SURROGATES, default="trapezoid"),
        integer("n_knots", 2, default=2),
        choice("tau_scale", TAU_SCALES, default="iqr"),
        choice("pos_numerator", POS_NUMERATORS, default="pool"),
        choice("budget_basis", BUDGET_BASES, default="fpr"),
        TEMPERATURE,
        choice("quantile_interpolation", INTERPOLATIONS, default="higher"),
    )
    alpha: float
    beta: float
    surrogate: str
    n_knots: int
    tau_scale: str
    pos_numerator: str
    budget_basis: str
    quantile_interpolation: str

    def __init__(
        self,
        num_classes: int,
        alpha: float = 0.0,
        beta: float = 0.005,
        surrogate: str = "trapezoid",
        n_knots: int = 2,
        tau_scale: str = "iqr",
        pos_numerator: str = "pool",
        budget_basis: str = "fpr",
        queue_size: int = 1024,
        temperature: float = 0.1,
        reduction: str = "mean",
        ignore_index: int = -100,
        update_queue_in_eval: bool = False,
        gather_distributed: bool | None = None,
        quantile_interpolation: str = "higher",
        max_pool_size: int | None = None,
        *,
        seed: int = 0,
        sharded: bool = False,
        process_group: Any = None,
    ) -> None:
        super().__init__(**arguments(locals()))
        if not self.alpha < self.beta:
            raise ValueError(
                f"alpha must be < beta (the FPR band [alpha, beta]), got alpha={alpha!r}, "
                f"beta={beta!r}"
            )
        # The forward's request for diagnostics, and what per_class_loss computed for it.
        self._diagnostics_wanted = False
        self._diagnostics: dict[str, Tensor] | None = None
        self._pending_degenerate: HostCopy | None = None

    @torch.compiler.disable
    def forward(
        self,
        logits: Tensor,
        targets: Tensor,
        iid_mask: Tensor | None = None,
        return_per_class: bool = False,
        return_diagnostics: bool = False,
        *,
        sample_weight: Tensor | None = None,
        update_queue: bool | None = None,
    ) -> PAUCOutput:
        """The base's forward (see :meth:`QueuedRankingLoss.forward`), plus diagnostics.

        ``return_diagnostics=True`` appends the reference's dict: per class ``t_alpha``,
        ``t_beta``, ``tau_eff``, ``pauc_var`` (NaN where invalid), ``band_neg_count`` (iid
        negatives in the band; 0 where invalid), all of the pool, and ``grad_pos_count``
        (this rank's live positives). Returns ``loss``, ``(loss, per_class, valid)``,
        ``(loss, diagnostics)`` or ``(loss, per_class, valid, diagnostics)``.
        """
        self._diagnostics_wanted = bool(return_diagnostics)
        self._diagnostics = None
        try:
            out = super().forward(
                logits,
                targets,
                iid_mask,
                True,
                sample_weight=sample_weight,
                update_queue=update_queue,
            )
        finally:
            self._diagnostics_wanted = False
        assert isinstance(out, tuple)  # return_per_class=True
        loss, per_class, valid = out
        if not return_diagnostics:
            return (loss, per_class, valid) if return_per_class else loss
        diag = self._diagnostics
        self._diagnostics = None
        if diag is None:  # an empty pool: nothing was ranked
            nan = per_class.detach().new_full((self.num_classes,), math.nan)
            diag = {k: nan.clone() for k in ("t_alpha", "t_beta", "tau_eff", "pauc_var")}
            diag["band_neg_count"] = torch.zeros_like(valid, dtype=torch.long)
        diag["grad_pos_count"] = grad_pos_count(targets, self.num_classes, self.ignore_index).to(
            valid.device
        )
        return (loss, per_class, valid, diag) if return_per_class else (loss, diag)

    def per_class_loss(self, pool: Pool) -> tuple[Tensor, Tensor]:
        blocks = pool.blocks()  # [live, queued], or the max_pool_size sample as one block
        n_live = pool.live.scores.shape[0]
        sample = pool.threshold_rows
        if sample is None:
            live = torch.arange(pool.size, device=pool.live.targets.device) < n_live
        else:
            live = sample < n_live
        iids = [block.iid for block in blocks]
        assert all(iid is not None for iid in iids)
        result = pauc_per_class(
            torch.cat([block.scores for block in blocks]),
            torch.cat([block.targets for block in blocks]),
            torch.cat([block.weights for block in blocks]),
            torch.cat(iids),  # type: ignore[arg-type]
            live,
            self._math_options(),
            diagnostics=self._diagnostics_wanted,
        )
        self._diagnostics = result.diagnostics
        self._warn_if_degenerate(result.degenerate)
        return result.loss, result.valid

    def reset_queue(self) -> None:
        """Empty the memory queue; re-arms the warnings (a pending check is dropped)."""
        super().reset_queue()
        self._pending_degenerate = None

    def _math_options(self) -> PAUCOptions:
        return PAUCOptions(
            alpha=self.alpha,
            beta=self.beta,
            surrogate=self.surrogate,
            n_knots=self.n_knots,
            tau_scale=self.tau_scale,
            pos_numerator=self.pos_numerator,
            budget_basis=self.budget_basis,
            temperature=self.temperature,
            interpolation=self.quantile_interpolation,
        )

    def _warn_if_degenerate(self, degenerate: Tensor) -> None:
        """Warn (once) when a class's band dispersion is <= 1e-12 and it was left out.

        Read without making the host wait: on CUDA the flags are read at a later step,
        once they have reached the host (on the CPU at once).
        """
        if "degenerate scale" in self._warned:
            return
        if self._pending_degenerate is None:
            flags = degenerate.to(torch.float64)
            self._pending_degenerate = HostCopy(torch.cat([flags.amax().reshape(1), flags]))
        reading = self._pending_degenerate.get()
        if reading is None:
            return
        self._pending_degenerate = None
        if not reading[0]:
            return
        classes = [c for c, flag in enumerate(reading[1:]) if flag]
        self._warn_once(
            "degenerate scale",
            f"{type(self).__name__}: the dispersion of the band's reference scores "
            f"(tau_scale={self.tau_scale!r}) is <= 1e-12 for class(es) {classes}, so tau_eff "
            "would be 0; those classes are left out of the loss this step. Constant scores, "
            "or a band narrower than the score resolution, cause this. (Shown once per "
            "instance; reset_queue() re-arms it.)",
        )
