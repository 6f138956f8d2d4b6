"""A user's script written for the reference library's public API (imbalanced-losses 0.6.0).

It uses every public class, from the top level and from the reference's module paths, builds
each loss positionally (in the reference's parameter order) and with every keyword, and calls
the forwards in the reference's order ``(logits, targets, iid_mask, return_per_class[,
return_diagnostics])``. Inputs are formulas (no random generator), float64. The last line it
prints is ``RESULTS <json>``: every value, per-class value, validity flag and input gradient.

``scripts/freeze_reference_values.py`` runs this very file under the reference and stores its
results in ``tests/data/reference_0_6_0.json``; ``tests/test_migration.py`` runs it unchanged
under this package and compares.
"""

import json
import math
import os
import tempfile
import warnings

import torch
import torch.distributed as dist
from torch import nn

import imbalanced_losses
from imbalanced_losses import (
    LossWarmupWrapper,
    PAUCAtBudgetLoss,
    RecallAtQuantileLoss,
    SigmoidFocalLoss,
    SmoothAPLoss,
    SoftmaxFocalLoss,
    all_gather_no_grad,
    all_gather_with_grad,
)
from imbalanced_losses.ap_loss import SmoothAPLoss as SmoothAPLossFromModule
from imbalanced_losses.distributed import all_gather_no_grad as gather_no_grad_from_module
from imbalanced_losses.distributed import all_gather_with_grad as gather_from_module
from imbalanced_losses.focal_loss import SigmoidFocalLoss as SigmoidFromModule
from imbalanced_losses.focal_loss import SoftmaxFocalLoss as SoftmaxFromModule
from imbalanced_losses.pauc_loss import PAUCAtBudgetLoss as PAUCFromModule
from imbalanced_losses.recall_loss import RecallAtQuantileLoss as RecallFromModule
from imbalanced_losses.warmup_wrapper import LossWarmupWrapper as WrapperFromModule

assert SmoothAPLossFromModule is SmoothAPLoss
assert RecallFromModule is RecallAtQuantileLoss
assert PAUCFromModule is PAUCAtBudgetLoss
assert WrapperFromModule is LossWarmupWrapper
assert SigmoidFromModule is SigmoidFocalLoss
assert SoftmaxFromModule is SoftmaxFocalLoss
assert gather_from_module is all_gather_with_grad
assert gather_no_grad_from_module is all_gather_no_grad

results = {"all": sorted(imbalanced_losses.__all__)}


def batch(step, n=14, c=4, pad=False):
    """Distinct scores, every class present, an iid mask and weights; ``pad``: some padding
    rows (only where the queue is off: the reference writes padding rows into its queue, a
    row of the README's differences)."""
    i = torch.arange(n * c, dtype=torch.float64)
    logits = (2 * torch.sin(0.731 * i + 1.3 * step) + 0.1 * i / (n * c)).reshape(n, c)
    rows = torch.arange(n)
    if c == 1:
        targets = ((rows * 3 + step) % 5 == 0).long()
    else:
        targets = (rows * 5 + step) % c
    if pad:
        targets = torch.where((rows + step) % 7 == 6, -100, targets)
    iid = (rows + step) % 3 != 0
    weight = 0.5 + ((rows + 2 * step) % 4).double() / 4
    return logits.requires_grad_(True), targets, iid, weight


def numbers(x):
    """A tensor (or a tuple of them) as nested lists; NaN as the string 'nan'."""
    if isinstance(x, (tuple, list)):
        return [numbers(v) for v in x]
    if isinstance(x, dict):
        return {k: numbers(v) for k, v in sorted(x.items())}
    if isinstance(x, torch.Tensor):
        x = x.detach().tolist()
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    if isinstance(x, list):
        return [numbers(v) for v in x]
    return x


def run(name, loss_fn, calls, c=4, steps=3, pad=False):
    """Train steps, then one eval step; each call style in ``calls`` in turn."""
    out = []
    for step in range(steps + 1):
        if step == steps:
            loss_fn.eval()
        logits, targets, iid, weight = batch(step, c=c, pad=pad)
        style = calls[step % len(calls)]
        got = style(loss_fn, logits, targets, iid, weight)
        value = got[0] if isinstance(got, tuple) else got
        total = value if value.dim() == 0 else torch.nan_to_num(value, nan=0.0).sum()
        if total.requires_grad:
            total.backward()
        grad = logits.grad if logits.grad is not None else torch.zeros_like(logits)
        out.append({"style": style.__name__, "out": numbers(got), "grad": numbers(grad)})
    results[name] = out


