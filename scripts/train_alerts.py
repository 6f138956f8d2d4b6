#!/usr/bin/env python
"""Alert-budget demo: does a ranking loss beat BCE alone at the alert budget?

Trains a linear scorer (the default; ``--hidden N`` for a one-hidden-layer MLP) on an
imbalanced alert task, per seed, with the arms a user would choose between:

* ``bce``:  binary cross-entropy for all epochs;
* ``raq``:  the same BCE run up to the end of the warm-up, then
  ``RecallAtQuantileLoss`` (optionally blended with ``--bce-weight`` x BCE) for the
  remaining epochs, the schedule written by hand in this script;
* ``sap``:  the same, with ``SmoothAPLoss`` (``--sap-*`` options) instead;
* ``pauc``: the same, with ``PAUCAtBudgetLoss`` (``--pauc-*`` options): partial AUC over
  the false-positive-rate band that ends at the alert budget;
* ``raq_wrapped``: the ``raq`` arm with ``LossWarmupWrapper`` doing the schedule
  instead of the hand-written code (it gives the same numbers: a check of the wrapper).

All arms share the warm-up exactly (the ranking arms fork from the ``bce`` arm's
weights), see the same batches in the same order, and get the same total number of
epochs. ``--arms`` runs a subset.

It reports hard recall at the alert budget (``recall_at_quantile``: the share of
held-out positives whose score is at or above the top-``quantile`` threshold of all
held-out scores) as a terminal table, a JSON file and a PNG.

Data: an embedded synthetic task (seeded, ~0.5% positives, hard negatives that
overlap the positives, nothing to download) or your own CSV/Parquet file
(``--data file.csv --label-column is_fraud``; numeric feature columns, binary label).

Runs in one process, under ``torchrun`` and under ``accelerate launch``::

    python scripts/train_alerts.py --seeds 0 1 2
    torchrun --standalone --nproc_per_node 2 scripts/train_alerts.py --seeds 0 1 2
    accelerate launch --config_file scripts/accelerate_cpu_2ranks.yaml \\
        scripts/train_alerts.py --seeds 0 1 2

With several ranks every global batch is split evenly across ranks (contiguous
slices, rank order), BCE is a per-rank mean on equal slices and the ranking loss
gathers all ranks' rows with exact gradients, so the run computes the same thing as
one process, up to float rounding. ``accelerate`` is not needed to run the script.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

try:  # the installed package, else the checkout this script lives in
    from imbalanced_losses import (
        LossWarmupWrapper,
        PAUCAtBudgetLoss,
        RecallAtQuantileLoss,
        SmoothAPLoss,
        recall_at_quantile,
    )
except ImportError:  # pragma: no cover - running from a source checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from imbalanced_losses import (
        LossWarmupWrapper,
        PAUCAtBudgetLoss,
        RecallAtQuantileLoss,
        SmoothAPLoss,
        recall_at_quantile,
    )

try:
    from tqdm.auto import tqdm
except ImportError:  # tqdm is optional
    tqdm = None


# --------------------------------------------------------------------------- distributed
@dataclass
class DistInfo:
    world_size: int
    rank: int
    local_rank: int
    backend: str  # "none" for a single process
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _truthy(value: str | None) -> bool:
    return str(value).strip().lower() in {"1", "true", "yes", "on"}


def setup_distributed(force_cpu: bool) -> DistInfo:
    """Initialise torch.distributed from the launcher's env vars when WORLD_SIZE > 1.

    torchrun and ``accelerate launch`` both export RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR and MASTER_PORT. NCCL is used when every local rank can have its own
    GPU, gloo on CPU otherwise. ``--cpu`` or ACCELERATE_USE_CPU=1 force CPU/gloo.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    force_cpu = force_cpu or _truthy(os.environ.get("ACCELERATE_USE_CPU"))
    use_cuda = (
        not force_cpu and torch.cuda.is_available() and torch.cuda.device_count() >= local_world
    )
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world_size > 1:
        if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            timeout=datetime.timedelta(minutes=5),
            **({"device_id": device} if use_cuda else {}),
        )
        backend = str(dist.get_backend())
        assert dist.get_world_size() == world_size and dist.get_rank() == rank
    else:
        backend = "none"
    return DistInfo(world_size, rank, local_rank, backend, device)


def log(info: DistInfo, *args) -> None:
    if info.is_main:
        print(*args, flush=True)


# --------------------------------------------------------------------------- data
@dataclass
class Splits:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    feature_names: list[str]
    source: str


