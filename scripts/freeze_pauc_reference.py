"""Freeze the reference library's PAUCAtBudgetLoss (imbalanced-losses 0.6.0) into a small JSON file.

Run in a side environment that has the reference installed, never in the project's venv::

    python -m venv /tmp/refvenv && /tmp/refvenv/bin/pip install torch==2.13.0 \
        && /tmp/refvenv/bin/pip install imbalanced-losses==0.6.0 numpy
    /tmp/refvenv/bin/python scripts/freeze_pauc_reference.py [--out FILE]

It runs a few seeded steps (the queue filling and wrapping) of the reference loss in float64
over a grid of options (surrogate x budget_basis x tau_scale x pos_numerator, three
interpolations each so all five appear, reductions and bands in rotation) on four input
scenarios (multi-class with iid_mask and sample weights; binary with a step without positives;
ties and padding rows; a class whose scores are constant), and records each step's inputs,
loss, per-class values, validity, diagnostics, input gradient and whether the one-time
"dispersion" warning fired. ``tests/test_pauc_math.py`` replays the steps through our math.
Padding rows appear only where the queue never wraps (the reference writes padding into its
queue; ours does not, a documented difference), so the pools are the same rows.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import warnings
from pathlib import Path
from typing import Any

import torch

SCENARIOS: dict[str, dict[str, Any]] = {
    # C=3, iid mask and weights (some zero), queue wraps at step 2.
    "multiclass_iid_weights": {
        "num_classes": 3,
        "rows": 24,
        "steps": 4,
        "queue_size": 40,
        "seed": 1,
    },
    # Binary, no iid mask, no weights; step 2 has no positive (pos_numerator="live" -> invalid).
    "binary": {"num_classes": 1, "rows": 30, "steps": 4, "queue_size": 45, "seed": 2},
    # C=2, scores on a 0.5 grid (ties at the band edges), 3 padding rows a step, queue never wraps.
    "ties_padding": {"num_classes": 2, "rows": 20, "steps": 3, "queue_size": 200, "seed": 3},
    # C=2, column 1 constant for every row: its dispersion is zero (degenerate, one warning).
    "constant_column": {"num_classes": 2, "rows": 16, "steps": 2, "queue_size": 16, "seed": 4},
}
BANDS = [  # (alpha, beta, n_knots, temperature)
    (0.0, 0.3, 2, 0.1),
    (0.05, 0.4, 4, 0.5),
    (0.0, 0.005, 2, 0.1),
    (0.1, 0.9, 3, 1.0),
]
INTERPOLATIONS = ["linear", "lower", "nearest", "midpoint"]
REDUCTIONS = ["mean", "sum", "none"]


def make_steps(name: str, spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Seeded float64 inputs of every step of a scenario."""
    gen = torch.Generator().manual_seed(spec["seed"])
    c, n = spec["num_classes"], spec["rows"]
    steps = []
    for step in range(spec["steps"]):
        logits = torch.randn(n, c, generator=gen, dtype=torch.float64)
        entry: dict[str, Any] = {}
        if name == "binary":
            targets = (torch.rand(n, generator=gen) < 0.25).long()
            if step == 2:
                targets.zero_()
            logits[:, 0] += 1.5 * targets
        else:
            targets = torch.randint(0, c, (n,), generator=gen)
            logits[torch.arange(n), targets] += 1.0
        if name == "multiclass_iid_weights":
            entry["iid_mask"] = (torch.rand(n, generator=gen) < 0.7).tolist()
            weights = torch.rand(n, generator=gen, dtype=torch.float64) * 2
            weights[torch.rand(n, generator=gen) < 0.2] = 0.0
            entry["sample_weight"] = weights.tolist()
        if name == "ties_padding":
            logits = (logits * 2).round() / 2
            targets[torch.randperm(n, generator=gen)[:3]] = -100
            entry["iid_mask"] = (torch.rand(n, generator=gen) < 0.8).tolist()
        if name == "constant_column":
            logits[:, 1] = 0.25
        entry["logits"] = logits.tolist()
        entry["targets"] = targets.tolist()
        steps.append(entry)
    return steps


