"""Code written for the reference library runs here unchanged, apart from the differences the
README's migration table lists."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import imbalanced_losses
from imbalanced_losses import (
    LossWarmupWrapper,
    PAUCAtBudgetLoss,
    RecallAtQuantileLoss,
    SigmoidFocalLoss,
    SoftmaxFocalLoss,
)

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).resolve().parent / "reference_style_script.py"

# The reference documentation's keywords and defaults, as its parameter table states them.
REFERENCE_DEFAULTS = {
    "quantile": 0.005,
    "queue_size": 1024,
    "temperature": 0.01,
    "reduction": "mean",
    "ignore_index": -100,
    "update_queue_in_eval": False,
    "gather_distributed": None,
    "quantile_interpolation": "higher",
    "max_pool_size": None,
}


def test_a_script_in_the_reference_style_runs_unchanged(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(SCRIPT)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "out-of-range targets: ValueError: targets must be in [0, 2)" in out
    assert "reduction none (3,) class 2 is nan: True" in out
    assert "queued rows 8 after eval 8" in out
    assert "gathered (5, 3) grad ones: True" in out
    # Blend epoch 1: w = 1/2; the reference's properties after a forward are what it used.
    assert "epoch 0 main_weight 0.0 in_warmup True" in out
    assert "epoch 1 main_weight 0.5 in_warmup False" in out
    assert "epoch 2 main_weight 1.0 in_warmup False" in out
    # 0.25 * (1/2)^2 * log 2 = 0.043322 per element; 1 * log 2 + 2 * log 2 = 2.079442.
    assert "focal sigmoid 0.043322 softmax 2.079442" in out
    assert out.rstrip().endswith("done")


def test_keywords_and_defaults_are_the_references():
    params = inspect.signature(RecallAtQuantileLoss).parameters
    assert "num_classes" in params and params["num_classes"].default is inspect.Parameter.empty
    for name, default in REFERENCE_DEFAULTS.items():
        assert name in params, name
        assert params[name].default == default, (name, params[name].default)


# Contract §16: the reference's PAUCAtBudgetLoss signature, in its positional order.
PAUC_REFERENCE_SIGNATURE = [
    ("num_classes", inspect.Parameter.empty),
    ("alpha", 0.0),
    ("beta", 0.005),
    ("surrogate", "trapezoid"),
    ("n_knots", 2),
    ("tau_scale", "iqr"),
    ("pos_numerator", "pool"),
    ("budget_basis", "fpr"),
    ("queue_size", 1024),
    ("temperature", 0.1),
    ("reduction", "mean"),
    ("ignore_index", -100),
    ("update_queue_in_eval", False),
    ("gather_distributed", None),
    ("quantile_interpolation", "higher"),
    ("max_pool_size", None),
]


def test_the_pauc_loss_takes_the_references_arguments_in_its_order_with_its_defaults():
    params = list(inspect.signature(PAUCAtBudgetLoss).parameters.values())
    positional = [p for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    assert [(p.name, p.default) for p in positional] == PAUC_REFERENCE_SIGNATURE
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[len(positional) :])


def test_the_pauc_loss_lives_at_the_references_module_path():
    from imbalanced_losses import pauc_loss

    assert pauc_loss.PAUCAtBudgetLoss is imbalanced_losses.PAUCAtBudgetLoss


def test_the_gather_helpers_live_at_the_reference_path():
    from imbalanced_losses import distributed

    assert distributed.all_gather_with_grad is imbalanced_losses.all_gather_with_grad
    assert distributed.all_gather_no_grad is imbalanced_losses.all_gather_no_grad
    assert set(distributed.__all__) == {"all_gather_with_grad", "all_gather_no_grad"}


def test_without_a_process_group_the_helpers_return_their_input_as_the_readme_says():
    from imbalanced_losses.distributed import all_gather_no_grad, all_gather_with_grad

    assert not torch.distributed.is_initialized()
    x = torch.randn(4, 2, requires_grad=True)
    assert all_gather_with_grad(x) is x
    y = all_gather_no_grad(x)
    assert torch.equal(y, x) and not y.requires_grad
    row = migration_row("without a process group")
    assert "raise" in row[1] and "return" in row[2], row


@pytest.mark.parametrize("num_classes, bad", [(3, 3), (3, -1), (1, 2)])
def test_out_of_range_targets_are_a_value_error(num_classes, bad):
    loss_fn = RecallAtQuantileLoss(num_classes, quantile=0.3, queue_size=8)
    targets = torch.zeros(4, dtype=torch.long)
    targets[1] = bad
    with pytest.raises(ValueError, match="targets"):
        loss_fn(torch.randn(4, num_classes), targets)
    assert loss_fn.queue.count == 0


def migration_row(topic: str) -> list[str]:
    """The cells of the README migration-table row whose first cell mentions ``topic``."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Coming from the reference", 1)[1].split("\n## ", 1)[0]
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and re.search(topic, cells[0]):
            return cells
    raise AssertionError(f"no migration-table row about {topic!r}")


