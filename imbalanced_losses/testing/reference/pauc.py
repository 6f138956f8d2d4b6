"""Plain reference of the FPR-band partial-AUC loss (``PAUCAtBudgetLoss``), from the formula.

Deliberately plain, to be an oracle and a baseline: a Python loop over classes, boolean
masks, ``torch.quantile`` per class (so it keeps its 2^24-row limit) and the full
``[positives, band]`` pair matrix. No validation, no subsampling, no gather. Meant for
float64.

Per class ``c`` (binary, ``num_classes == 1``: column 0, positives are target 1)::

    pos      = pooled rows of class c;  num = pos (pos_numerator "pool") or live pos ("live")
    ref      = pooled iid rows not of class c ("fpr") or all pooled iid rows ("population")
    t_alpha  = quantile(ref, 1 - alpha);  t_beta = quantile(ref, 1 - beta)        (detached)
    scale    = quantile(ref, .75) - quantile(ref, .25) ("iqr")  or  t_alpha - t_beta ("band")
    tau      = temperature * scale
    trapezoid: t_k = quantile(ref, 1 - f_k), f_k = linspace(alpha, beta, n_knots)
               TPR_k = sum_num w_i sigmoid((s_i - t_k)/tau) / sum_num w_i
               pauc  = (TPR_0/2 + TPR_1 + ... + TPR_{K-2} + TPR_{K-1}/2) / (K - 1)
    pairwise:  band = pooled rows not of class c with t_beta <= s <= t_alpha
               pauc = sum_num w_i sum_band sigmoid((s_i - s_j)/tau) / (|band| sum_num w_i)
    loss_c   = 1 - pauc

Valid when: a pooled positive, a pooled iid negative, a numerator positive, numerator weight
> 0, scale > 1e-12, and (pairwise) a band row. Quantile levels are built in the scores' dtype
the way the reference library builds them (edges from Python floats; the two end knots equal
the edges). Diagnostics: ``t_alpha``, ``t_beta``, ``tau``, ``band_neg_count`` (iid negatives
in the band), ``pauc_var`` (population variance of each numerator positive's unweighted
contribution), NaN/0 where invalid, and ``grad_pos_count`` (live positives of this rank).

:class:`PlainPAUCLoss` runs a sequence of steps with the plain circular queue every reference
keeps (:class:`~imbalanced_losses.testing.reference.PlainQueue`; live rows, then the queue;
after the step the live rows that count, i.e. target not ``ignore_index`` and finite scores,
are written to the queue with their iid flag and weight).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from imbalanced_losses.testing.reference._queue import QueuedReference

__all__ = ["plain_pauc_per_class", "PlainPAUCLoss"]

_EPS = 1e-12


def plain_pauc_per_class(
    scores: Tensor,
    targets: Tensor,
    weights: Tensor | None,
    iid: Tensor,
    live: Tensor,
    *,
    alpha: float = 0.0,
    beta: float = 0.005,
    surrogate: str = "trapezoid",
    n_knots: int = 2,
    tau_scale: str = "iqr",
    pos_numerator: str = "pool",
    budget_basis: str = "fpr",
    temperature: float = 0.1,
    interpolation: str = "higher",
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """``(loss [C] (NaN where invalid), valid [C], diagnostics)`` over one pool."""
    num_classes = scores.shape[1]
    if weights is None:
        weights = torch.ones(scores.shape[0], dtype=scores.dtype)
    losses, valid = [], []
    diag: dict[str, list[float]] = {
        k: [] for k in ("t_alpha", "t_beta", "tau_eff", "band_neg_count", "pauc_var")
    }
    for c in range(num_classes):
        s = scores[:, c]
        pos = (targets == 1) if num_classes == 1 else (targets == c)
        neg = ~pos
        num = pos & live if pos_numerator == "live" else pos
        ref_rows = iid if budget_basis == "population" else (iid & neg)
        ok = bool(pos.any()) and bool((iid & neg).any()) and bool(num.any())
        ok = ok and float(weights[num].sum()) != 0.0
        result = None
        if ok:
            ref = s[ref_rows].detach()

            def q(level: Tensor, ref: Tensor = ref) -> Tensor:
                return torch.quantile(ref, level, interpolation=interpolation)

            edge_alpha = torch.tensor(1.0 - alpha, dtype=s.dtype)
            edge_beta = torch.tensor(1.0 - beta, dtype=s.dtype)
            t_alpha, t_beta = q(edge_alpha), q(edge_beta)
            if tau_scale == "iqr":
                scale = q(torch.tensor(0.75, dtype=s.dtype)) - q(torch.tensor(0.25, dtype=s.dtype))
            else:
                scale = t_alpha - t_beta
            if not bool(scale <= _EPS):
                tau = temperature * scale.clamp_min(_EPS)
                p, w = s[num], weights[num]
                if surrogate == "trapezoid":
                    levels = 1.0 - torch.linspace(alpha, beta, n_knots, dtype=s.dtype)
                    levels[0], levels[-1] = edge_alpha, edge_beta
                    t_k = torch.stack([q(level) for level in levels])
                    contrib = torch.sigmoid((p[:, None] - t_k[None, :]) / tau)  # [n_num, K]
                    tpr = (w[:, None] * contrib).sum(0) / w.sum()
                    rule = torch.ones(n_knots, dtype=s.dtype)
                    rule[0] = rule[-1] = 0.5
                    pauc = (tpr * rule).sum() / (n_knots - 1)
                    per_positive = (contrib.detach() * rule).sum(1) / (n_knots - 1)
                    result = pauc, per_positive
                else:
                    band = neg & (s.detach() >= t_beta) & (s.detach() <= t_alpha)
                    if bool(band.any()):
                        contrib = torch.sigmoid((p[:, None] - s[band][None, :]) / tau)  # dense
                        pauc = (w[:, None] * contrib).sum() / (int(band.sum()) * w.sum())
                        result = pauc, contrib.detach().mean(1)
        if result is None:  # NaN, still on the graph: reduction "none" must backpropagate
            losses.append(s.new_tensor(float("nan")) + scores[:0].sum())
            valid.append(False)
            for key in diag:
                diag[key].append(0.0 if key == "band_neg_count" else math.nan)
            continue
        pauc, per_positive = result
        losses.append(1.0 - pauc)
        valid.append(True)
        iid_neg_scores = s[iid & neg].detach()
        diag["t_alpha"].append(float(t_alpha))
        diag["t_beta"].append(float(t_beta))
        diag["tau_eff"].append(float(tau))
        diag["band_neg_count"].append(
            float(((iid_neg_scores >= t_beta) & (iid_neg_scores <= t_alpha)).sum())
        )
        diag["pauc_var"].append(float(per_positive.var(unbiased=False)))
    out = {k: torch.tensor(v, dtype=scores.dtype) for k, v in diag.items()}
    out["band_neg_count"] = out["band_neg_count"].long()
    return torch.stack(losses), torch.tensor(valid), out


class PlainPAUCLoss(QueuedReference):
    """Steps of the plain loss with the plain circular queue (``self.queue``, float64) that
    every reference keeps: pooled live rows that count, then the queue's rows with their iid
    flags. ``self.diagnostics`` holds the last step's diagnostics (``grad_pos_count`` too).

    Call it as the other references: ``plain(logits, targets, iid_mask=..., sample_weight=...,
    return_per_class=True)``.
    """

    uses_iid_mask = True

    def __init__(self, num_classes: int, *, queue_size: int = 1024, reduction: str = "mean",
                 ignore_index: int = -100, update_queue_in_eval: bool = False,
                 dtype: torch.dtype = torch.float64, **options: object) -> None:  # fmt: skip
        super().__init__(num_classes, queue_size, ignore_index, update_queue_in_eval, dtype)
        if "quantile_interpolation" in options:  # the loss's name for it (the family specs)
            options["interpolation"] = options.pop("quantile_interpolation")
        self.reduction, self.options = reduction, options
        self.diagnostics: dict[str, Tensor] = {}

    @property
    def temperature(self) -> float:
        """The sigmoid width of the next steps; assign to anneal it, as with the loss."""
        return float(self.options.get("temperature", 0.1))  # type: ignore[arg-type]

    @temperature.setter
    def temperature(self, value: float) -> None:
        self.options["temperature"] = value

    def pool(
        self, logits: Tensor, targets: Tensor, iid: Tensor, weights: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``(scores, targets, weights, iid, live)``: the live rows that count, then the queue."""
        keep = targets != self.ignore_index
        q_scores, q_targets, q_weights = self.queue.rows()
        scores = torch.cat([logits[keep], q_scores.to(logits.dtype)])
        pooled_t = torch.cat([targets[keep], q_targets])
        pooled_w = torch.cat([weights[keep], q_weights.to(logits.dtype)])
        pooled_iid = torch.cat([iid[keep], self.queue.iid_rows()])
        live = torch.zeros(pooled_t.shape[0], dtype=torch.bool)
        live[: int(keep.sum())] = True
        return scores, pooled_t, pooled_w, pooled_iid, live

    def enqueue(self, logits: Tensor, targets: Tensor, iid: Tensor, weights: Tensor) -> None:
        """Write the step's rows that count, whatever the mode (the reference library does)."""
        self.write(logits, targets, weights, update_queue=True, iid=iid)

    def formula(
        self,
        logits: Tensor,
        targets: Tensor,
        sample_weight: Tensor | None,
        queue_rows: tuple[Tensor, Tensor, Tensor],
        iid_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(loss, per_class, valid)`` of one step (diagnostics in ``self.diagnostics``)."""
        targets = targets.reshape(-1)
        logits = logits.to(self.queue.scores.dtype)  # computed in the reference's dtype
        n = logits.shape[0]
        iid = torch.ones(n, dtype=torch.bool) if iid_mask is None else iid_mask.bool()
        weights = (
            torch.ones(n, dtype=logits.dtype)
            if sample_weight is None
            else sample_weight.to(logits.dtype)
        )
        scores, pooled_t, pooled_w, pooled_iid, live = self.pool(logits, targets, iid, weights)
        if scores.shape[0] == 0:
            per_class = logits.new_full((self.num_classes,), math.nan)
            valid = torch.zeros(self.num_classes, dtype=torch.bool)
            diag = {
                k: logits.new_full((self.num_classes,), math.nan)
                for k in ("t_alpha", "t_beta", "tau_eff", "pauc_var")
            }
            diag["band_neg_count"] = torch.zeros(self.num_classes, dtype=torch.long)
        else:
            per_class, valid, diag = plain_pauc_per_class(
                scores,
                pooled_t,
                pooled_w,
                pooled_iid,
                live,
                **self.options,  # type: ignore[arg-type]
            )
        kept = targets[targets != self.ignore_index]
        if self.num_classes == 1:
            diag["grad_pos_count"] = (kept != 0).sum().reshape(1)
        else:
            diag["grad_pos_count"] = torch.stack(
                [(kept == c).sum() for c in range(self.num_classes)]
            )
        self.diagnostics = diag
        if self.reduction == "none":
            loss = per_class
        elif not bool(valid.any()):
            loss = logits.sum() * 0.0
        else:
            loss = per_class[valid].sum()
            if self.reduction == "mean":
                loss = loss / int(valid.sum())
        return loss, per_class, valid