def case_grid() -> list[dict[str, Any]]:
    """Each surrogate x basis x tau_scale x pos_numerator, with "higher" and two rotating modes."""
    cases = []
    names = list(SCENARIOS)
    combos = itertools.product(
        ["trapezoid", "pairwise"], ["fpr", "population"], ["iqr", "band"], ["pool", "live"]
    )
    for k, (surrogate, basis, tau_scale, pos_numerator) in enumerate(combos):
        modes = ["higher", INTERPOLATIONS[k % 4], INTERPOLATIONS[(k + 1) % 4]]
        for j, interpolation in enumerate(modes):
            alpha, beta, n_knots, temperature = BANDS[(k + j) % len(BANDS)]
            cases.append(
                {
                    "scenario": names[(k // 2 + j) % len(names)],
                    "options": {
                        "alpha": alpha, "beta": beta, "surrogate": surrogate, "n_knots": n_knots,
                        "tau_scale": tau_scale, "pos_numerator": pos_numerator,
                        "budget_basis": basis, "temperature": temperature,
                        "quantile_interpolation": interpolation,
                        "reduction": REDUCTIONS[(k + j) % 3],
                    },
                }
            )  # fmt: skip
    return cases


def plain(t: torch.Tensor) -> list[Any]:
    return [None if isinstance(v, float) and math.isnan(v) else v for v in t.reshape(-1).tolist()]


def run_case(
    case: dict[str, Any], scenario: dict[str, Any], steps: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    from imbalanced_losses import PAUCAtBudgetLoss

    opts = dict(case["options"])
    loss_fn = PAUCAtBudgetLoss(
        scenario["num_classes"], queue_size=scenario["queue_size"], **opts
    ).double()
    loss_fn.train()
    out = []
    for step in steps:
        logits = torch.tensor(step["logits"], dtype=torch.float64, requires_grad=True)
        targets = torch.tensor(step["targets"])
        iid = None if "iid_mask" not in step else torch.tensor(step["iid_mask"])
        weight = (
            None
            if "sample_weight" not in step
            else torch.tensor(step["sample_weight"], dtype=torch.float64)
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss, per_class, valid, diag = loss_fn(
                logits, targets, iid, True, True, sample_weight=weight
            )
        if opts["reduction"] != "none":
            total = loss
        elif bool(valid.any()):
            total = loss[valid].sum()
        else:
            total = logits.sum() * 0.0
        total.backward()
        out.append(
            {
                "loss": plain(loss.detach()),
                "per_class": plain(per_class.detach()),
                "valid": valid.tolist(),
                "diagnostics": {k: plain(v.detach()) for k, v in diag.items()},
                "grad": plain(logits.grad),
                "dispersion_warning": any("dispersion" in str(w.message) for w in caught),
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        default=str(Path(__file__).resolve().parents[1] / "tests/data/pauc_reference_0_6_0.json"),
    )
    args = parser.parse_args()
    import imbalanced_losses

    version = getattr(imbalanced_losses, "__version__", None)
    from importlib.metadata import version as dist_version

    torch.set_num_threads(1)
    scenarios = {
        name: {**spec, "steps": make_steps(name, spec)} for name, spec in SCENARIOS.items()
    }
    cases = case_grid()
    for case in cases:
        scenario = scenarios[case["scenario"]]
        case["steps"] = run_case(case, scenario, scenario["steps"])
    data = {
        "reference": f"imbalanced-losses=={dist_version('imbalanced-losses')}",
        "reference_module_version": version,
        "torch": torch.__version__,
        "dtype": "float64",
        "note": "null is NaN; grad is d(loss)/d(logits), of loss[valid].sum() for reduction none",
        "scenarios": scenarios,
        "cases": cases,
    }
    Path(args.out).write_text(json.dumps(data, separators=(",", ":")) + "\n")
    print(f"wrote {len(cases)} cases to {args.out} ({Path(args.out).stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
