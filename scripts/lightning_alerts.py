#!/usr/bin/env python
"""The demo's alert task under PyTorch Lightning: RecallAtQuantileLoss + BCE, RecallAtQuantile.

A ``LightningModule`` trains a linear alert scorer with ``RecallAtQuantileLoss`` blended with
BCE and logs the validation recall at the alert budget with the ``RecallAtQuantile`` metric,
under ``Trainer(accelerator="cpu", devices=2, strategy="ddp")``::

    pip install torch==2.13.0 -e ".[metrics]" lightning
    python scripts/lightning_alerts.py --devices 2

``strategy="ddp"`` re-runs this script once per extra rank (Lightning's subprocess launcher),
so start it as a script, not from a notebook or pytest (use ``"ddp_spawn"`` there). Each rank
trains on its contiguous, equal slice of every global batch; the loss gathers every rank's rows,
so the logged per-step loss (``sync_dist=True``: the mean over ranks of ranking loss + local
BCE) is the loss of one process fed the global batch. Validation rows are split unevenly across
ranks and the metric pools them all. Rank 0 writes ``lightning_alerts.json`` (per-step loss,
validation recall per epoch) and ``model.pt`` (the scorer's final weights) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the demo's data and model
import train_alerts  # noqa: E402

try:  # the installed package, else the checkout this script lives in
    from imbalanced_losses import RecallAtQuantile, RecallAtQuantileLoss
except ImportError:  # pragma: no cover - running from a source checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from imbalanced_losses import RecallAtQuantile, RecallAtQuantileLoss


def load_data(n_samples: int, seed: int) -> train_alerts.Splits:
    """The demo's seeded synthetic task (train/val/test, standardised on the train split)."""
    demo_args = train_alerts.parse_args(["--n-samples", str(n_samples)])
    return train_alerts.build_splits(demo_args, seed)


def build_scorer(n_features: int, positive_rate: float, seed: int) -> torch.nn.Module:
    """The demo's linear scorer, its bias at the prior log-odds; the same on every rank."""
    torch.manual_seed(seed)
    return train_alerts.make_model(n_features, 0, positive_rate)


def global_batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int, epoch: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every global batch of one epoch, in order (the demo's shuffle; the ragged tail dropped)."""
    order = train_alerts.epoch_order(len(y), seed, epoch)
    steps = len(y) // batch_size
    return [
        (x[rows], y[rows])
        for rows in (order[k * batch_size : (k + 1) * batch_size] for k in range(steps))
    ]


class AlertScorer(L.LightningModule):
    def __init__(self, data: train_alerts.Splits, args: argparse.Namespace) -> None:
        super().__init__()
        self.data, self.args = data, args
        positive_rate = float(data.y_train.float().mean())
        self.scorer = build_scorer(data.x_train.shape[1], positive_rate, args.seed)
        self.loss_fn = RecallAtQuantileLoss(
            num_classes=1,
            quantile=args.quantile,
            queue_size=args.queue_size,
            temperature=args.temperature,
        )
        self.val_recall = RecallAtQuantile(args.quantile)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        logits = self.scorer(x)
        bce = F.binary_cross_entropy_with_logits(logits[:, 0], y.float())
        loss = self.loss_fn(logits, y) + self.args.bce_weight * bce
        # BCE is this rank's mean over an equal slice: the mean over ranks is the global BCE.
        self.log("train_loss", loss, on_step=True, on_epoch=False, sync_dist=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        x, y = batch
        self.val_recall.update(self.scorer(x)[:, 0], y)
        # Log the metric object: Lightning computes it (every rank's rows) at the epoch end.
        self.log("val_recall", self.val_recall, on_step=False, on_epoch=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.scorer.parameters(), lr=self.args.lr)

    def train_dataloader(self) -> DataLoader:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        batches = global_batches(
            self.data.x_train,
            self.data.y_train,
            self.args.batch_size,
            self.args.seed,
            self.current_epoch,
        )
        local = [(x.chunk(world)[rank], y.chunk(world)[rank]) for x, y in batches]
        return DataLoader(local, batch_size=None)  # already batched

    def val_dataloader(self) -> DataLoader:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        rows = torch.arange(len(self.data.y_val)).tensor_split(world)[rank]  # uneven is fine
        # the same number of batches on every rank, of uneven sizes
        local = [(self.data.x_val[r], self.data.y_val[r]) for r in rows.tensor_split(4)]
        return DataLoader(local, batch_size=None)


class StepLosses(L.Callback):
    """Keeps the logged (rank-synced) training loss of every step, and recall of every epoch."""

    def __init__(self) -> None:
        self.train_loss: list[float] = []
        self.val_recall: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        self.train_loss.append(float(trainer.callback_metrics["train_loss"]))

    def on_validation_epoch_end(self, trainer: L.Trainer, *args: object) -> None:
        self.val_recall.append(float(trainer.callback_metrics["val_recall"]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=2, help="CPU ranks (strategy 'ddp' when > 1)")
    p.add_argument("--n-samples", type=int, default=20_000, help="synthetic rows")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=1024, help="global batch (all ranks)")
    p.add_argument("--quantile", type=float, default=0.01, help="alert budget")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--queue-size", type=int, default=2048)
    p.add_argument("--bce-weight", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/lightning", help="output folder")
    args = p.parse_args(argv)
    if args.batch_size % args.devices:
        p.error(f"--batch-size {args.batch_size} must be divisible by --devices {args.devices}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    data = load_data(args.n_samples, args.seed)
    steps = StepLosses()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        max_epochs=args.epochs,
        use_distributed_sampler=False,  # the dataloaders shard the data themselves
        reload_dataloaders_every_n_epochs=1,  # a new shuffle every epoch
        num_sanity_val_steps=0,
        callbacks=[steps],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    module = AlertScorer(data, args)
    trainer.fit(module)
    if trainer.is_global_zero:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        torch.save(module.scorer.state_dict(), out / "model.pt")
        report = {
            "world_size": trainer.world_size,
            "train_loss": steps.train_loss,
            "val_recall": steps.val_recall,
        }
        (out / "lightning_alerts.json").write_text(json.dumps(report, indent=2))
        print(
            f"[lightning_alerts] world_size={trainer.world_size} "
            f"final val recall at the top {100 * args.quantile:g}%: {steps.val_recall[-1]:.4f}"
        )
    if dist.is_initialized():
        # End without the gloo exit-time abort (see docs/ddp.md): every rank reaches here,
        # then skip the interpreter teardown.
        dist.barrier()
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