def make_synthetic(
    n: int, seed: int, positive_rate: float, hard_negative_rate: float, n_features: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded synthetic alert task (numpy only, nothing downloaded).

    * easy negatives: the bulk, ``N(0, I)``;
    * "burst" positives (half of the positives): a strong signal on feature 1 plus a
      separating signal on feature 2 -- catchable at a small alert budget;
    * hard negatives: the same burst on feature 1 but the opposite side on feature 2,
      so they overlap the positives and compete for the alert budget;
    * "drift" positives (the other half): the bulk shifted along feature 0 -- too close
      to the bulk to fit in a 1% budget, yet they dominate BCE's gradient on feature 0,
      whose noise then spills into the ranking of the burst region.

    A linear model fitted with BCE must compromise between the two kinds of positives
    (BCE weights every missed positive, hopeless drift ones included, by ``1 - p``); a
    recall-at-budget objective spends its capacity on the ones the budget can catch.
    Measured (docs/demo.md): that mixture is what makes the ranking loss win; the hard
    negatives are not needed for it, and an 8-unit MLP fits both kinds with BCE alone.
    """
    if n_features < 4:
        raise ValueError(f"n_features must be >= 4, got {n_features}")
    rng = np.random.default_rng(seed)
    n_pos = int(round(n * positive_rate))
    n_hard = int(round(n * hard_negative_rate))
    n_burst = n_pos // 2
    n_easy = n - n_pos - n_hard
    x = rng.standard_normal((n, n_features)).astype(np.float32)
    y = np.zeros(n, dtype=np.int64)
    # rows [0, n_burst) burst positives, then drift positives, then hard negatives.
    burst = slice(0, n_burst)
    drift = slice(n_burst, n_pos)
    hard = slice(n_pos, n_pos + n_hard)
    y[:n_pos] = 1
    x[burst, 1] = rng.normal(3.0, 0.7, n_burst)
    x[burst, 2] += 1.0
    x[hard, 1] = rng.normal(3.0, 0.7, n_hard)
    x[hard, 2] -= 1.0
    x[drift, 0] += 1.5
    # a weak, nonlinear nuisance interaction so a tiny MLP has something to chase
    x[:, 3] = x[:, 3] + 0.3 * x[:, 0] * x[:, 1]
    assert n_easy > 0
    return x, y


def load_table(path: Path, label_column: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    import pandas as pd  # only needed for --data

    if path.suffix.lower() in {".parquet", ".pq"}:
        frame = pd.read_parquet(path)
    elif path.suffix.lower() in {".csv", ".txt"} or path.name.lower().endswith(".csv.gz"):
        frame = pd.read_csv(path)
    else:
        raise ValueError(f"--data: expected a .csv or .parquet file, got {path.name!r}")
    if label_column not in frame.columns:
        raise ValueError(
            f"--label-column: {label_column!r} is not a column of {path.name}; "
            f"columns are {list(frame.columns)[:20]}"
        )
    frame = frame[frame[label_column].notna()]
    labels = frame[label_column]
    if labels.dtype == bool:
        y = labels.to_numpy().astype(np.int64)
    else:
        values = set(np.unique(labels.to_numpy()).tolist())
        if not values <= {0, 1}:
            raise ValueError(
                f"--label-column {label_column!r}: expected binary labels in {{0, 1}} or bool, "
                f"saw values {sorted(values, key=str)[:10]}"
            )
        y = labels.to_numpy().astype(np.int64)
    features = frame.drop(columns=[label_column])
    numeric = features.select_dtypes(include=["number", "bool"])
    dropped = [c for c in features.columns if c not in numeric.columns]
    if dropped:
        print(f"[train_alerts] ignoring non-numeric columns: {dropped}", file=sys.stderr)
    if numeric.shape[1] == 0:
        raise ValueError(f"--data: {path.name} has no numeric feature columns")
    x = numeric.to_numpy(dtype=np.float32)
    return x, y, [str(c) for c in numeric.columns]


def stratified_split(
    x: np.ndarray, y: np.ndarray, seed: int, val_frac: float, test_frac: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed + 7919)
    parts: list[list[np.ndarray]] = [[], [], []]
    for cls in (0, 1):
        idx = rng.permutation(np.flatnonzero(y == cls))
        n_val = int(round(len(idx) * val_frac))
        n_test = int(round(len(idx) * test_frac))
        parts[1].append(idx[:n_val])
        parts[2].append(idx[n_val : n_val + n_test])
        parts[0].append(idx[n_val + n_test :])
    return tuple(rng.permutation(np.concatenate(p)) for p in parts)  # type: ignore[return-value]


def build_splits(args: argparse.Namespace, seed: int) -> Splits:
    if args.data is None:
        x, y = make_synthetic(
            args.n_samples, seed, args.positive_rate, args.hard_negative_rate, args.n_features
        )
        names = [f"f{i}" for i in range(x.shape[1])]
        source = (
            f"synthetic(n={args.n_samples}, positive_rate={args.positive_rate}, "
            f"hard_negative_rate={args.hard_negative_rate}, seed={seed})"
        )
    else:
        x, y, names = load_table(Path(args.data), args.label_column)
        source = str(args.data)
    tr, va, te = stratified_split(x, y, seed, args.val_frac, args.test_frac)
    mean = np.nanmean(x[tr], axis=0)
    std = np.nanstd(x[tr], axis=0)
    std = np.where(std > 0, std, 1.0)
    z = (x - mean) / std
    z = np.nan_to_num(z, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)
    t = torch.from_numpy
    return Splits(t(z[tr]), t(y[tr]), t(z[va]), t(y[va]), t(z[te]), t(y[te]), names, source)


# --------------------------------------------------------------------------- model / training
def make_model(n_features: int, hidden: int, positive_rate: float | None) -> nn.Module:
    """A deliberately small model; the output bias starts at the prior log-odds.

    The prior-bias start (as in the focal-loss paper) spares BCE the first epochs it would
    otherwise spend pushing every score down to the base rate.
    """
    if hidden <= 0:
        model: nn.Module = nn.Linear(n_features, 1)
        head = model
    else:
        model = nn.Sequential(nn.Linear(n_features, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        head = model[-1]
    if positive_rate is not None:
        p = min(max(positive_rate, 1e-6), 1 - 1e-6)
        with torch.no_grad():
            head.bias.fill_(math.log(p / (1 - p)))
    return model


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The global shuffle of epoch ``epoch``: identical on every rank and in every arm."""
    gen = torch.Generator().manual_seed(1_000_003 * seed + epoch)
    return torch.randperm(n, generator=gen)


@torch.no_grad()
def scores_of(
    model: nn.Module, x: torch.Tensor, device: torch.device, chunk: int = 65536
) -> torch.Tensor:
    model.eval()
    out = [model(x[i : i + chunk].to(device))[:, 0].float().cpu() for i in range(0, len(x), chunk)]
    return torch.cat(out) if out else torch.empty(0)


def recall_sharded(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, quantile: float, info: DistInfo
) -> float:
    """Each rank scores its own shard; ``recall_at_quantile`` pools all ranks' rows."""
    shard = slice(info.rank, None, info.world_size)
    s = scores_of(model, x[shard], info.device).to(info.device)
    r = recall_at_quantile(s, y[shard].to(info.device), quantile)
    return float(r)


class Progress:
    def __init__(self, info: DistInfo, total: int, enabled: bool, desc: str):
        self.bar = None
        if info.is_main and enabled and tqdm is not None:
            self.bar = tqdm(
                total=total,
                desc=desc,
                unit="step",
                mininterval=0.5,
                dynamic_ncols=True,
                leave=False,
            )

    def update(self, n: int = 1, **postfix) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class BCEOnScores(nn.Module):
    """BCE on column 0 of ``[N, 1]`` logits against integer targets (the ranking losses'
    call signature), so it can be the warm-up loss of ``LossWarmupWrapper``."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits[:, 0], targets.float())


def train_epochs(
    model: nn.Module,
    wrapped: nn.Module,
    opt: torch.optim.Optimizer,
    name: str,
    epochs: range,
    data: Splits,
    args: argparse.Namespace,
    seed: int,
    info: DistInfo,
    ranking: nn.Module | None,
    history: dict,
    progress: Progress,
) -> None:
    """Train ``epochs``: BCE (no ranking loss, or before the end of the warm-up),
    ``ranking + bce_weight * BCE``, or a ``LossWarmupWrapper``'s own schedule."""
    arm = ARMS[name]
    wrapper = isinstance(ranking, LossWarmupWrapper)
    gb = args.batch_size
    lb = gb // info.world_size
    n = len(data.y_train)
    steps = n // gb  # drop the ragged tail so every rank always has an equal slice
    for epoch in epochs:
        wrapped.train()
        if ranking is not None:
            ranking.train()
        if isinstance(ranking, LossWarmupWrapper):
            ranking.on_train_epoch_start(epoch)
        order = epoch_order(n, seed, epoch)
        use_ranking = ranking is not None and not wrapper and epoch >= args.warmup_epochs
        if use_ranking and arm.anneals_per_epoch and args.temperature_final is not None:
            # geometric annealing over the ranking epochs: --temperature -> --temperature-final
            assert isinstance(ranking, RecallAtQuantileLoss)
            k, last = epoch - args.warmup_epochs, args.epochs - args.warmup_epochs - 1
            frac = k / last if last > 0 else 1.0
            ranking.temperature = (
                args.temperature * (args.temperature_final / args.temperature) ** frac
            )
        total = 0.0
        for step in range(steps):
            rows = order[step * gb : (step + 1) * gb][info.rank * lb : (info.rank + 1) * lb]
            xb = data.x_train[rows].to(info.device, non_blocking=True)
            yb = data.y_train[rows].to(info.device, non_blocking=True)
            logits = wrapped(xb)
            bce = F.binary_cross_entropy_with_logits(logits[:, 0], yb.float())
            if use_ranking:
                assert ranking is not None
                weight = arm.bce_weight(args)
                loss = ranking(logits, yb)
                if weight > 0:
                    loss = loss + weight * bce
            elif wrapper:
                assert ranking is not None
                # The wrapper's mix (1 - f) BCE + f RAQ with f = 1 / (1 + bce_weight), scaled
                # by 1 + bce_weight, is the hand-written RAQ + bce_weight * BCE.
                loss = (1 + arm.bce_weight(args)) * ranking(logits, yb)
            else:
                loss = bce
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
            progress.update(1, seed=seed, arm=name, epoch=epoch + 1)
        mean_loss = torch.tensor([total / max(1, steps)], dtype=torch.float64)
        if info.world_size > 1:  # log the global mean (BCE is a per-rank mean)
            mean_loss = mean_loss.to(info.device)
            dist.all_reduce(mean_loss)
            mean_loss /= info.world_size
        val = recall_sharded(model, data.x_val, data.y_val, args.quantile, info)
        test = recall_sharded(model, data.x_test, data.y_test, args.quantile, info)
        history["epoch"].append(epoch + 1)
        history["train_loss"].append(float(mean_loss))
        history["val_recall"].append(val)
        history["test_recall"].append(test)


def wrap(model: nn.Module, info: DistInfo) -> nn.Module:
    if info.world_size == 1:
        return model
    ids = [info.device.index] if info.device.type == "cuda" else None
    return DDP(model, device_ids=ids)


def _recall_loss(args: argparse.Namespace, steps_per_epoch: int) -> nn.Module:
    return RecallAtQuantileLoss(
        num_classes=1,
        quantile=args.quantile,
        queue_size=args.queue_size,
        temperature=args.temperature,
    )


def _smooth_ap_loss(args: argparse.Namespace, steps_per_epoch: int) -> nn.Module:
    return SmoothAPLoss(
        num_classes=1, queue_size=args.sap_queue_size, temperature=args.sap_temperature
    )


def _pauc_loss(args: argparse.Namespace, steps_per_epoch: int) -> nn.Module:
    """Partial AUC over the FPR band ``[--pauc-alpha, --pauc-beta]`` (beta defaults to the
    budget). No ``iid_mask``: the demo draws its batches uniformly from the training split,
    so every row is iid (the loss's default) and the band edges come from all negatives."""
    return PAUCAtBudgetLoss(
        num_classes=1,
        alpha=args.pauc_alpha,
        beta=pauc_beta(args),
        surrogate=args.pauc_surrogate,
        n_knots=args.pauc_n_knots,
        queue_size=args.pauc_queue_size,
        temperature=args.pauc_temperature,
    )


def pauc_beta(args: argparse.Namespace) -> float:
    """The band's upper FPR edge: --pauc-beta, else the alert budget --quantile."""
    return args.quantile if args.pauc_beta is None else args.pauc_beta


def _wrapped_recall_loss(args: argparse.Namespace, steps_per_epoch: int) -> nn.Module:
    """The schedule of arm ``raq``, written with the wrapper: BCE for the warm-up epochs, then
    the fixed mix (1 - f) BCE + f RAQ; temperature constant, or decayed per step to
    --temperature-final over the ranking epochs (arm ``raq`` decays it per epoch)."""
    steps = steps_per_epoch * (args.epochs - args.warmup_epochs)
    return LossWarmupWrapper(
        BCEOnScores(),
        _recall_loss(args, steps_per_epoch),
        warmup_epochs=args.warmup_epochs,
        final_main_weight=1 / (1 + args.bce_weight),
        temp_start=args.temperature,
        temp_end=args.temperature_final or args.temperature,
        temp_decay_steps=max(1, steps - 1),
    )


@dataclass(frozen=True)
class Arm:
    """One recipe the demo compares; every arm but ``bce`` forks from the BCE warm-up."""

    label: str
    # Its tuning knobs: Adam's lr (after the warm-up, for a fork) and the weight of BCE
    # beside the ranking loss.
    lr: Callable[[argparse.Namespace], float]
    bce_weight: Callable[[argparse.Namespace], float]
    # The loss it switches to after the warm-up, from (args, steps per epoch); None: BCE.
    # A LossWarmupWrapper runs the schedule itself; any other loss gets
    # ``loss + bce_weight * BCE`` from the warm-up on.
    ranking_loss: Callable[[argparse.Namespace, int], nn.Module] | None = None
    anneals_per_epoch: bool = False  # --temperature-final, applied by this script per epoch


ARMS = {
    "bce": Arm("BCE alone", lambda a: a.lr, lambda a: 0.0),
    "raq": Arm(
        "BCE warm-up -> RecallAtQuantile",
        lambda a: a.raq_lr,
        lambda a: a.bce_weight,
        _recall_loss,
        anneals_per_epoch=True,
    ),
    "sap": Arm(
        "BCE warm-up -> Smooth-AP", lambda a: a.sap_lr, lambda a: a.sap_bce_weight, _smooth_ap_loss
    ),
    "pauc": Arm(
        "BCE warm-up -> PAUC@budget", lambda a: a.pauc_lr, lambda a: a.pauc_bce_weight, _pauc_loss
    ),
    "raq_wrapped": Arm(
        "RecallAtQuantile via LossWarmupWrapper",
        lambda a: a.raq_lr,
        lambda a: a.bce_weight,
        _wrapped_recall_loss,
    ),
}


def arm_names(args: argparse.Namespace) -> list[str]:
    """``bce`` (the others fork from its warm-up) and the ``--arms`` picked, in table order."""
    return [name for name in ARMS if name == "bce" or name in args.arms]


def _ranking_loss(name: str, args: argparse.Namespace, steps_per_epoch: int) -> nn.Module:
    build = ARMS[name].ranking_loss
    assert build is not None, f"arm {name} has no ranking loss"
    return build(args, steps_per_epoch)


def run_seed(args: argparse.Namespace, seed: int, info: DistInfo) -> dict:
    data = build_splits(args, seed)
    n_feat = data.x_train.shape[1]
    steps_per_epoch = len(data.y_train) // args.batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"--batch-size {args.batch_size} exceeds the {len(data.y_train)} training rows"
        )
    forks = arm_names(args)[1:]
    total_steps = steps_per_epoch * (args.epochs + len(forks) * (args.epochs - args.warmup_epochs))
    progress = Progress(info, total_steps, not args.no_progress, desc=f"seed {seed}")
    empty = lambda: {"epoch": [], "train_loss": [], "val_recall": [], "test_recall": []}  # noqa: E731

    # Arm "bce": BCE for every epoch; its state after the warm-up seeds arm "raq".
    prior = None if args.no_prior_bias else float(data.y_train.float().mean())
    torch.manual_seed(seed)
    model = make_model(n_feat, args.hidden, prior).to(info.device)
    wrapped = wrap(model, info)
    opt = torch.optim.Adam(model.parameters(), lr=ARMS["bce"].lr(args))
    hist_bce = empty()
    # Wall seconds of each arm's training epochs (the shared warm-up counted in bce's).
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    train_epochs(
        model,
        wrapped,
        opt,
        "bce",
        range(args.warmup_epochs),
        data,
        args,
        seed,
        info,
        None,
        hist_bce,
        progress,
    )
    warm_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    train_epochs(
        model,
        wrapped,
        opt,
        "bce",
        range(args.warmup_epochs, args.epochs),
        data,
        args,
        seed,
        info,
        None,
        hist_bce,
        progress,
    )
    seconds["bce"] = time.perf_counter() - started
    models = {"bce": model}

    # The other arms fork from the warm-up weights, with a fresh Adam at their own lr.
    hists = {"bce": hist_bce}
    for arm in forks:
        started = time.perf_counter()
        model_r = make_model(n_feat, args.hidden, prior).to(info.device)
        model_r.load_state_dict(warm_state)
        wrapped_r = wrap(model_r, info)
        opt_r = torch.optim.Adam(model_r.parameters(), lr=ARMS[arm].lr(args))
        hists[arm] = {k: list(v[: args.warmup_epochs]) for k, v in hist_bce.items()}
        train_epochs(
            model_r,
            wrapped_r,
            opt_r,
            arm,
            range(args.warmup_epochs, args.epochs),
            data,
            args,
            seed,
            info,
            _ranking_loss(arm, args, steps_per_epoch).to(info.device),
            hists[arm],
            progress,
        )
        models[arm] = model_r
        seconds[arm] = time.perf_counter() - started
    progress.close()

    result: dict = {
        "seed": int(seed),
        "source": data.source,
        "n_train": len(data.y_train),
        "n_val": len(data.y_val),
        "n_test": len(data.y_test),
        "test_positives": int(data.y_test.sum()),
        "train_positive_rate": float(data.y_train.float().mean()),
        "steps_per_epoch": steps_per_epoch,
        "arms": {},
    }
    for arm, hist in hists.items():
        result["arms"][arm] = {
            "test_recall": hist["test_recall"][-1],
            "val_recall": hist["val_recall"][-1],
            "history": hist,
            "train_seconds": seconds[arm],
        }
    if info.is_main:  # full test scores for the plot, and a cross-check of the DDP metric
        result["_scores"] = {
            arm: scores_of(m, data.x_test, info.device) for arm, m in models.items()
        }
        result["_y_test"] = data.y_test
        for arm in arm_names(args):
            local = float(
                recall_at_quantile(
                    result["_scores"][arm], data.y_test, args.quantile, gather_distributed=False
                )
            )
            reported = result["arms"][arm]["test_recall"]
            if not math.isclose(local, reported, abs_tol=1e-6):
                print(
                    f"[train_alerts] WARNING: sharded recall {reported} != local {local} "
                    f"for arm {arm}",
                    file=sys.stderr,
                )
            # recall_at_quantile counts every row tied with the threshold: a model whose
            # scores collapse onto one value (dead ReLUs) can alert far more rows than the
            # budget and look good. Record how many rows the threshold really alerts.
            s = result["_scores"][arm].double()
            theta = torch.quantile(s, 1 - args.quantile, interpolation="higher")
            alerted = int((s >= theta).sum())
            budget = args.quantile * len(s)
            result["arms"][arm]["alerted_rows"] = alerted
            result["arms"][arm]["budget_rows"] = budget
            if alerted > 1.1 * budget + 2:
                print(
                    f"[train_alerts] WARNING: seed {seed}, arm {arm}: {alerted} test rows tie "
                    f"at or above the threshold for a budget of {budget:.0f}; its recall "
                    "is inflated by ties, not earned by ranking.",
                    file=sys.stderr,
                )
    return result


