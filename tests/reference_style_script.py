"""A user's script written against the reference library's public API, unchanged.

Imports, class path, keyword names and defaults are the ones the reference documentation
shows; its examples follow. tests/test_migration.py runs this file in a fresh process.
"""

import os
import tempfile

import torch
import torch.distributed as dist

from imbalanced_losses import RecallAtQuantileLoss
from imbalanced_losses.distributed import all_gather_no_grad, all_gather_with_grad
from imbalanced_losses.recall_loss import RecallAtQuantileLoss as RecallLossFromModule

assert RecallLossFromModule is RecallAtQuantileLoss

# Every documented keyword, spelled out with the documented default.
loss_fn = RecallAtQuantileLoss(
    num_classes=4,
    quantile=0.005,
    queue_size=1024,
    temperature=0.01,
    reduction="mean",
    ignore_index=-100,
    update_queue_in_eval=False,
    gather_distributed=None,
    quantile_interpolation="higher",
    max_pool_size=None,
)

# Example: optimise recall at the top 0.5% (the documented snippet, with requires_grad on
# the stand-in logits: backward() needs a graph with any PyTorch loss).
loss_fn = RecallAtQuantileLoss(num_classes=4, quantile=0.005, queue_size=1024)
logits = torch.randn(32, 4, requires_grad=True)
targets = torch.randint(0, 4, (32,))
loss = loss_fn(logits, targets)
loss.backward()
print("multi-class loss", loss.item())

# Example: binary classification.
loss_fn = RecallAtQuantileLoss(num_classes=1, quantile=0.01, queue_size=512)
logits = torch.randn(32, 1, requires_grad=True)
targets = torch.randint(0, 2, (32,))
loss = loss_fn(logits, targets)
print("binary loss", loss.item())

# Example: per-class logging.
loss, per_class, valid = loss_fn(logits, targets, return_per_class=True)
loss.backward()
for c in valid.nonzero(as_tuple=True)[0].tolist():
    print(f"Class {c} recall-loss: {per_class[c].item():.4f}")

# reduction="none": a [C] tensor, NaN for a class without positives.
loss_fn = RecallAtQuantileLoss(num_classes=3, quantile=0.3, temperature=0.5, reduction="none")
per_class = loss_fn(torch.randn(8, 3), torch.tensor([0, 0, 1, 1, 0, 1, 0, 1]))
print("reduction none", tuple(per_class.shape), "class 2 is nan:", bool(per_class[2].isnan()))

# Padding rows and eval mode, as documented.
loss_fn = RecallAtQuantileLoss(num_classes=2, quantile=0.3, temperature=0.5, queue_size=64)
loss_fn(torch.randn(10, 2), torch.tensor([0, 1] * 4 + [-100, -100]))
count = loss_fn.queue.count
loss_fn.eval()
loss_fn(torch.randn(10, 2), torch.tensor([0, 1] * 5))
print("queued rows", count, "after eval", loss_fn.queue.count)

# Out-of-range targets: a ValueError.
try:
    loss_fn.train()(torch.randn(4, 2), torch.tensor([0, 1, 2, 0]))
except ValueError as error:
    print("out-of-range targets: ValueError:", error)
else:
    raise SystemExit("out-of-range targets were accepted")

# The warm-up wrapper, its first four options positional, from the reference's module path.
from imbalanced_losses.ap_loss import SmoothAPLoss  # noqa: E402
from imbalanced_losses.warmup_wrapper import LossWarmupWrapper  # noqa: E402

wrapper = LossWarmupWrapper(
    torch.nn.CrossEntropyLoss(),
    SmoothAPLoss(num_classes=4, queue_size=64),
    1,
    0.1,
    0.01,
    10,
    blend_epochs=1,
    reset_queue_each_epoch=True,
)
for epoch in range(3):
    wrapper.on_train_epoch_start(epoch)
    for step in range(2):
        wrapper.on_train_batch_start(epoch * 2 + step)
        wrapper(torch.randn(8, 4, requires_grad=True), torch.randint(0, 4, (8,))).backward()
    print(f"epoch {epoch} main_weight {wrapper.main_weight} in_warmup {wrapper.in_warmup}")

# The focal losses, from the reference's module path.
from imbalanced_losses.focal_loss import SigmoidFocalLoss, SoftmaxFocalLoss  # noqa: E402

sigmoid = SigmoidFocalLoss(0.25, 2.0, "mean")(torch.zeros(2, 3), torch.ones(2, 3))
softmax = SoftmaxFocalLoss([1.0, 2.0], 0.0, "sum")(torch.zeros(2, 2), torch.tensor([0, 1]))
print(f"focal sigmoid {sigmoid.item():.6f} softmax {softmax.item():.6f}")

# The gather helpers inside a process group (here a world of one, on a file store).
with tempfile.TemporaryDirectory() as tmp:
    store = dist.FileStore(os.path.join(tmp, "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    x = torch.randn(5, 3, requires_grad=True)
    gathered = all_gather_with_grad(x)
    gathered.sum().backward()
    print("gathered", tuple(gathered.shape), "grad ones:", bool((x.grad == 1).all()))
    print("no-grad gather requires_grad:", all_gather_no_grad(x).requires_grad)
    dist.barrier()
    dist.destroy_process_group()
print("done", flush=True)
