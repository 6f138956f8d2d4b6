"""scripts/lightning_alerts.py under Trainer(strategy="ddp", devices=2) on gloo equals one process.

The reference is written here without Lightning: one process, the same data, initial weights,
global batches, optimiser and loss. Lightning's logged per-step loss (synced over ranks) must
equal the reference loss of every step, and the logged validation recall (RecallAtQuantile
over every rank's unevenly split validation rows) must equal ``recall_at_quantile`` of the
whole validation set scored by the trained model, in one process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lightning", reason="the Lightning example needs lightning installed")
pytest.importorskip("torchmetrics", reason='pip install "imbalanced-losses[metrics]"')

from imbalanced_losses import RecallAtQuantileLoss, recall_at_quantile  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "lightning_alerts.py"
TIMEOUT_S = 240
ARGS = ["--n-samples", "20000", "--epochs", "2", "--batch-size", "1024", "--seed", "0"]

import lightning_alerts  # noqa: E402  (scripts/ is on pytest's pythonpath)


def _launch(out_dir: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [sys.executable, str(SCRIPT), "--devices", "2", *ARGS, "--out", str(out_dir)]
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # Lightning's extra rank is in this session too
    )
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"the Lightning run did not finish in {TIMEOUT_S}s:\n{out[-4000:]}")
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{out[-6000:]}"
    return out


def _single_process_reference(args) -> tuple[list[float], torch.nn.Module]:
    """One process, global batches, no Lightning: the loss of each step and the final model."""
    data = lightning_alerts.load_data(args.n_samples, args.seed)
    model = lightning_alerts.build_scorer(
        data.x_train.shape[1], float(data.y_train.float().mean()), args.seed
    )
    loss_fn = RecallAtQuantileLoss(
        num_classes=1,
        quantile=args.quantile,
        queue_size=args.queue_size,
        temperature=args.temperature,
    )
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    losses = []
    for epoch in range(args.epochs):
        for x, y in lightning_alerts.global_batches(
            data.x_train, data.y_train, args.batch_size, args.seed, epoch
        ):
            logits = model(x)
            bce = F.binary_cross_entropy_with_logits(logits[:, 0], y.float())
            loss = loss_fn(logits, y) + args.bce_weight * bce
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    return losses, model


def test_two_ddp_ranks_log_the_single_process_loss_and_metric(tmp_path: Path) -> None:
    out = _launch(tmp_path)
    assert "world_size=2" in out
    assert "terminate called" not in out, out[-4000:]
    report = json.loads((tmp_path / "lightning_alerts.json").read_text())
    assert report["world_size"] == 2

    args = lightning_alerts.parse_args(["--devices", "2", *ARGS])
    losses, reference_model = _single_process_reference(args)
    assert len(report["train_loss"]) == len(losses) > 0
    # float32 training: DDP averages gradients in another order than one process sums them
    torch.testing.assert_close(
        torch.tensor(report["train_loss"]), torch.tensor(losses), rtol=1e-5, atol=1e-6
    )

    data = lightning_alerts.load_data(args.n_samples, args.seed)
    trained = lightning_alerts.build_scorer(data.x_train.shape[1], 0.01, args.seed)
    trained.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    with torch.no_grad():
        whole = recall_at_quantile(trained(data.x_val)[:, 0], data.y_val, args.quantile)
        reference = recall_at_quantile(reference_model(data.x_val)[:, 0], data.y_val, args.quantile)
    # the metric pooled every rank's validation rows: exactly the whole-set recall ...
    assert report["val_recall"][-1] == pytest.approx(float(whole), abs=1e-12)
    # ... and the DDP model is the single-process model up to float noise (a positive at most)
    positives = int(data.y_val.sum())
    assert float(whole) == pytest.approx(float(reference), abs=1.0 / positives + 1e-9)
