"""Report "not enough GPUs for NCCL" skips at the test that asked for them, not inside pytest."""

from __future__ import annotations

import pytest

from imbalanced_losses.testing import NotEnoughGPUs


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    # Look before pytest's unittest plugin turns the SkipTest into its own skip exception.
    gpus_missing = call.excinfo is not None and call.excinfo.errisinstance(NotEnoughGPUs)
    reason = str(call.excinfo.value) if gpus_missing else ""
    outcome = yield
    report = outcome.get_result()
    if gpus_missing and report.skipped:
        path, lineno, _ = item.reportinfo()
        report.longrepr = (str(path), (lineno or 0) + 1, f"Skipped: {reason}")
