"""Freeze the reference library's (imbalanced-losses 0.6.0) outputs into tests/data/.

Run it in a side environment that has the reference installed, never this package:

    python -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch imbalanced-losses==0.6.0 numpy
    /tmp/refvenv/bin/python scripts/freeze_reference_values.py

It writes ``tests/data/reference_0_6_0.json``: the warm-up wrapper's properties and blended
value after every hook and forward of a few schedules, the focal losses' values and input
gradients on seeded float64 inputs for every option and reduction (the inputs are stored
too, so the tests do not depend on a generator), the constructor signatures and the texts
of the errors raised for bad arguments (the ranking losses' too, with the argument each names),
and everything ``tests/data/reference_api_script.py``
(a user's script for the reference's public API, run unchanged) prints.
``tests/test_migration.py`` compares this package
with it, so CI needs no reference installed.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "reference_0_6_0.json"


def reference() -> Any:
    """The reference package, refusing this repository's package of the same name."""
    version = importlib.metadata.version("imbalanced-losses")
    if version != "0.6.0":
        sys.exit(f"needs imbalanced-losses==0.6.0 installed, found {version}")
    import imbalanced_losses

    if Path(imbalanced_losses.__file__).resolve().is_relative_to(OUT.parent.parent.parent):
        sys.exit("imported this repository's package, not the reference: run from a side venv")
    return imbalanced_losses


class WarmupProbe(nn.Module):
    """Warm-up stub worth 10 (connected to the logits)."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return logits.sum() * 0.0 + 10.0


class MainProbe(nn.Module):
    """Main stub worth ``20 + temperature``: a forward's value shows the weight and temperature."""

    def __init__(self) -> None:
        super().__init__()
        self.temperature = 0.5

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return logits.sum() * 0.0 + 20.0 + self.temperature


# Each schedule: constructor arguments (positional, keyword) and a list of events:
# ["epoch", e] / ["batch", global_step] / ["forward"]. Every forward is preceded by a batch
# hook (the reference's temperature only moves with it).
def _epochs(n_epochs: int, steps: int, forward: bool = True) -> list[list[Any]]:
    events: list[list[Any]] = []
    for e in range(n_epochs):
        events.append(["epoch", e])
        for s in range(steps):
            events.append(["batch", e * steps + s])
            if forward:
                events.append(["forward"])
    return events


def _steps(steps: list[int]) -> list[list[Any]]:
    return [ev for g in steps for ev in (["batch", g], ["forward"])]


SCHEDULES: list[dict[str, Any]] = [
    {
        "name": "epochs W=2 B=2 f=0.7",
        "args": [],
        "kwargs": dict(
            warmup_epochs=2,
            blend_epochs=2,
            final_main_weight=0.7,
            temp_start=0.4,
            temp_end=0.05,
            temp_decay_steps=5,
        ),
        "events": _epochs(6, 3),
    },
    {
        "name": "steps W=3 B=3",
        "args": [],
        "kwargs": dict(
            warmup_steps=3, blend_steps=3, temp_start=0.2, temp_end=0.02, temp_decay_steps=6
        ),
        "events": _steps(list(range(14))),
    },
    {
        "name": "steps with gaps W=4 B=2 f=0.5",
        "args": [],
        "kwargs": dict(warmup_steps=4, blend_steps=2, final_main_weight=0.5, temp_decay_steps=10),
        "events": _steps([0, 2, 5, 6, 9, 20, 21]),
    },
    {
        "name": "no warm-up, epochs",
        "args": [],
        "kwargs": dict(temp_start=1.0, temp_end=0.1, temp_decay_steps=5),
        "events": _epochs(3, 4),
    },
    {
        "name": "positional W=1, blend_epochs=1",
        "args": [1, 0.3, 0.03, 4],
        "kwargs": dict(blend_epochs=1),
        "events": _epochs(4, 2),
    },
    {
        "name": "steps W=0 B=3 f=0.6, hooks only",
        "args": [],
        "kwargs": dict(warmup_steps=0, blend_steps=3, final_main_weight=0.6, temp_decay_steps=3),
        "events": [["batch", g] for g in range(6)],
    },
]


