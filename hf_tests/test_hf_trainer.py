"""scripts/hf_trainer_alerts.py: a few Trainer steps with the loss in compute_loss (smoke test).

Runs in the ``hf`` tox env, the only one with transformers installed.
"""

from __future__ import annotations

import math

import pytest

pytest.importorskip("transformers", reason="the Trainer example needs transformers installed")

import hf_trainer_alerts  # noqa: E402  (scripts/ is on pytest's pythonpath)

STEPS, BATCH = 20, 256


def test_trainer_steps_write_the_queue_once_each_and_the_loss_decreases(tmp_path):
    report = hf_trainer_alerts.main(
        [
            "--n-samples", "20000",
            "--max-steps", str(STEPS),
            "--batch-size", str(BATCH),
            "--queue-size", "8192",
            "--out", str(tmp_path),
        ]
    )  # fmt: skip
    losses = report["train_loss"]
    assert len(losses) == STEPS and all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) < sum(losses[:5]), losses
    # one loss call per training step, none during evaluation: exactly STEPS batches queued
    assert report["queue_count"] == STEPS * BATCH
    assert report["queue_count_after_eval"] == STEPS * BATCH
    assert 0.0 <= report["eval_recall_at_budget"] <= 1.0
    assert (tmp_path / "hf_trainer_alerts.json").exists()