# --- values frozen from the reference 0.6.0 by scripts/freeze_reference_values.py -------------

FROZEN = json.loads((ROOT / "tests" / "data" / "reference_0_6_0.json").read_text())


class WarmupProbe(nn.Module):
    """Warm-up stub worth 10 (the freezing script's)."""

    def forward(self, logits, targets):
        return logits.sum() * 0.0 + 10.0


class MainProbe(nn.Module):
    """Main stub worth ``20 + temperature`` (the freezing script's)."""

    def __init__(self):
        super().__init__()
        self.temperature = 0.5

    def forward(self, logits, targets):
        return logits.sum() * 0.0 + 20.0 + self.temperature


API_SCRIPT = ROOT / "tests" / "data" / "reference_api_script.py"


def _mismatches(want: object, got: object, path: str = "") -> list[str]:
    """Where ``got`` differs from the reference's ``want`` (floats: float64 round-off, 1e-9)."""
    if isinstance(want, dict):
        if not isinstance(got, dict) or set(got) != set(want):
            return [
                f"{path}: keys {sorted(want)} vs {sorted(got) if isinstance(got, dict) else got}"
            ]
        return [m for k in want for m in _mismatches(want[k], got[k], f"{path}/{k}")]
    if isinstance(want, list):
        if not isinstance(got, list) or len(got) != len(want):
            return [f"{path}: {want!r} vs {got!r}"]
        return [
            m for i, (w, g) in enumerate(zip(want, got)) for m in _mismatches(w, g, f"{path}[{i}]")
        ]
    if isinstance(want, float) and isinstance(got, (int, float)) and not isinstance(got, bool):
        close = math.isclose(want, got, rel_tol=1e-9, abs_tol=1e-12)
        return [] if close else [f"{path}: reference {want!r}, here {got!r}"]
    return [] if (want == got and type(want) is type(got)) else [f"{path}: {want!r} vs {got!r}"]


