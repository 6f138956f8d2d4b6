"""``PAUCAtBudgetLoss`` under DDP with a per-row ``iid_mask``.

The harness runs its scenarios (``Step(iid_frac=...)``, world sizes 1-4, both surrogates, against
the plain reference) in ``test_family_ddp.py``; here: the diagnostics, which the harness does not
compare (every rank's value, per-class values, pool diagnostics and input gradient equal the
plain float64 reference's on the global batch, with uneven and empty ranks, padding, weights,
and a queue that wraps, so queued non-iid rows must keep their flag), and proof that the
harness's iid steps reach the loss (an oracle that ignores the mask is flagged).
"""

from __future__ import annotations

import warnings
from functools import partial
from typing import Any

import pytest
import torch

from imbalanced_losses import PAUCAtBudgetLoss
from imbalanced_losses.testing import Step, check_many, queue_state, run_ranks
from imbalanced_losses.testing._plan import Case
from imbalanced_losses.testing.reference import PlainPAUCLoss

CONFIGS = [
    {"surrogate": "pairwise", "budget_basis": "fpr", "pos_numerator": "pool"},
    {"surrogate": "trapezoid", "budget_basis": "population", "pos_numerator": "live"},
]
COMMON = {"alpha": 0.05, "beta": 0.4, "n_knots": 3, "temperature": 0.5, "queue_size": 13}
TOL = {"rtol": 1e-9, "atol": 1e-9}


def _steps(world_size: int) -> list[dict[str, Any]]:
    """Global batches, each split unevenly across the ranks (rank 1 empty at one step)."""
    gen = torch.Generator().manual_seed(world_size)
    steps = []
    for k in range(4):
        sizes = [int(n) for n in torch.randint(2, 9, (world_size,), generator=gen)]
        if k == 1 and world_size > 1:
            sizes[1] = 0
        n = sum(sizes)
        targets = torch.randint(0, 3, (n,), generator=gen)
        targets[torch.rand(n, generator=gen) < 0.15] = -100
        steps.append(
            {
                "sizes": sizes,
                "logits": torch.randn(n, 3, generator=gen, dtype=torch.float64),
                "targets": targets,
                "iid": torch.rand(n, generator=gen) < 0.6,
                "weights": torch.rand(n, generator=gen, dtype=torch.float64),
            }
        )
    return steps


def _rank(rank: int, world_size: int) -> list[list[dict[str, Any]]]:
    out = []
    for config in CONFIGS:
        loss_fn = PAUCAtBudgetLoss(3, **COMMON, **config).double()
        results = []
        for step in _steps(world_size):
            start = sum(step["sizes"][:rank])
            rows = slice(start, start + step["sizes"][rank])
            x = step["logits"][rows].clone().requires_grad_(True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loss, per_class, valid, diag = loss_fn(
                    x,
                    step["targets"][rows],
                    step["iid"][rows],
                    True,
                    True,
                    sample_weight=step["weights"][rows],
                )
            loss.backward()
            results.append(
                {
                    "loss": loss.detach(),
                    "per_class": per_class.detach(),
                    "valid": valid,
                    "diag": diag,
                    "grad": x.grad if x.grad is not None else torch.zeros_like(x),
                }
            )
        out.append(results)
    return out


@pytest.mark.parametrize("world_size", [2, 3])
def test_every_rank_equals_the_plain_reference_on_the_global_batch_with_an_iid_mask(
    world_size: int,
) -> None:
    per_rank = run_ranks(_rank, world_size, timeout_s=120, start_timeout_s=180, args=(world_size,))
    steps = _steps(world_size)
    for c, config in enumerate(CONFIGS):
        plain = PlainPAUCLoss(3, **{**COMMON, **config})
        for k, step in enumerate(steps):
            x = step["logits"].clone().requires_grad_(True)
            loss, per_class, valid = plain(
                x,
                step["targets"],
                iid_mask=step["iid"],
                sample_weight=step["weights"],
                return_per_class=True,
            )
            loss.backward()
            assert x.grad is not None
            for rank in range(world_size):
                where = f"{config} step {k} rank {rank}"
                got = per_rank[rank][c][k]
                assert got["valid"].tolist() == valid.tolist(), where
                torch.testing.assert_close(got["loss"], loss.detach(), **TOL, msg=where)
                torch.testing.assert_close(
                    got["per_class"], per_class.detach(), **TOL, equal_nan=True, msg=where
                )
                for key in ("t_alpha", "t_beta", "tau_eff", "band_neg_count", "pauc_var"):
                    torch.testing.assert_close(
                        got["diag"][key], plain.diagnostics[key], **TOL, equal_nan=True, msg=key
                    )
                start = sum(step["sizes"][:rank])
                rows = slice(start, start + step["sizes"][rank])
                local = step["targets"][rows]
                want_count = [int((local == cls).sum()) for cls in range(3)]
                assert got["diag"]["grad_pos_count"].tolist() == want_count, where  # rank-local
                # The gather's backward returns world_size x the rank's slice; DDP's average
                # of the parameters' gradients cancels it.
                torch.testing.assert_close(got["grad"], world_size * x.grad[rows], **TOL, msg=where)


class CrossEntropyWithoutMask(torch.nn.Module):
    """A forward with no iid_mask parameter: iid steps run without the mask, and say so."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100)


class PlainPAUCWithoutMask(PlainPAUCLoss):
    """The plain reference, blind to the iid mask (it still queues the flags)."""

    uses_iid_mask = False


def test_the_harness_feeds_the_iid_mask_so_an_oracle_that_ignores_it_is_flagged():
    """If the harness dropped the mask (or sliced it wrongly), the blind oracle would agree with
    the loss, or the seeing one would not: the first case must fail on the loss's value at an
    iid step and the second pass; a loss whose forward takes no mask is told it was not
    checked."""
    plan = [
        Step((5, 3), iid_frac=0.5),
        Step((0, 7), pad_frac=0.2, weighted=True, iid_frac=0.4),
        Step((4, 4), iid_frac=0.5, kwargs={"return_per_class": True}),
    ]
    options = {**COMMON, **CONFIGS[0]}
    cases = [
        Case(
            partial(PAUCAtBudgetLoss, 3, **options),
            plan,
            oracle_factory=partial(oracle, 3, **options),
            state=queue_state,
        )
        for oracle in (PlainPAUCWithoutMask, PlainPAUCLoss)
    ]
    no_parameter = Case(CrossEntropyWithoutMask, plan[:1], num_classes=3)
    blind, seeing, without = check_many([*cases, no_parameter], timeout_s=180)
    seeing.raise_if_failed()
    assert "iid_mask" in {n.name for n in without.not_checked}, without
    flagged = {c.name for c in blind.checks if not c.ok}
    assert "loss vs oracle" in flagged, blind
    assert "state vs oracle" not in flagged, blind  # both queue the same flags
