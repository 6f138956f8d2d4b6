"""Code written for the reference library runs here unchanged, apart from the differences the
README's migration table lists."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import imbalanced_losses
from imbalanced_losses import RecallAtQuantileLoss

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
    assert out.rstrip().endswith("done")


def test_keywords_and_defaults_are_the_references():
    params = inspect.signature(RecallAtQuantileLoss).parameters
    assert "num_classes" in params and params["num_classes"].default is inspect.Parameter.empty
    for name, default in REFERENCE_DEFAULTS.items():
        assert name in params, name
        assert params[name].default == default, (name, params[name].default)


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