def plain(loss_fn, logits, targets, iid, weight):
    return loss_fn(logits, targets)


def iid_positional(loss_fn, logits, targets, iid, weight):
    return loss_fn(logits, targets, iid)


def per_class_positional(loss_fn, logits, targets, iid, weight):
    return loss_fn(logits, targets, None, True)


def all_positional_weighted(loss_fn, logits, targets, iid, weight):
    return loss_fn(logits, targets, iid, True, sample_weight=weight)


def by_keyword(loss_fn, logits, targets, iid, weight):
    return loss_fn(
        logits=logits, targets=targets, iid_mask=iid, return_per_class=True, sample_weight=weight
    )


def diagnostics_positional(loss_fn, logits, targets, iid, weight):
    return loss_fn(logits, targets, iid, True, True, sample_weight=weight)


def diagnostics_only(loss_fn, logits, targets, iid, weight):
    return loss_fn(logits, targets, iid, False, True)


RANKING_CALLS = [plain, iid_positional, per_class_positional, all_positional_weighted, by_keyword]

# The recall loss: positionally (num_classes, quantile, queue_size, temperature, reduction) ...
run(
    "recall positional",
    RecallAtQuantileLoss(4, 0.2, 20, 0.5, "sum").double(),
    RANKING_CALLS,
)
# ... and with every keyword.
run(
    "recall keywords",
    RecallAtQuantileLoss(
        num_classes=4,
        quantile=0.3,
        queue_size=9,
        temperature=0.25,
        reduction="none",
        ignore_index=-100,
        update_queue_in_eval=True,
        gather_distributed=None,
        quantile_interpolation="linear",
        max_pool_size=None,
    ).double(),
    [by_keyword, all_positional_weighted],
    steps=4,
)
run("recall binary", RecallAtQuantileLoss(1, 0.25, 16, 0.5).double(), RANKING_CALLS, c=1)
run("recall padding", RecallAtQuantileLoss(4, 0.25, 0, 0.5).double(), RANKING_CALLS, pad=True)

# Smooth-AP: positionally (num_classes, queue_size, temperature, reduction) and by keyword.
run("smooth_ap positional", SmoothAPLoss(4, 20, 0.5, "mean").double(), RANKING_CALLS)
run(
    "smooth_ap keywords",
    SmoothAPLoss(
        num_classes=4,
        queue_size=9,
        temperature=0.25,
        reduction="sum",
        ignore_index=-100,
        update_queue_in_eval=False,
        gather_distributed=None,
        max_pool_size=None,
    ).double(),
    [by_keyword, per_class_positional],
    steps=4,
)
run("smooth_ap binary", SmoothAPLoss(1, 16, 0.5).double(), RANKING_CALLS, c=1)
run("smooth_ap padding", SmoothAPLoss(4, 0, 0.5).double(), RANKING_CALLS, pad=True)

# Partial AUC: positionally, in the reference's order ...
run(
    "pauc positional pairwise",
    PAUCAtBudgetLoss(4, 0.0, 0.4, "pairwise", 2, "iqr", "pool", "fpr", 20, 0.5).double(),
    [diagnostics_positional, iid_positional, all_positional_weighted, diagnostics_only],
)
# ... and with every keyword.
run(
    "pauc keywords trapezoid",
    PAUCAtBudgetLoss(
        num_classes=4,
        alpha=0.05,
        beta=0.45,
        surrogate="trapezoid",
        n_knots=4,
        tau_scale="band",
        pos_numerator="live",
        budget_basis="population",
        queue_size=11,
        temperature=0.3,
        reduction="none",
        ignore_index=-100,
        update_queue_in_eval=False,
        gather_distributed=None,
        quantile_interpolation="linear",
        max_pool_size=None,
    ).double(),
    [diagnostics_positional, by_keyword],
    steps=4,
)
run(
    "pauc binary trapezoid",
    PAUCAtBudgetLoss(1, 0.0, 0.5, "trapezoid", 3, queue_size=16, temperature=0.5).double(),
    [diagnostics_positional, iid_positional, plain],
    c=1,
)
run(
    "pauc padding",
    PAUCAtBudgetLoss(4, 0.0, 0.5, "pairwise", queue_size=0, temperature=0.5).double(),
    [diagnostics_positional, all_positional_weighted],
    pad=True,
)