# --------------------------------------------------------------------------- reporting
def summarise(values: list[float]) -> dict:
    arr = np.asarray(values, dtype=np.float64)
    std = float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
    return {
        "mean": float(arr.mean()),
        "std": std,
        "n": int(len(arr)),
        "min": float(arr.min()),
        "max": float(arr.max()),
    }


def print_table(results: list[dict], summary: dict, args: argparse.Namespace) -> None:
    seeds = [r["seed"] for r in results]
    head = ["arm"] + [f"seed {s}" for s in seeds] + ["mean ± std"]
    rows = []
    names = arm_names(args)
    for arm in names:
        vals = [r["arms"][arm]["test_recall"] for r in results]
        s = summary[arm]
        rows.append(
            [ARMS[arm].label] + [f"{v:.4f}" for v in vals] + [f"{s['mean']:.4f} ± {s['std']:.4f}"]
        )
    wins = {}
    for arm in names[1:]:
        d = summary[f"{arm}_minus_bce"]
        diffs = [r["arms"][arm]["test_recall"] - r["arms"]["bce"]["test_recall"] for r in results]
        wins[arm] = sum(v > 0 for v in diffs)
        rows.append(
            [f"difference ({arm} - bce)"]
            + [f"{v:+.4f}" for v in diffs]
            + [f"{d['mean']:+.4f} ± {d['std']:.4f}"]
        )
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    print(
        f"\nTest recall at the alert budget (top {100 * args.quantile:g}% of held-out scores; "
        f"std = sample std over {len(seeds)} seed(s)):"
    )
    print(line(head))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))
    for arm, count in wins.items():
        print(f"{arm} better than bce on {count}/{len(results)} seed(s)")