def test_a_script_for_the_references_public_api_runs_unchanged_and_prints_its_numbers(tmp_path):
    """tests/data/reference_api_script.py uses every class and keyword, positional calls and
    the module paths; the reference 0.6.0 ran the same file (its output is frozen)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(API_SCRIPT)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1].removeprefix("RESULTS "))
    want = FROZEN["script"]
    # We export more than the reference (our base class, metrics): a superset is what counts.
    assert set(want.pop("all")) <= set(got.pop("all"))
    assert len(want) >= 17, sorted(want)  # every run of the script was frozen
    # A README row: all_gather_no_grad detaches at world size 1 too (the reference returns its
    # input there, still requiring grad; at other world sizes it does not either).
    assert (want["gather"][2], got["gather"][2]) == (True, False)
    want["gather"][2] = got["gather"][2] = None
    wrong = _mismatches(want, got)
    assert not wrong, f"{len(wrong)} differences, first: " + "\n".join(wrong[:10])


@pytest.mark.parametrize("schedule", FROZEN["warmup"], ids=lambda s: s["name"])
def test_the_warmup_schedule_reports_and_uses_the_references_values_step_by_step(schedule):
    wrapper = LossWarmupWrapper(WarmupProbe(), MainProbe(), *schedule["args"], **schedule["kwargs"])
    logits, targets = torch.zeros(2, 1, dtype=torch.float64), torch.tensor([0, 1])
    for i, (event, want) in enumerate(zip(schedule["events"], schedule["records"])):
        value = None
        if event[0] == "epoch":
            wrapper.on_train_epoch_start(event[1])
        elif event[0] == "batch":
            wrapper.on_train_batch_start(event[1])
        else:
            value = float(wrapper(logits, targets))
        got = {
            "in_warmup": wrapper.in_warmup,
            "in_blend": wrapper.in_blend,
            "main_weight": wrapper.main_weight,
            "current_temperature": wrapper.current_temperature,
            "value": value,
        }
        for key, expected in want.items():
            if isinstance(expected, float):
                assert math.isclose(got[key], expected, rel_tol=1e-12), (i, event, key, got)
            else:
                assert got[key] == expected, (i, event, key, got)


def _frozen_inputs(name: str) -> list[torch.Tensor] | torch.Tensor:
    stored = FROZEN["focal"]["inputs"][name]
    if name.endswith(("_row", "_full")) or "_w" in name:
        return torch.tensor(stored, dtype=torch.float64)
    x, t = stored
    integer = name.startswith("soft")
    return [
        torch.tensor(x, dtype=torch.float64),
        torch.tensor(t, dtype=None if integer else torch.float64),
    ]


@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
def test_the_focal_losses_give_the_references_values_and_gradients(kind):
    cls = SigmoidFocalLoss if kind == "sigmoid" else SoftmaxFocalLoss
    for case in FROZEN["focal"][kind]:
        x, t = _frozen_inputs(case["data"])
        weight = None if case["weight"] is None else _frozen_inputs(case["weight"])
        x = x.clone().requires_grad_(True)
        kwargs = {} if weight is None else {"sample_weight": weight}
        value = cls(**case["options"])(x, t, **kwargs)
        label = (case["options"], case["data"], case["weight"])
        want = torch.tensor(case["value"], dtype=torch.float64)
        torch.testing.assert_close(value.detach(), want, rtol=1e-12, atol=1e-14, msg=str(label))
        if case["grad"] is not None:
            (grad,) = torch.autograd.grad(value, x)
            want_grad = torch.tensor(case["grad"], dtype=torch.float64)
            torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-14, msg=str(label))


def _described(parameter: inspect.Parameter) -> list:
    default = parameter.default
    return [
        parameter.name,
        parameter.kind.name,
        None if default is inspect.Parameter.empty else repr(default),
    ]


@pytest.mark.parametrize("name", sorted(FROZEN["signatures"]))
def test_constructor_and_forward_signatures_are_the_references(name):
    cls = getattr(imbalanced_losses, name)
    ours = [_described(p) for p in inspect.signature(cls).parameters.values()]
    want = FROZEN["signatures"][name]["init"]
    assert ours[: len(want)] == want
    # Anything we add comes after, keyword-only, with a default.
    assert all(
        kind == "KEYWORD_ONLY" and default is not None for _, kind, default in ours[len(want) :]
    )
    forward = [_described(p) for p in inspect.signature(cls.forward).parameters.values()][1:]
    for parameter in FROZEN["signatures"][name]["forward"]:
        if parameter[1] == "VAR_KEYWORD":
            assert any(p[1] == "VAR_KEYWORD" for p in forward)
        else:
            assert parameter in forward


@pytest.mark.parametrize("case", FROZEN["errors"], ids=lambda c: f"{c['class']}-{c['kwargs']}")
def test_bad_arguments_raise_the_references_error_text(case):
    with pytest.raises(ValueError) as error:
        if case["class"] == "LossWarmupWrapper":
            LossWarmupWrapper(WarmupProbe(), MainProbe(), **case["kwargs"])
        else:
            getattr(imbalanced_losses, case["class"])(**case["kwargs"])
    # Ours may say more (the values seen), after the reference's words.
    assert str(error.value).startswith(case["message"].rstrip(".")), str(error.value)


def _bad_forward(loss_fn: nn.Module, bad: str) -> None:
    """The freezing script's own ``bad_forward`` (one definition of the bad inputs)."""
    path = ROOT / "scripts" / "freeze_reference_values.py"
    spec = importlib.util.spec_from_file_location("freeze_reference_values", path)
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.bad_forward(loss_fn, bad)