def freeze_warmup(ref: Any) -> list[dict[str, Any]]:
    out = []
    logits, targets = torch.zeros(2, 1, dtype=torch.float64), torch.tensor([0, 1])
    for schedule in SCHEDULES:
        wrapper = ref.LossWarmupWrapper(
            WarmupProbe(), MainProbe(), *schedule["args"], **schedule["kwargs"]
        )
        records = []
        for event in schedule["events"]:
            value = None
            if event[0] == "epoch":
                wrapper.on_train_epoch_start(event[1])
            elif event[0] == "batch":
                wrapper.on_train_batch_start(event[1])
            else:
                value = float(wrapper(logits, targets))
            records.append(
                {
                    "in_warmup": wrapper.in_warmup,
                    "in_blend": wrapper.in_blend,
                    "main_weight": wrapper.main_weight,
                    "current_temperature": wrapper.current_temperature,
                    "value": value,
                }
            )
        out.append({**schedule, "records": records})
    return out


def _value_and_grad(
    loss_fn: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None
) -> dict[str, Any]:
    x = inputs.clone().requires_grad_(True)
    kwargs = {} if weight is None else {"sample_weight": weight}
    value = loss_fn(x, targets, **kwargs)
    if value.dim():  # "none": the gradient of its sum is the "sum" case's
        return {"value": value.detach().tolist(), "grad": None}
    (grad,) = torch.autograd.grad(value, x)
    return {"value": value.item(), "grad": grad.tolist()}


def freeze_focal(ref: Any) -> dict[str, Any]:
    g = torch.Generator().manual_seed(20260601)
    sig_x = 2 * torch.randn(6, 3, generator=g, dtype=torch.float64)
    sig_t = (torch.rand(6, 3, generator=g) < 0.3).double()
    sig_w_row = 2 * torch.rand(6, 1, generator=g, dtype=torch.float64)
    sig_w_full = 2 * torch.rand(6, 3, generator=g, dtype=torch.float64)
    sig_x4 = torch.randn(2, 3, 2, 2, generator=g, dtype=torch.float64)
    sig_t4 = (torch.rand(2, 3, 2, 2, generator=g) < 0.4).double()
    sig_w4 = torch.rand(2, 1, 2, 2, generator=g, dtype=torch.float64)
    inputs = {
        "sig": [sig_x, sig_t],
        "sig4": [sig_x4, sig_t4],
        "sig_w_row": sig_w_row,
        "sig_w_full": sig_w_full,
        "sig_w4": sig_w4,
    }
    sigmoid = []
    for alpha in (0.25, -1, 0.0):
        for gamma in (2.0, 0.5):
            for reduction in ("none", "mean", "sum"):
                for data, weight in (
                    ("sig", None),
                    ("sig", "sig_w_row"),
                    ("sig", "sig_w_full"),
                    ("sig4", None),
                    ("sig4", "sig_w4"),
                ):
                    x, t = inputs[data]
                    w = None if weight is None else inputs[weight]
                    loss_fn = ref.SigmoidFocalLoss(alpha=alpha, gamma=gamma, reduction=reduction)
                    options = dict(alpha=alpha, gamma=gamma, reduction=reduction)
                    sigmoid.append(
                        {
                            "options": options,
                            "data": data,
                            "weight": weight,
                            **_value_and_grad(loss_fn, x, t, w),
                        }
                    )

    soft_x = 2 * torch.randn(8, 4, generator=g, dtype=torch.float64)
    soft_t = torch.tensor([0, 1, 2, 3, -100, 0, 2, 3])
    soft_w = 2 * torch.rand(8, generator=g, dtype=torch.float64)
    soft_x3 = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    soft_t3 = torch.randint(0, 4, (3, 5), generator=g)
    soft_t3[0, 1] = -100
    soft_w3 = torch.rand(3, 5, generator=g, dtype=torch.float64)
    inputs.update(
        {
            "soft": [soft_x, soft_t],
            "soft3": [soft_x3, soft_t3],
            "soft_background": [soft_x, torch.tensor([0, 0, 0, -100, 0, 0, 0, 0])],
            "soft_ignored": [soft_x, torch.full((8,), -100)],
            "soft_ignore3": [soft_x, torch.tensor([0, 1, 2, 3, 3, 0, 2, 1])],
            "soft_w": soft_w,
            "soft_w3": soft_w3,
        }
    )
    softmax = []
    option_sets = [
        dict(),
        dict(gamma=0.0),
        dict(gamma=1.5, alpha=[0.1, 0.2, 0.3, 0.4]),
        dict(alpha=[0.5, 1.0, 2.0, 0.25], label_smoothing=0.2, gamma=3.0),
        dict(background_class=1),
        dict(ignore_index=3),
    ]
    for options in option_sets:
        for reduction in ("none", "mean", "mean_positive", "sum"):
            cases = [("soft", None), ("soft", "soft_w"), ("soft3", None), ("soft3", "soft_w3")]
            if not options or "alpha" in options:  # the degenerate batches, for two sets
                cases += [("soft_background", None), ("soft_background", "soft_w")]
                cases += [("soft_ignored", None)]
            if options.get("ignore_index") == 3:
                cases = [("soft_ignore3", None), ("soft_ignore3", "soft_w")]
            for data, weight in cases:
                x, t = inputs[data]
                w = None if weight is None else inputs[weight]
                opts = {**options, "reduction": reduction}
                loss_fn = ref.SoftmaxFocalLoss(**opts)
                softmax.append(
                    {
                        "options": opts,
                        "data": data,
                        "weight": weight,
                        **_value_and_grad(loss_fn, x, t, w),
                    }
                )
    stored = {
        k: ([v[0].tolist(), v[1].tolist()] if isinstance(v, list) else v.tolist())
        for k, v in inputs.items()
    }
    return {"inputs": stored, "sigmoid": sigmoid, "softmax": softmax}