# The warm-up wrapper: its first four options positionally, the rest by keyword, with a
# queue that is emptied at each epoch start (so the warm-up epochs leave nothing in it).
wrapper = LossWarmupWrapper(
    nn.CrossEntropyLoss(),
    SmoothAPLoss(num_classes=4, queue_size=16).double(),
    1,
    0.5,
    0.05,
    4,
    blend_epochs=1,
    final_main_weight=0.75,
    reset_queue_each_epoch=True,
    gather_distributed=None,
)
records = []
for epoch in range(4):
    wrapper.on_train_epoch_start(epoch)
    for k in range(2):
        step = 2 * epoch + k
        wrapper.on_train_batch_start(step)
        logits, targets, _, _ = batch(step)
        keep = targets != -100
        value = wrapper(logits[keep], targets[keep])
        value.backward()
        records.append(
            [
                numbers(value),
                wrapper.main_weight,
                wrapper.current_temperature,
                wrapper.in_warmup,
                wrapper.in_blend,
                numbers(logits.grad),
            ]
        )
results["warmup epochs"] = records

wrapper = LossWarmupWrapper(
    warmup_loss=nn.CrossEntropyLoss(),
    main_loss=RecallAtQuantileLoss(num_classes=4, quantile=0.3, queue_size=0).double(),
    warmup_steps=2,
    blend_steps=2,
    temp_start=0.5,
    temp_end=0.1,
    temp_decay_steps=3,
)
records = []
for step in range(7):
    wrapper.on_train_batch_start(step)
    logits, targets, _, _ = batch(step)
    keep = targets != -100
    value = wrapper(logits[keep], targets[keep])
    records.append([numbers(value), wrapper.main_weight, wrapper.current_temperature])
results["warmup steps"] = records

# The focal losses: positionally and by keyword, with weights.
x = torch.linspace(-3, 3, 24, dtype=torch.float64).reshape(8, 3).requires_grad_(True)
t = (torch.arange(24).reshape(8, 3) % 3 == 0).double()
w = 0.5 + torch.arange(8, dtype=torch.float64).unsqueeze(1) / 8
focal = []
for loss_fn, kwargs in [
    (SigmoidFocalLoss(0.25, 2.0, "mean"), {}),
    (SigmoidFocalLoss(alpha=-1, gamma=1.5, reduction="sum", gather_distributed=None), {}),
    (SigmoidFocalLoss(0.5, 0.0, "none"), {"sample_weight": w}),
]:
    value = loss_fn(x, t, **kwargs)
    (grad,) = torch.autograd.grad(value.sum(), x)
    focal.append([numbers(value), numbers(grad)])
y = torch.tensor([0, 1, 2, 2, -100, 1, 0, 2])
wy = 0.5 + torch.arange(8, dtype=torch.float64) / 8
for loss_fn, kwargs in [
    (SoftmaxFocalLoss([0.5, 1.0, 2.0], 2.0, "mean_positive", 0.0, -100, 0), {}),
    (
        SoftmaxFocalLoss(
            alpha=None,
            gamma=1.0,
            reduction="sum",
            label_smoothing=0.1,
            ignore_index=-100,
            background_class=0,
            gather_distributed=None,
        ),
        {"sample_weight": wy},
    ),
    (SoftmaxFocalLoss(gamma=2.0, reduction="mean"), {}),
]:
    value = loss_fn(x, y, **kwargs)
    (grad,) = torch.autograd.grad(value.sum(), x)
    focal.append([numbers(value), numbers(grad)])
results["focal"] = focal

# max_pool_size: a pool larger than it warns (once), a smaller one does not subsample.
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    loss_fn = RecallAtQuantileLoss(4, 0.3, 64, 0.5, max_pool_size=1000).double()
    for step in range(2):
        logits, targets, _, _ = batch(step)
        loss_fn(logits, targets)
    small = [str(c.message) for c in caught if "max_pool_size" in str(c.message)]
    subsampling = RecallAtQuantileLoss(4, 0.3, 64, 0.5, max_pool_size=8).double()
    for step in range(3):
        logits, targets, _, _ = batch(step)
        subsampling(logits, targets)
    big = [str(c.message) for c in caught if "max_pool_size" in str(c.message)]
results["max_pool_size warnings"] = [len(small), len(big) - len(small)]

# The gather helpers inside a process group (a world of one, on a file store).
with tempfile.TemporaryDirectory() as tmp:
    store = dist.FileStore(os.path.join(tmp, "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    x = torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(4, 3).requires_grad_(True)
    gathered = all_gather_with_grad(x)
    (gathered * torch.arange(12, dtype=torch.float64).reshape(4, 3)).sum().backward()
    no_grad = all_gather_no_grad(x)
    results["gather"] = [numbers(gathered), numbers(x.grad), no_grad.requires_grad]
    dist.barrier()
    dist.destroy_process_group()

print("RESULTS " + json.dumps(results, sort_keys=True), flush=True)