def plot(results: list[dict], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = results[0]
    y = first["_y_test"].numpy().astype(bool)
    # One histogram per distinct training (raq_wrapped repeats raq exactly), then the curves.
    names = arm_names(args)
    shown = [arm for arm in names if arm != "raq_wrapped" or "raq" not in names]
    fig, axes = plt.subplots(1, len(shown) + 1, figsize=(5.7 * (len(shown) + 1), 4.8))
    for ax, arm in zip(axes[:-1], shown):
        s = first["_scores"][arm].numpy()
        theta = float(np.quantile(s, 1 - args.quantile, method="higher"))
        bins = np.linspace(np.percentile(s, 0.5), s.max(), 80)
        ax.hist(
            s[~y],
            bins=bins,
            density=True,
            alpha=0.55,
            color="tab:gray",
            label=f"negatives (n={int((~y).sum())})",
        )
        ax.hist(
            s[y],
            bins=bins,
            density=True,
            alpha=0.65,
            color="tab:red",
            label=f"positives (n={int(y.sum())})",
        )
        ax.axvline(
            theta,
            color="black",
            ls="--",
            lw=1.5,
            label=f"alert threshold (top {100 * args.quantile:g}%)",
        )
        rec = first["arms"][arm]["test_recall"]
        ax.set_yscale("log")
        ax.set_title(
            f"{ARMS[arm].label}: test scores, seed {first['seed']}\nrecall at budget = {rec:.3f}"
        )
        ax.set_xlabel("logit")
        ax.set_ylabel("density (log scale)")
        ax.legend(loc="upper left", fontsize=8)
    ax = axes[-1]
    colors = {
        "bce": "tab:blue",
        "raq": "tab:orange",
        "sap": "tab:green",
        "pauc": "tab:purple",
        "raq_wrapped": "black",
    }
    for arm in names:
        curves = np.array([r["arms"][arm]["history"]["test_recall"] for r in results])
        epochs = results[0]["arms"][arm]["history"]["epoch"]
        style = dict(ls=":", lw=1.5) if arm == "raq_wrapped" else dict(lw=2.2)
        if arm != "raq_wrapped":
            for c in curves:
                ax.plot(epochs, c, color=colors[arm], alpha=0.25, lw=1)
        mean, std = curves.mean(0)[-1], curves.std(0, ddof=1)[-1] if len(curves) > 1 else 0.0
        ax.plot(
            epochs,
            curves.mean(0),
            color=colors[arm],
            **style,
            label=f"{ARMS[arm].label}: {mean:.3f} ± {std:.3f}",
        )
    ax.axvline(args.warmup_epochs + 0.5, color="gray", ls=":", lw=1.2, label="end of BCE warm-up")
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"test recall at top {100 * args.quantile:g}%")
    ax.set_title(
        f"recall at the budget over epochs (legend: final\nmean ± std of "
        f"{len(results)} seed(s); thin lines: single seeds)"
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, help="CSV or Parquet file (default: synthetic task)")
    g.add_argument("--label-column", default="label", help="binary label column of --data")
    g.add_argument("--n-samples", type=int, default=200_000, help="synthetic rows")
    g.add_argument("--positive-rate", type=float, default=0.005, help="synthetic positive share")
    g.add_argument(
        "--hard-negative-rate", type=float, default=0.02, help="synthetic share of hard negatives"
    )
    g.add_argument("--n-features", type=int, default=16, help="synthetic features")
    g.add_argument("--val-frac", type=float, default=0.2)
    g.add_argument("--test-frac", type=float, default=0.3)
    g = p.add_argument_group("training")
    g.add_argument("--seed", type=int, default=0, help="single seed (ignored with --seeds)")
    g.add_argument("--seeds", type=int, nargs="+", default=None, help="several seeds")
    g.add_argument("--epochs", type=int, default=12, help="total epochs per arm")
    g.add_argument(
        "--warmup-epochs", type=int, default=4, help="BCE epochs before the ranking loss"
    )
    g.add_argument("--batch-size", type=int, default=2048, help="global batch (all ranks)")
    g.add_argument(
        "--hidden",
        type=int,
        default=0,
        help="hidden units (0: a linear scorer, the default; try 8 to see BCE catch up)",
    )
    g.add_argument(
        "--no-prior-bias",
        action="store_true",
        help="keep PyTorch's default output-bias init instead of the prior log-odds",
    )
    g.add_argument("--lr", type=float, default=3e-3, help="Adam lr for BCE (both arms' warm-up)")
    g.add_argument(
        "--raq-lr", type=float, default=1e-2, help="Adam lr of the ranking arm after the warm-up"
    )
    g = p.add_argument_group("ranking loss")
    g.add_argument(
        "--quantile",
        type=float,
        default=0.01,
        help="alert budget: share of rows alerted; must exceed the positive rate",
    )
    g.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="sigmoid temperature of the ranking loss, in logit units",
    )
    g.add_argument(
        "--temperature-final",
        type=float,
        default=None,
        help="anneal the temperature geometrically to this value over the ranking "
        "epochs (unset: constant temperature)",
    )
    g.add_argument("--queue-size", type=int, default=8192)
    g.add_argument(
        "--bce-weight",
        type=float,
        default=1.0,
        help="blend: loss = RecallAtQuantile + bce_weight * BCE after the warm-up",
    )
    g = p.add_argument_group("Smooth-AP arm")
    g.add_argument(
        "--sap-temperature",
        type=float,
        default=0.3,
        help="sigmoid temperature of SmoothAPLoss, in logit units",
    )
    g.add_argument("--sap-queue-size", type=int, default=8192)
    g.add_argument(
        "--sap-bce-weight",
        type=float,
        default=1.0,
        help="blend: loss = SmoothAP + sap_bce_weight * BCE after the warm-up",
    )
    g.add_argument(
        "--sap-lr", type=float, default=1e-2, help="Adam lr of the Smooth-AP arm after the warm-up"
    )
    g = p.add_argument_group(
        "PAUC arm",
        "PAUCAtBudgetLoss: 1 - the normalised partial AUC over the false-positive-rate "
        "band [alpha, beta], the band edges being quantiles of the pooled negatives' "
        "scores (detached). The budget alerts the top --quantile of ALL rows; some of "
        "those alerts are positives, so the negatives' FPR at the budget threshold is a "
        "little below --quantile (0.86-0.92% after the warm-up on seeds 100-109). The band "
        "[0, --quantile] therefore covers every threshold from the top score down to just "
        "past the budget: the part of the ROC curve an analyst working the alert queue "
        "ever sees. No iid_mask: batches are drawn uniformly, so every row is iid.",
    )
    g.add_argument("--pauc-alpha", type=float, default=0.0, help="lower FPR edge of the band")
    g.add_argument(
        "--pauc-beta",
        type=float,
        default=None,
        help="upper FPR edge of the band; unset: --quantile, the alert budget",
    )
    g.add_argument(
        "--pauc-surrogate",
        choices=("trapezoid", "pairwise"),
        default="pairwise",
        help="pairwise: every positive against every band negative (gradient into both, "
        "like Smooth-AP); trapezoid: soft TPR at --pauc-n-knots FPR levels of the band "
        "(gradient into positives only, like the recall loss). Tuned on seeds 100-109 "
        "(docs/demo.md): pairwise",
    )
    g.add_argument(
        "--pauc-n-knots",
        type=int,
        default=5,
        help="trapezoid only: knots across the band (5: FPR 0, 0.25%%, ..., 1%% at the defaults)",
    )
    g.add_argument(
        "--pauc-temperature",
        type=float,
        default=0.3,
        help="sigmoid width relative to the IQR of the pooled negatives' scores (the "
        "loss's tau_scale='iqr'); that IQR is 0.74-1.14 logits after the warm-up on seeds "
        "100-109, so 0.3 is about Smooth-AP's tuned 0.3 logit. Tuned on seeds 100-109: 0.3",
    )
    g.add_argument("--pauc-queue-size", type=int, default=8192)
    g.add_argument(
        "--pauc-bce-weight",
        type=float,
        default=1.0,
        help="blend: loss = PAUC + pauc_bce_weight * BCE after the warm-up",
    )
    g.add_argument(
        "--pauc-lr", type=float, default=1e-2, help="Adam lr of the PAUC arm after the warm-up"
    )
    g = p.add_argument_group("run")
    g.add_argument("--out", default="results", help="output folder (JSON + PNG)")
    g.add_argument("--cpu", action="store_true", help="force CPU (gloo) even with GPUs")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--no-plot", action="store_true", help="skip the PNG")
    g.add_argument(
        "--arms",
        nargs="+",
        choices=ARMS,
        default=list(ARMS),
        help="arms to run (bce always runs: the others fork from its warm-up)",
    )
    args = p.parse_args(argv)
    if not 0 <= args.warmup_epochs < args.epochs:
        p.error(f"--warmup-epochs must be in [0, --epochs), got {args.warmup_epochs}")
    if args.bce_weight < 0 or args.sap_bce_weight < 0 or args.pauc_bce_weight < 0:
        p.error("--bce-weight, --sap-bce-weight and --pauc-bce-weight must be >= 0")
    if not 0.0 < args.quantile < 1.0:
        p.error(f"--quantile must be in (0, 1), got {args.quantile}")
    beta = pauc_beta(args)
    if not 0.0 <= args.pauc_alpha < beta <= 1.0:
        p.error(
            f"--pauc-alpha and --pauc-beta must satisfy 0 <= alpha < beta <= 1, got "
            f"alpha={args.pauc_alpha}, beta={beta}"
        )
    if args.pauc_n_knots < 2:
        p.error(f"--pauc-n-knots must be >= 2, got {args.pauc_n_knots}")
    for name in ("temperature", "temperature_final", "sap_temperature", "pauc_temperature"):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            p.error(f"--{name.replace('_', '-')} must be a finite number > 0, got {value}")
    return args