def _describe(parameter: inspect.Parameter) -> list[Any]:
    default = parameter.default
    shown = None if default is inspect.Parameter.empty else repr(default)
    return [parameter.name, parameter.kind.name, shown]


def freeze_signatures(ref: Any) -> dict[str, Any]:
    out = {}
    for name in (
        "LossWarmupWrapper",
        "SigmoidFocalLoss",
        "SoftmaxFocalLoss",
        "RecallAtQuantileLoss",
        "SmoothAPLoss",
        "PAUCAtBudgetLoss",
    ):
        cls = getattr(ref, name)
        out[name] = {
            "init": [_describe(p) for p in inspect.signature(cls).parameters.values()],
            "forward": [_describe(p) for p in inspect.signature(cls.forward).parameters.values()][
                1:
            ],
        }
    return out


BAD_ARGUMENTS: list[tuple[str, dict[str, Any]]] = [
    ("LossWarmupWrapper", dict(warmup_epochs=2, warmup_steps=10)),
    ("LossWarmupWrapper", dict(warmup_steps=2, blend_epochs=1, blend_steps=3)),
    ("LossWarmupWrapper", dict(warmup_epochs=2, blend_steps=3)),
    ("LossWarmupWrapper", dict(warmup_epochs=-1)),
    ("LossWarmupWrapper", dict(warmup_steps=-2)),
    ("LossWarmupWrapper", dict(blend_epochs=-1)),
    ("LossWarmupWrapper", dict(warmup_steps=1, blend_steps=-3)),
    ("LossWarmupWrapper", dict(final_main_weight=0.0)),
    ("LossWarmupWrapper", dict(final_main_weight=1.5)),
    ("LossWarmupWrapper", dict(temp_start=0.0)),
    ("LossWarmupWrapper", dict(temp_end=-1.0)),
    ("LossWarmupWrapper", dict(temp_decay_steps=0)),
    ("SigmoidFocalLoss", dict(alpha=1.5)),
    ("SigmoidFocalLoss", dict(reduction="mean_positive")),
    ("SoftmaxFocalLoss", dict(reduction="nonsense")),
    ("SoftmaxFocalLoss", dict(alpha=[[0.5, 0.5]])),
]


def freeze_errors(ref: Any) -> list[dict[str, Any]]:
    out = []
    x, t = torch.zeros(2, 3), torch.zeros(2, 3)
    for name, kwargs in BAD_ARGUMENTS:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if name == "LossWarmupWrapper":
                    ref.LossWarmupWrapper(WarmupProbe(), MainProbe(), **kwargs)
                else:
                    loss_fn = getattr(ref, name)(**kwargs)
                    target = t if name == "SigmoidFocalLoss" else t[:, 0].long()
                    loss_fn(x, target)  # the reference checks reduction at forward time
        except ValueError as error:
            out.append({"class": name, "kwargs": kwargs, "message": str(error)})
        else:
            sys.exit(f"{name}({kwargs}) raised nothing in the reference")
    return out


