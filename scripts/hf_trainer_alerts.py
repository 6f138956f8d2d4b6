#!/usr/bin/env python
"""The demo's alert task under the Hugging Face ``Trainer``, with ``RecallAtQuantileLoss``.

``Trainer.compute_loss`` is overridden to return ``RecallAtQuantileLoss`` blended with BCE;
``compute_metrics`` reports the recall at the alert budget over the whole evaluation set. The
model is a small MLP defined here (no download, no hub access)::

    pip install torch==2.13.0 -e . transformers accelerate
    python scripts/hf_trainer_alerts.py --max-steps 60

Keep one loss object for the whole run (its queue is the memory of past batches), and one loss
call per training step. The ``Trainer`` calls ``compute_loss`` in evaluation too; there the
model is in ``eval()`` mode, and the loss is only read (``update_queue_in_eval=False``), so
evaluation never writes the queue. Under ``torchrun`` the ``Trainer`` wraps the model in DDP
and the loss gathers every rank's rows by itself. Writes ``hf_trainer_alerts.json`` (logged
training losses, queue fill, evaluation recall) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import Trainer, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the demo's data
import train_alerts  # noqa: E402

try:  # the installed package, else the checkout this script lives in
    from imbalanced_losses import RecallAtQuantileLoss, recall_at_quantile
except ImportError:  # pragma: no cover - running from a source checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from imbalanced_losses import RecallAtQuantileLoss, recall_at_quantile


class AlertMLP(nn.Module):
    """A one-hidden-layer scorer returning ``{"logits": [N, 1]}``, as Trainer models do."""

    def __init__(self, n_features: int, hidden: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n_features, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        return {"logits": self.net(features)}


class AlertTrainer(Trainer):
    """A ``Trainer`` whose loss is the ranking loss plus BCE."""

    def __init__(self, *args, loss_fn: RecallAtQuantileLoss, bce_weight: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_fn = loss_fn
        self.bce_weight = bce_weight

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        logits = outputs["logits"]
        self.loss_fn.to(logits.device)  # the queue lives with the logits
        self.loss_fn.train(model.training)  # read-only queue during evaluation
        bce = F.binary_cross_entropy_with_logits(logits[:, 0], labels.float())
        loss = self.loss_fn(logits, labels) + self.bce_weight * bce
        return (loss, outputs) if return_outputs else loss


def as_rows(x: torch.Tensor, y: torch.Tensor) -> list[dict]:
    """The Trainer's dataset format: one dict per row; the default collator stacks them."""
    return [{"features": f, "labels": int(t)} for f, t in zip(x, y)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-samples", type=int, default=40_000, help="synthetic rows")
    p.add_argument("--max-steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=512, help="per-device batch")
    p.add_argument("--quantile", type=float, default=0.01, help="alert budget")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--queue-size", type=int, default=4096)
    p.add_argument("--bce-weight", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/hf_trainer", help="output folder")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    data = train_alerts.build_splits(
        train_alerts.parse_args(["--n-samples", str(args.n_samples)]), args.seed
    )
    torch.manual_seed(args.seed)
    model = AlertMLP(data.x_train.shape[1])
    loss_fn = RecallAtQuantileLoss(
        num_classes=1,
        quantile=args.quantile,
        queue_size=args.queue_size,
        temperature=args.temperature,
    )

    def compute_metrics(eval_pred) -> dict:
        # The Trainer hands over every evaluation row's logits at once (gathered from every
        # rank), so the function applies directly; no per-batch averaging.
        scores = torch.as_tensor(np.asarray(eval_pred.predictions)).reshape(-1).float()
        labels = torch.as_tensor(np.asarray(eval_pred.label_ids)).reshape(-1).long()
        return {"recall_at_budget": float(recall_at_quantile(scores, labels, args.quantile))}

    training_args = TrainingArguments(
        output_dir=args.out,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=4096,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=args.seed,
        disable_tqdm=True,
    )
    trainer = AlertTrainer(
        model=model,
        args=training_args,
        train_dataset=as_rows(data.x_train, data.y_train),
        eval_dataset=as_rows(data.x_val, data.y_val),
        compute_metrics=compute_metrics,
        loss_fn=loss_fn,
        bce_weight=args.bce_weight,
    )
    trainer.train()
    queued_before_eval = loss_fn.queue.count
    metrics = trainer.evaluate()
    report = {
        "world_size": training_args.world_size,
        "train_loss": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        "queue_count": queued_before_eval,
        "queue_count_after_eval": loss_fn.queue.count,
        "eval_recall_at_budget": metrics["eval_recall_at_budget"],
        "eval_loss": metrics["eval_loss"],
    }
    if trainer.is_world_process_zero():
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "hf_trainer_alerts.json").write_text(json.dumps(report, indent=2))
        print(
            f"[hf_trainer_alerts] {len(report['train_loss'])} steps, loss "
            f"{report['train_loss'][0]:.4f} -> {report['train_loss'][-1]:.4f}, queue "
            f"{report['queue_count']} rows, eval recall at the top {100 * args.quantile:g}%: "
            f"{report['eval_recall_at_budget']:.4f}"
        )
    return report


if __name__ == "__main__":
    main()