def _barrier() -> None:
    """Let every rank reach the end before any tears the process group down."""
    if dist.is_initialized():
        dist.barrier()


def _exit_without_teardown() -> None:
    """End a distributed run without CPython's interpreter teardown.

    A gloo worker thread can still be freeing the last collective's tensors when the
    main thread starts finalising the interpreter; freeing a tensor that Python has
    dropped needs the GIL, and CPython 3.11 kills a thread that asks for the GIL during
    finalisation, through a noexcept destructor, so the rank dies with "terminate called
    without an active exception" (SIGABRT) after printing correct results. Seen in CI
    and in 1 of 16 loaded local launches even with a barrier first (core dump: the
    gloo ``runLoop`` destroying an ``AsyncBarrierWork``). ``destroy_process_group``
    does not join those threads here: DDP's parameter check keeps the group alive.
    Everything this script writes is closed before this point, so skip the teardown,
    as ``imbalanced_losses.testing`` does for its ranks.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    t0 = time.perf_counter()
    info = setup_distributed(args.cpu)
    try:
        log(
            info,
            f"[train_alerts] world_size={info.world_size} backend={info.backend} "
            f"device={info.device.type} threads_per_rank={torch.get_num_threads()} "
            f"torch={torch.__version__}",
        )
        if args.batch_size % info.world_size:
            raise ValueError(
                f"--batch-size {args.batch_size} must be divisible by the world "
                f"size {info.world_size}"
            )
        seeds, names = args.seeds or [args.seed], arm_names(args)
        results = []
        for seed in seeds:
            ts = time.perf_counter()
            res = run_seed(args, seed, info)
            results.append(res)
            log(
                info,
                f"[train_alerts] seed {seed}: "
                + ", ".join(f"{a}={res['arms'][a]['test_recall']:.4f}" for a in names)
                + f"  ({time.perf_counter() - ts:.1f}s; {res['test_positives']} test "
                f"positives, train positive rate {res['train_positive_rate']:.4%})",
            )
            if res["train_positive_rate"] >= args.quantile:
                log(
                    info,
                    f"[train_alerts] WARNING: --quantile {args.quantile} does not exceed "
                    f"the positive rate {res['train_positive_rate']:.4f}: even a perfect "
                    "model leaves positives below the threshold.",
                )
        if not info.is_main:
            _barrier()  # wait for rank 0's report, see below
            return None
        summary = {
            arm: summarise([r["arms"][arm]["test_recall"] for r in results]) for arm in names
        }
        for arm in names[1:]:
            summary[f"{arm}_minus_bce"] = summarise(
                [r["arms"][arm]["test_recall"] - r["arms"]["bce"]["test_recall"] for r in results]
            )
        print_table(results, summary, args)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        png = out / "train_alerts.png"
        if not args.no_plot:
            plot(results, args, png)
        elapsed = time.perf_counter() - t0
        report = {
            "world_size": info.world_size,
            "backend": info.backend,
            "device": info.device.type,
            "torch": torch.__version__,
            "seconds": elapsed,
            "command": " ".join(sys.argv),
            "config": {
                **vars(args),
                "seeds": seeds,
                "arms": names,
                "steps_per_epoch": results[0]["steps_per_epoch"],
            },
            "metric": f"recall_at_quantile(test scores, quantile={args.quantile}) "
            "at the final epoch",
            "summary": summary,
            "seeds": [{k: v for k, v in r.items() if not k.startswith("_")} for r in results],
            "png": None if args.no_plot else str(png),
        }
        (out / "train_alerts.json").write_text(json.dumps(report, indent=2))
        print(
            f"[train_alerts] wrote {out / 'train_alerts.json'}"
            + ("" if args.no_plot else f" and {png}")
            + f" in {elapsed:.1f}s"
        )
        _barrier()
        return report
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _exit_without_teardown()