# Bad arguments of the ranking losses: (class, constructor kwargs, bad forward input or None,
# the argument both texts must name). Forward inputs: see ``bad_forward``.
RANKING_BAD_ARGUMENTS: list[tuple[str, dict[str, Any], str | None, str]] = [
    *(
        (name, kwargs, None, argument)
        for name in ("RecallAtQuantileLoss", "SmoothAPLoss", "PAUCAtBudgetLoss")
        for kwargs, argument in (
            ({"num_classes": 0}, "num_classes"),
            ({"num_classes": 4, "reduction": "avg"}, "reduction"),
            ({"num_classes": 4, "queue_size": -1}, "queue_size"),
            ({"num_classes": 4, "temperature": 0.0}, "temperature"),
            ({"num_classes": 4, "max_pool_size": 0}, "max_pool_size"),
        )
    ),
    ("RecallAtQuantileLoss", {"num_classes": 4, "quantile": 1.0}, None, "quantile"),
    ("RecallAtQuantileLoss", {"num_classes": 4, "quantile": 0.0}, None, "quantile"),
    ("PAUCAtBudgetLoss", {"num_classes": 4, "alpha": 0.3, "beta": 0.2}, None, "alpha"),
    *(
        (name, {"num_classes": 4 if bad != "logits_1d" else 1}, bad, argument)
        for name in ("RecallAtQuantileLoss", "SmoothAPLoss", "PAUCAtBudgetLoss")
        for bad, argument in (
            ("logits_1d", "logits"),
            ("logits_width", "logits"),
            ("weight_shape", "sample_weight"),
            ("weight_negative", "sample_weight"),
        )
    ),
]


def bad_forward(loss_fn: Any, bad: str) -> None:
    """One forward with the bad input ``bad`` (the test calls the same)."""
    width = 1 if bad == "logits_1d" else 4
    logits, targets = torch.zeros(16, width), torch.arange(16) % 2
    weight = None
    if bad == "logits_1d":
        logits = logits[:, 0]
    elif bad == "logits_width":
        logits = logits[:, :3]
    elif bad == "weight_shape":
        weight = torch.ones(15)
    elif bad == "weight_negative":
        weight = -torch.ones(16)
    loss_fn(logits, targets, sample_weight=weight)


def freeze_ranking_errors(ref: Any) -> list[dict[str, Any]]:
    out = []
    for name, kwargs, bad, argument in RANKING_BAD_ARGUMENTS:
        try:
            loss_fn = getattr(ref, name)(**kwargs)
            if bad is not None:
                bad_forward(loss_fn, bad)
        except ValueError as error:
            out.append(
                {
                    "class": name,
                    "kwargs": kwargs,
                    "forward": bad,
                    "argument": argument,
                    "message": str(error),
                }
            )
        else:
            sys.exit(f"{name}({kwargs}) with {bad} raised nothing in the reference")
    return out


SCRIPT = OUT.parent / "reference_api_script.py"


def freeze_script() -> dict[str, Any]:
    """Run the reference-style user script (tests/data/reference_api_script.py) under the
    reference, in a fresh process outside this repository, and keep what it printed."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        done = subprocess.run(
            [sys.executable, str(SCRIPT)],
            cwd=tmp,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    if done.returncode != 0:
        sys.exit(f"{SCRIPT.name} failed under the reference:\n{done.stdout}{done.stderr}")
    line = done.stdout.strip().splitlines()[-1]
    if not line.startswith("RESULTS "):
        sys.exit(f"{SCRIPT.name} printed no RESULTS line last: {line!r}")
    return json.loads(line.removeprefix("RESULTS "))


def main() -> None:
    ref = reference()
    data = {
        "reference": "imbalanced-losses 0.6.0",
        "torch": torch.__version__,
        "made_by": "scripts/freeze_reference_values.py",
        "warmup": freeze_warmup(ref),
        "focal": freeze_focal(ref),
        "signatures": freeze_signatures(ref),
        "errors": freeze_errors(ref),
        "ranking_errors": freeze_ranking_errors(ref),
        "script": freeze_script(),
    }
    OUT.write_text(json.dumps(data, indent=None, separators=(",", ":")) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