@pytest.mark.parametrize(
    "case",
    FROZEN["ranking_errors"],
    ids=lambda c: f"{c['class']}-{c['forward'] or c['kwargs']}",
)
def test_ranking_losses_raise_where_the_reference_does_and_name_the_same_argument(case):
    """Our texts differ (a README row): same type, same moment, and the argument's name, which
    the reference's text holds too, leads ours, so matching on it works with both."""
    assert case["argument"] in case["message"]  # the reference's frozen text names it
    with pytest.raises(ValueError) as error:
        loss_fn = getattr(imbalanced_losses, case["class"])(**case["kwargs"])
        if case["forward"] is not None:
            _bad_forward(loss_fn, case["forward"])
    assert str(error.value).startswith(case["argument"]), str(error.value)


@pytest.mark.parametrize(
    ("module", "names"),
    [
        ("ap_loss", ["SmoothAPLoss"]),
        ("recall_loss", ["RecallAtQuantileLoss"]),
        ("warmup_wrapper", ["LossWarmupWrapper"]),
        ("focal_loss", ["SigmoidFocalLoss", "SoftmaxFocalLoss"]),
        ("distributed", ["all_gather_with_grad", "all_gather_no_grad"]),
    ],
)
def test_the_references_module_paths_import_the_same_objects(module, names):
    loaded = importlib.import_module(f"imbalanced_losses.{module}")
    for name in names:
        assert getattr(loaded, name) is getattr(imbalanced_losses, name)
        assert name in imbalanced_losses.__all__


def test_out_of_range_targets_say_outside_as_the_references_tests_match():
    for num_classes, bad in [(3, 5), (1, 2)]:
        targets = torch.zeros(4, dtype=torch.long)
        targets[0] = bad
        with pytest.raises(ValueError, match="outside"):
            RecallAtQuantileLoss(num_classes, queue_size=0)(torch.randn(4, num_classes), targets)
    with pytest.raises(ValueError, match="outside"):
        SoftmaxFocalLoss()(torch.randn(4, 3), torch.tensor([0, 1, 3, -100]))


@pytest.mark.parametrize(
    "topic",
    [
        "LossWarmupWrapper` during the warm-up",
        "LossWarmupWrapper` without `on_train_batch_start",
        "LossWarmupWrapper` checkpoint",
        "LossWarmupWrapper` arguments",
        "focal losses under DDP",
        "focal losses, an empty batch",
        "focal losses, bad input",
        "`max_pool_size` warning",
        "error texts of the ranking losses",
        "float targets",
        "bfloat16 / float16 logits",
        "loss checkpoints",
        "`gather_distributed=True` without a process group",
        "`SigmoidFocalLoss` with bool or integer targets",
        "padding rows",
        "`all_gather_no_grad` in a world of one",
    ],
)
def test_every_deliberate_difference_has_a_readme_row_with_its_reason(topic):
    row = migration_row(re.escape(topic))
    assert len(row) == 4 and all(row), row
