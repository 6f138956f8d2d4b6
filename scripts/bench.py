"""Speed and memory of RecallAtQuantileLoss against the in-repo plain reference.

Every speed case times forward + backward (float32) of the library loss and of the reference
implementation (``imbalanced_losses.testing.reference``: a Python loop over classes, boolean
indexing, ``torch.quantile`` per class) *in the same run, interleaved* (ours, reference,
reference, ours, ...), after warm-up calls, and reports medians. Both start from the same
pre-filled queue and see the same batches; their losses are compared as a sanity check.

Cases (``--cases`` picks a subset). The targets are set for the full sizes; ``--quick``
shrinks the sizes for a smoke test and then judges only the targets that do not depend on
size (memory ratios, collective counts), showing the speed targets as "n/a (full sizes)".

* ``c16_q64k``   C=16,  batch 4096,  queue 65536 (pre-filled)   target: >= 10x faster
* ``c100_q64k``  C=100, batch 8192,  queue 65536 (pre-filled)   target: >= 4x faster; peak
  extra memory <= 2x the pooled scores (the top-k path of the threshold, quantile 0.005)
* ``c100_q64k_q03`` the same at quantile 0.3 (the k-th value path)   target: peak extra
  memory <= 2x the pooled scores; speed shown, no target
* ``c10k_q16k``  C=10,000, batch 1024, queue 16384, quantile 0.3   target: peak extra memory
  <= 2x the pooled scores. The reference's backward costs O(C^2 * batch) here (each class's
  column gradient is a dense [batch, C] tensor), so it runs once in a subprocess with a time
  limit; when it runs out, the table shows the limit as a lower bound.
* ``c1000_q16k_rss`` C=1,000, batch 1024, queue 16384, quantile 0.3 (the k-th value path): a
  fresh process (default malloc, what a user's process gets) builds the loss, trains on fresh
  batches until the queue is full, then takes one more step.   target: peak RSS growth <= 2x
  the pooled scores, queue included (baseline after one tiny warm-up step of another loss:
  torch's one-time start-up is not the loss's). Its growth depends on size, so ``--quick``
  runs it at full size.
* ``c1_1m``      C=1,   batch 1,000,000, no queue               target: no slower
* ``c1_20m``     C=1,   20,000,000 rows in one call, no queue   target: runs (the reference
  raises past 2**24 rows: shown) with peak extra memory <= 4x the logits' bytes.
* ``ddp_gloo_2`` 2 gloo ranks (FileStore rendezvous in a temp dir, via
  ``imbalanced_losses.testing.run_ranks``), uneven per-rank batches: every public collective
  of ``torch.distributed`` is wrapped with a counter in each rank; counts per forward and per
  backward, steady state = every step after the first.   target: <= 2 per forward, 0 in backward
* ``ddp_traffic`` (not in the default set; about 2 min) bytes received per rank per step, the
  gathered mode against ``sharded=True`` (when this checkout has it), counted at the collective
  calls (``imbalanced_losses._distributed.traffic()``), for W = 1, 2, 4 gloo ranks x N = 512
  and 4,096 rows per rank x C = 3 and 100, a ``Linear`` model under DDP, queue = one global
  batch; forward and backward separately, and the median step time.   target: gathered row
  bytes grow as W x N (bytes per gathered row constant), sharded bytes flat in N and their
  statistics flat in W (judged on exact byte ratios, never on times).
* ``c100_pool1m`` (not in the default set; for ``--device cuda``) C=100, batch 8192 + queue
  991,808 = a 1,000,000-row pool.
* Host syncs (``c16_q64k``, ``c10k_q16k``): after the timed calls, one more steady-state step
  of ours runs under ``imbalanced_losses.testing.SyncCounter``, which counts the ops that
  would make the host wait for a CUDA device (on any build, CPU included).   target: <= 2 per
  forward, 0 in backward. The count does not depend on size, so ``--quick`` judges it.
* ``sap_1m`` (not in the default set) ``SmoothAPLoss``, binary, 1,000,000 rows with 5,000
  positives, peak extra memory (fresh process, default malloc) target < 1 GiB; and ours beside
  the plain full-matrix Smooth-AP of the tests (float32) at 100,000 rows / 500 positives.
* ``pauc_pair_1m`` / ``pauc_trap_1m`` (not in the default set) ``PAUCAtBudgetLoss``, binary,
  pairwise / trapezoid surrogate, FPR band [0, 0.1] (so the pairwise band holds ~10% of the
  negatives), 10% of the rows not iid (shifted up, as densified rows): speed against the
  plain reference of the tests (``PlainPAUCLoss`` in float32: a Python loop,
  ``torch.quantile``, the dense ``[positives, band]`` matrix) at 100,000 rows / 500
  positives, interleaved in one fresh
  process, medians; and our peak extra memory (fresh process, default malloc) on a
  1,000,000-row pool with 5,000 positives, where the dense pair matrix alone would take
  ~1.9 GiB.   target: < 1 GiB (tiles: memory linear in the pool); speed shown, no target.

Peak extra memory is measured in a fresh subprocess: the kernel's peak-RSS counter
(``VmHWM``) is reset through ``/proc/self/clear_refs`` right after the inputs exist, and the
RSS at that moment is subtracted from the peak after forward + backward. It therefore counts
everything the call allocates, the logits' gradient included ("pooled scores" = (batch +
queue) * C float32 values; the queue itself already exists and is not counted).

Usage::

    python scripts/bench.py                     # all default cases, results/bench.json
    python scripts/bench.py --quick --json /tmp/b.json
    python scripts/bench.py --cases c16_q64k,ddp_gloo_2 --repeats 7 --threads 2
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from imbalanced_losses import RecallAtQuantileLoss
from imbalanced_losses.testing import SyncCounter
from imbalanced_losses.testing.reference import ReferenceRecallAtQuantileLoss

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUANTILE = 0.005  # the library default
BINARY_POS_RATE = 0.002  # below the quantile, as the loss's rule of use asks
TORCH_QUANTILE_LIMIT = 2**24
# Every allocation >= 64 KiB its own mmap, returned when freed: RSS follows live memory.
MMAP_EVERY_BLOCK = {"MALLOC_MMAP_THRESHOLD_": "65536"}

SCRIPTS = os.path.dirname(os.path.abspath(__file__))


@dataclass(frozen=True)
class Case:
    """One benchmark case: its sizes, its targets, how it is measured and shown."""

    name: str
    measure: Callable[[Case, argparse.Namespace], dict[str, Any]]
    rows: Callable[[str, dict[str, Any]], list[list[str]]]
    full: tuple[int, ...]
    quick: tuple[int, ...]
    num_classes: int = 1
    quantile: float = QUANTILE
    speedup: float | None = None  # ours / reference, judged at full sizes only
    max_syncs: tuple[int, int] | None = None  # host syncs (per forward, in backward)
    max_collectives: tuple[int, int] | None = None  # (per forward, in backward)
    max_extra: float | None = None  # the memory limit, in the unit its target names
    reference_limit_s: tuple[float, float] | None = None  # (full, quick): one call, stopped
    repeats: int | None = None  # caps --repeats
    warmup: int | None = None  # caps --warmup
    side_by_side: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))  # (full, quick)
    default: bool = True  # in the default --cases
    cpu_only: bool = True

    def sizes(self, quick: bool) -> tuple[int, ...]:
        return self.quick if quick else self.full


def run_child(
    function: str, *args: Any, timeout: float = 1800, env: dict[str, str] | None = None
) -> Any:
    """``bench.<function>(*args)`` in a fresh process (same torch threads): its JSON result."""
    code = (
        f"import sys, json; sys.path.insert(0, {SCRIPTS!r}); import torch; "
        f"torch.set_num_threads({torch.get_num_threads()}); import bench; "
        f"print(json.dumps(bench.{function}(*json.loads(sys.argv[1]))))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{function} failed in its subprocess:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- machine
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str) -> dict[str, Any]:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
    }
    if hasattr(os, "getloadavg"):
        info["load_avg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


# --------------------------------------------------------------------------- inputs
def make_batch(gen: torch.Generator, n: int, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.randn(n, num_classes, generator=gen)
    if num_classes == 1:
        targets = (torch.rand(n, generator=gen) < BINARY_POS_RATE).long()
    else:
        targets = torch.randint(0, num_classes, (n,), generator=gen)
    return logits, targets


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def step(
    fn: Callable[..., torch.Tensor], logits: torch.Tensor, targets: torch.Tensor, device: str
) -> tuple[float, float]:
    """One timed forward + backward from a fresh leaf; returns (seconds, loss)."""
    x = logits.detach().clone().requires_grad_(True)
    sync(device)
    start = time.perf_counter()
    loss = fn(x, targets)
    loss.backward()
    sync(device)
    elapsed = time.perf_counter() - start
    return elapsed, float(loss.detach())


# --------------------------------------------------------------------------- speed cases
def speed_inputs(
    num_classes: int, quantile: float, batch: int, queue: int, device: str
) -> tuple[RecallAtQuantileLoss, ReferenceRecallAtQuantileLoss, list[tuple[torch.Tensor, ...]]]:
    """Both losses with the same pre-filled queue, and four batches (the same in every process)."""
    gen = torch.Generator().manual_seed(1234)
    ours = RecallAtQuantileLoss(num_classes, quantile=quantile, queue_size=queue).to(device)
    ref = ReferenceRecallAtQuantileLoss(num_classes, quantile=quantile, queue_size=queue)
    if queue:
        # Pre-fill both queues with the same rows (the reference keeps its queue where it is
        # told: move its buffers to the device as well).
        q_scores, q_targets = make_batch(gen, queue, num_classes)
        ref.queue.to(device)
        ones = torch.ones(queue, device=device)
        ours.queue.push(q_scores.to(device), q_targets.to(device), ones)
        ref.queue.push(q_scores.to(device), q_targets.to(device), ones)
    batches = [tuple(t.to(device) for t in make_batch(gen, batch, num_classes)) for _ in range(4)]
    return ours, ref, batches


def reference_child(num_classes: int, quantile: float, batch: int, queue: int) -> dict[str, Any]:
    """Runs in a subprocess: one reference forward + backward on the case's first batch."""
    _, ref, batches = speed_inputs(num_classes, quantile, batch, queue, "cpu")
    seconds, loss = step(ref, *batches[0], "cpu")
    return {"ms": seconds * 1e3, "loss": loss}


def run_speed_case(case: Case, args: argparse.Namespace) -> dict[str, Any]:
    batch, queue = case.sizes(args.quick)
    num_classes, quantile, device = case.num_classes, case.quantile, args.device
    repeats = min(args.repeats, case.repeats or args.repeats)
    ours, ref, batches = speed_inputs(num_classes, quantile, batch, queue, device)
    module = ours
    if device != "cpu":
        # The reference builds default weights on the CPU; on another device give both losses
        # the same all-ones sample_weight (same math, same work on both sides).
        weights = torch.ones(batch, device=device)
        ours_fn, ref_fn = ours, ref
        ours = functools.partial(ours_fn, sample_weight=weights)  # type: ignore[assignment]
        ref = functools.partial(ref_fn, sample_weight=weights)  # type: ignore[assignment]

    times: dict[str, list[float]] = {"ours": [], "reference": []}
    reference_at_least_ms = None
    _, loss_ours = step(ours, *batches[0], device)
    if case.reference_limit_s is not None:
        # Too slow to interleave: one call in a subprocess, from the same state and batch,
        # stopped after the limit (then a lower bound).
        limit = case.reference_limit_s[1 if args.quick else 0]
        try:
            once = run_child("reference_child", num_classes, quantile, batch, queue, timeout=limit)
            loss_ref = once["loss"]
            times["reference"].append(once["ms"] / 1e3)
        except subprocess.TimeoutExpired:
            loss_ref, reference_at_least_ms = None, limit * 1e3
        warmup = args.warmup if case.warmup is None else min(args.warmup, case.warmup)
        for b in batches[1 : 1 + warmup]:
            step(ours, *b, device)
        for i in range(repeats):
            times["ours"].append(step(ours, *batches[i % len(batches)], device)[0])
    else:
        # Sanity: same state, same batch -> same loss (float32, different summation order).
        _, loss_ref = step(ref, *batches[0], device)
        # Warm-up (allocator, thread pool, first-call paths); both queues keep moving in step.
        for b in batches[1 : 1 + args.warmup]:
            step(ours, *b, device)
            step(ref, *b, device)
        # Adapt the reference's repeats when one call is very slow (kept >= 3 for a median).
        ref_repeats = repeats
        if not args.quick:
            probe, _ = step(ref, *batches[-1], device)
            if probe * repeats > args.slow_budget_s:
                ref_repeats = max(3, min(repeats, int(args.slow_budget_s / probe)))
        order = [("ours", ours), ("reference", ref)]
        for i in range(max(repeats, ref_repeats)):
            b = batches[i % len(batches)]
            for label, fn in order if i % 2 == 0 else order[::-1]:  # ABBA: drift hits both
                if label == "reference" and i >= ref_repeats:
                    continue
                if label == "ours" and i >= repeats:
                    continue
                times[label].append(step(fn, *b, device)[0])
    med_ours = statistics.median(times["ours"]) * 1e3
    med_ref = statistics.median(times["reference"]) * 1e3 if times["reference"] else None
    speedup = (med_ref if med_ref is not None else reference_at_least_ms) / med_ours
    result = {
        "kind": "speed",
        "num_classes": num_classes,
        "batch": batch,
        "queue": queue,
        "pool_rows": batch + queue,
        "quantile": quantile,
        "device": device,
        "repeats": {"ours": len(times["ours"]), "reference": len(times["reference"])},
        "ours_ms": [round(t * 1e3, 3) for t in times["ours"]],
        "reference_ms": [round(t * 1e3, 3) for t in times["reference"]],
        "ours_median_ms": med_ours,
        "reference_median_ms": med_ref,
        "reference_at_least_ms": reference_at_least_ms,
        "speedup": speedup,
        "speedup_is_lower_bound": med_ref is None,
        "loss_ours": loss_ours,
        "loss_reference": loss_ref,
        "loss_abs_diff": None if loss_ref is None else abs(loss_ours - loss_ref),
    }
    targets, met = [], []
    if case.speedup is not None:
        target = case.speedup
        targets.append("no slower than baseline" if target == 1.0 else f">= {target:g}x faster")
        met.append(None if args.quick else bool(speedup >= target))
    if case.max_syncs is not None:
        forward, backward = count_host_syncs(module, batches[-1], device)
        result.update(host_syncs_per_forward=forward, host_syncs_per_backward=backward)
        max_forward, max_backward = case.max_syncs
        targets.append(f"<= {max_forward} host syncs/forward, {max_backward} in backward")
        met.append(
            bool(sum(forward.values()) <= max_forward and sum(backward.values()) <= max_backward)
        )
    if case.max_extra is not None and device == "cpu":
        memory = run_child(
            "pool_memory_child", num_classes, quantile, batch, queue, 2, env=MMAP_EVERY_BLOCK
        )
        memory["peak_extra_over_pool"] = max(memory["peak_extra_mb"]) / memory["pool_mb"]
        result.update(memory)
        targets.append(f"peak extra <= {case.max_extra:g}x pooled scores")
        met.append(bool(memory["peak_extra_over_pool"] <= case.max_extra))
    result["target"] = "; ".join(targets) or "informational"
    judged = [m for m in met if m is not None]
    result["met"] = all(judged) if judged else None
    result["not_judged"] = "speed: n/a at --quick sizes" if None in met else None
    return result


def count_host_syncs(
    loss_fn: RecallAtQuantileLoss, batch: tuple[torch.Tensor, ...], device: str
) -> tuple[dict[str, int], dict[str, int]]:
    """Ops that would block the host on CUDA in one steady-state forward and its backward."""
    logits = batch[0].detach().clone().requires_grad_(True)
    targets = batch[1]
    weights = torch.ones(targets.shape[0], device=device)  # the timed calls' code path
    buffers = list(loss_fn.buffers())
    kwargs = {} if device == "cpu" else {"sample_weight": weights}
    with SyncCounter(logits, targets, weights, *buffers) as forward:
        loss = loss_fn(logits, targets, **kwargs)
    with SyncCounter(loss, *buffers) as backward:
        loss.backward()
    return dict(forward.counts), dict(backward.counts)


# --------------------------------------------------------------------------- memory case
def _rss_mb() -> tuple[float, float]:
    """(current RSS, peak RSS since the last reset) in MiB, from /proc/self/status."""
    with open("/proc/self/status") as f:
        status = f.read()
    rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]
    hwm = int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]
    return rss, hwm


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def _timed_peak_calls(
    loss_fn: Any, logits: torch.Tensor, targets: torch.Tensor, repeats: int
) -> tuple[list[float], list[float], float]:
    """Seconds and peak extra RSS (MiB) of each forward+backward, and the last loss value."""
    import gc

    times, extras, value = [], [], float("nan")
    for _ in range(repeats):
        logits.grad = None
        gc.collect()
        _reset_peak()
        rss0, _ = _rss_mb()
        start = time.perf_counter()
        loss = loss_fn(logits, targets)
        loss.backward()
        times.append(time.perf_counter() - start)
        extras.append(_rss_mb()[1] - rss0)
        value = float(loss.detach())
        del loss
    return times, extras, value


def memory_child(rows: int, repeats: int) -> dict[str, Any]:
    """Runs in a fresh process: peak extra memory of ours; the reference's failure."""
    import gc

    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(rows, 1, generator=gen)
    targets = (torch.rand(rows, generator=gen) < BINARY_POS_RATE).long()
    logits.requires_grad_(True)
    logits_mb = logits.numel() * logits.element_size() / 2**20
    ours = RecallAtQuantileLoss(1, quantile=QUANTILE, queue_size=0)
    gc.collect()
    times, extras, loss_value = _timed_peak_calls(ours, logits, targets, repeats)
    logits.grad = None
    gc.collect()
    ref_rows = max(rows, TORCH_QUANTILE_LIMIT + 4096)
    if ref_rows != rows:  # --quick: cheap inputs just past torch.quantile's limit
        logits = torch.zeros(ref_rows, 1, requires_grad=True)
        targets = torch.zeros(ref_rows, dtype=torch.long)
        targets[::500] = 1
    ref_error: str | None = None
    try:
        ReferenceRecallAtQuantileLoss(1, quantile=QUANTILE, queue_size=0)(logits, targets)
    except Exception as exc:  # the point: torch.quantile refuses > 2**24 elements
        ref_error = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    return {
        "rows": rows,
        "logits_mb": logits_mb,
        "targets_dtype": str(targets.dtype),
        "ours_ms": [round(t * 1e3, 3) for t in times],
        "peak_extra_mb": extras,
        "loss": loss_value,
        "reference_rows": ref_rows,
        "reference_error": ref_error,
        "method": (
            "fresh subprocess with MALLOC_MMAP_THRESHOLD_=65536 (every allocation >= 64 KiB "
            "is its own mmap, returned to the OS when freed, so RSS follows live memory); "
            "VmHWM (kernel peak RSS) reset via /proc/self/clear_refs after the "
            "inputs (float32 logits requiring grad, int64 targets) are allocated; "
            "peak extra = VmHWM after forward+backward - VmRSS before it (logits.grad included); "
            "max over calls"
        ),
    }


def pool_memory_child(
    num_classes: int, quantile: float, batch: int, queue: int, calls: int
) -> dict[str, Any]:
    """Runs in a fresh process: peak extra memory of ours on a speed case's pool."""
    import gc

    ours, _, batches = speed_inputs(num_classes, quantile, batch, queue, "cpu")
    pool_mb = (batch + queue) * num_classes * 4 / 2**20
    extras = []
    for i in range(calls):
        logits, targets = batches[i % len(batches)]
        logits = logits.clone().requires_grad_(True)
        gc.collect()
        _reset_peak()
        rss0, _ = _rss_mb()
        ours(logits, targets).backward()
        _, peak = _rss_mb()
        extras.append(peak - rss0)
        del logits
    return {"pool_mb": pool_mb, "peak_extra_mb": extras}


def rss_child(num_classes: int, quantile: float, batch: int, queue: int) -> dict[str, Any]:
    """Runs in a fresh process: resident-memory growth of filling the queue and one more step.

    A user's process: the loss is built (its queue included), trained on fresh batches until
    the queue is full, then takes one more step; default malloc. The baseline is taken after
    one tiny warm-up step of another loss, so torch's one-time start-up is not counted.
    """
    import gc

    warnings.filterwarnings("ignore", message=".*positives make up")
    tiny = RecallAtQuantileLoss(2, quantile=quantile, queue_size=8)
    tiny(torch.randn(16, 2, requires_grad=True), torch.arange(16) % 2).backward()
    del tiny
    gc.collect()
    start_up_mb = _rss_mb()[0]
    _reset_peak()
    rss0, _ = _rss_mb()
    loss_fn = RecallAtQuantileLoss(num_classes, quantile=quantile, queue_size=queue)
    gen = torch.Generator().manual_seed(5)
    marks = {}
    # The kernel's high-water mark can forget a peak (a heap shrunk by brk does not update
    # it), so the peak is the largest mark read after any step, the last one included.
    peak = rss0
    for _ in range(-(-queue // batch) + 1):
        logits, targets = make_batch(gen, batch, num_classes)
        start = time.perf_counter()
        loss_fn(logits.requires_grad_(True), targets).backward()
        seconds = time.perf_counter() - start
        peak = max(peak, _rss_mb()[1])
        if loss_fn.queue.count == queue and "queue_full_mb" not in marks:
            marks["queue_full_mb"] = peak - rss0
    rss, last_mark = _rss_mb()
    peak = max(peak, last_mark)
    return {
        "pool_mb": (batch + queue) * num_classes * 4 / 2**20,
        "queue_mb": queue * num_classes * 4 / 2**20,
        "peak_growth_mb": peak - rss0,
        "final_growth_mb": rss - rss0,
        "start_up_rss_mb": start_up_mb,
        "last_step_ms": seconds * 1e3,
        **marks,
    }


def run_rss_case(case: Case, args: argparse.Namespace) -> dict[str, Any]:
    """Peak RSS growth of a fresh process (default malloc) that fills the queue and steps."""
    batch, queue = case.sizes(args.quick)
    child = run_child("rss_child", case.num_classes, case.quantile, batch, queue)
    ratio = child["peak_growth_mb"] / child["pool_mb"]
    return {
        "kind": "rss",
        "num_classes": case.num_classes,
        "quantile": case.quantile,
        "batch": batch,
        "queue": queue,
        **child,
        "peak_growth_over_pool": ratio,
        "ours_median_ms": child["last_step_ms"],
        "reference_median_ms": None,
        "method": (
            "fresh subprocess, default malloc (what a user's process gets); baseline RSS after "
            "one tiny warm-up step of another loss; the loss is built, trained on fresh batches "
            "until its queue is full, then one more step; growth = VmHWM - baseline, queue "
            "included; pooled scores = (batch + queue) * C float32"
        ),
        "target": f"peak RSS growth <= {case.max_extra:g}x pooled scores (queue included)",
        "met": bool(case.max_extra is not None and ratio <= case.max_extra),
    }


def run_memory_case(case: Case, args: argparse.Namespace) -> dict[str, Any]:
    (rows,) = case.sizes(args.quick)
    repeats = 1 if args.quick else min(args.repeats, 3)
    try:
        child = run_child("memory_child", rows, repeats, env=MMAP_EVERY_BLOCK)
    except RuntimeError as exc:
        return {
            "kind": "memory",
            "rows": rows,
            "error": str(exc),
            "met": False,
            "target": f"runs with peak extra <= {case.max_extra:g}x logits",
        }
    peak = max(child["peak_extra_mb"])
    ratio = peak / child["logits_mb"]
    limit = case.max_extra
    assert limit is not None
    ref_raised = child["reference_error"] is not None
    return {
        "kind": "memory",
        "num_classes": 1,
        **child,
        "ours_median_ms": statistics.median(child["ours_ms"]),
        "reference_median_ms": None,
        "reference_raises": ref_raised,
        "peak_extra_over_logits": ratio,
        "target": f"runs; reference raises past 2^24 rows; peak extra <= {limit:g}x logits",
        # The ratio is set for 20M rows: at --quick's 1M, fixed-size scratch dominates it.
        "met": bool(ref_raised and (args.quick or ratio <= limit)),
        "not_judged": "memory ratio: n/a at --quick sizes" if args.quick else None,
    }


# --------------------------------------------------------------------------- DDP case
_COLLECTIVES = (
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "_all_gather_base",
    "all_reduce",
    "all_reduce_coalesced",
    "broadcast",
    "broadcast_object_list",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "_reduce_scatter_base",
    "all_to_all",
    "all_to_all_single",
    "gather",
    "gather_object",
    "scatter",
    "scatter_object_list",
    "barrier",
    "monitored_barrier",
    "send",
    "recv",
    "isend",
    "irecv",
    "batch_isend_irecv",
)


def _install_counters() -> list[str]:
    """Wrap every public collective in torch.distributed (and distributed_c10d) with a log."""
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    log: list[str] = []
    depth = [0]
    originals: dict[str, Callable[..., Any]] = {}
    for name in _COLLECTIVES:
        original = getattr(c10d, name, None) or getattr(dist, name, None)
        if original is None:
            continue
        originals[name] = original

        def wrapper(
            *a: Any, __name: str = name, __fn: Callable[..., Any] = original, **k: Any
        ) -> Any:
            if depth[0] == 0:  # count the outermost call only (e.g. *_object -> all_gather)
                log.append(__name)
            depth[0] += 1
            try:
                return __fn(*a, **k)
            finally:
                depth[0] -= 1

        functools.update_wrapper(wrapper, original)
        for module in (dist, c10d):
            if hasattr(module, name):
                setattr(module, name, wrapper)
    return log


def ddp_rank(
    rank: int, num_classes: int, sizes: tuple[int, int], queue: int, steps: int
) -> dict[str, Any]:
    """One rank: uneven batches, counted collectives in forward and in backward."""
    log = _install_counters()
    loss_fn = RecallAtQuantileLoss(num_classes, quantile=QUANTILE, queue_size=queue)
    gen = torch.Generator().manual_seed(100 + rank)
    per_step = []
    for i in range(steps):
        n = sizes[rank] if i % 3 != 2 else (0 if rank == 1 else sizes[rank])  # one empty rank
        logits, targets = make_batch(gen, n, num_classes)
        x = logits.requires_grad_(True)
        del log[:]
        start = time.perf_counter()
        loss = loss_fn(x, targets)
        forward = list(log)
        del log[:]
        loss.backward()
        elapsed = time.perf_counter() - start
        per_step.append(
            {
                "batch": n,
                "forward": forward,
                "backward": list(log),
                "ms": elapsed * 1e3,
                "loss": float(loss.detach()),
            }
        )
    return {"rank": rank, "steps": per_step}


def run_ddp_case(case: Case, args: argparse.Namespace) -> dict[str, Any]:
    from imbalanced_losses.testing import run_ranks

    size0, size1, queue, steps = case.sizes(args.quick)
    assert case.max_collectives is not None
    max_forward, max_backward = case.max_collectives
    results = run_ranks(
        ddp_rank,
        2,
        backend="gloo",
        timeout_s=300.0,
        args=(case.num_classes, (size0, size1), queue, steps),
        threads_per_rank=max(1, torch.get_num_threads() // 2),
    )
    steady = [s for r in results for s in r["steps"][1:]]
    fwd = max(len(s["forward"]) for s in steady)
    bwd = max(len(s["backward"]) for s in steady)
    first = max(len(r["steps"][0]["forward"]) for r in results)
    same_loss = all(
        results[0]["steps"][i]["loss"] == results[1]["steps"][i]["loss"] for i in range(steps)
    ) or all(results[0]["steps"][i]["loss"] != results[0]["steps"][i]["loss"] for i in range(steps))
    ms = [s["ms"] for s in steady]
    return {
        "kind": "ddp",
        "backend": "gloo",
        "world_size": 2,
        "num_classes": case.num_classes,
        "per_rank_batch": [size0, size1],
        "queue": queue,
        "steps": steps,
        "collectives_per_forward_steady_max": fwd,
        "collectives_per_backward_steady_max": bwd,
        "collectives_first_forward": first,
        "collective_names_steady": sorted(
            {c for s in steady for c in s["forward"] + s["backward"]}
        ),
        "loss_identical_on_ranks": same_loss,
        "ours_median_ms": statistics.median(ms),
        "reference_median_ms": None,
        "per_rank": results,
        "method": (
            "2 spawned gloo ranks (FileStore rendezvous in a temp dir); each rank wraps every "
            "public torch.distributed collective with a counter (outermost call only); "
            "every 3rd step rank 1 has an empty batch; steady state = steps after the first"
        ),
        "target": (f"<= {max_forward} collectives/forward, {max_backward} in backward"),
        "met": bool(fwd <= max_forward and bwd <= max_backward),
    }


# --------------------------------------------------------------------------- DDP traffic case
# Bytes each rank receives per training step, gathered mode against sharded mode, counted at
# the collective calls of ``imbalanced_losses._distributed`` (its ``Traffic`` counter).
TRAFFIC_STEPS = 6  # per configuration; the first two fill the queue and warm up
TRAFFIC_STEADY_FROM = 2  # steps from here on are measured (queue full: pool = 2 global batches)
TRAFFIC_FEATURES = 16
TRAFFIC_PROJECTED_WORLDS = (64, 256, 1024)


@dataclass(frozen=True)
class TrafficLoss:
    """A loss the traffic case measures, and the labels it is fed.

    ``positive_rate`` None: classes uniform over ``C`` (every row is some class's positive);
    otherwise binary (``C == 1``) with exactly ``max(1, round(rate * N))`` positives per rank
    and step,
    so that the bytes of a mode that gathers positives are the same every step.
    ``sharded_grows``: what the sharded mode's bytes may grow with ("nothing": flat in N and
    W; "positives": the global positive count).
    """

    name: str
    classes: tuple[int, ...]
    positive_rate: float | None = None
    sharded_grows: str = "nothing"

    def build(self, num_classes: int, queue: int, sharded: bool) -> torch.nn.Module:
        extra = {"sharded": True} if sharded else {}
        if self.name == "recall":
            return RecallAtQuantileLoss(num_classes, quantile=QUANTILE, queue_size=queue, **extra)
        from imbalanced_losses import SmoothAPLoss

        return SmoothAPLoss(num_classes, queue_size=queue, **extra)

    def labels(self, gen: torch.Generator, n: int, num_classes: int) -> torch.Tensor:
        if self.positive_rate is None:
            return torch.randint(0, num_classes, (n,), generator=gen)
        labels = torch.zeros(n, dtype=torch.long)
        labels[torch.randperm(n, generator=gen)[: self.positives(n)]] = 1
        return labels

    def positives(self, n: int) -> int:
        """Positives per rank and step in the binary case (at least one)."""
        return max(1, round((self.positive_rate or 0.0) * n))

    def sharded_units(self, n: int) -> int:
        """What the sharded mode's bytes may grow with, per rank: rows or positives."""
        return self.positives(n) if self.sharded_grows == "positives" else n

    def sharded_available(self) -> bool:
        """Whether this checkout's loss accepts ``sharded=True`` (it builds one to find out)."""
        try:
            self.build(self.classes[0], 0, True)
        except TypeError:  # no such keyword: a checkout before the sharded mode
            return False
        except ValueError as exc:  # the base has it, this loss refuses it
            if "sharded" not in str(exc):
                raise
            return False
        return True


TRAFFIC_LOSSES = {
    loss.name: loss
    for loss in (
        TrafficLoss("recall", (3, 100)),
        # Measured only once its sharded mode exists; binary with 1 % positives (rare
        # positives: the case Smooth-AP's sharded mode is for).
        TrafficLoss("smooth_ap", (1,), positive_rate=0.01, sharded_grows="positives"),
    )
}


def sharded_available(loss: str) -> bool:
    return TRAFFIC_LOSSES[loss].sharded_available()


@dataclass(frozen=True)
class TrafficConfig:
    """One measured configuration on one world size."""

    loss: str  # a key of TRAFFIC_LOSSES
    num_classes: int
    batch: int  # rows per rank per step (equal on every rank)
    sharded: bool


def _counter_delta(before: Any, after: Any) -> dict[str, int]:
    keys = ("calls", "reduced", "gathered", "rows")
    return {k: getattr(after, k) - getattr(before, k) for k in keys}


def traffic_rank(rank: int, world_size: int, configs: list[TrafficConfig]) -> list[dict[str, Any]]:
    """One rank: a linear model under DDP trains a few steps per configuration, counted."""
    from torch.nn.parallel import DistributedDataParallel

    from imbalanced_losses import _distributed
    from imbalanced_losses.testing import report_progress

    warnings.filterwarnings("ignore", message=".*positives make up")
    out = []
    for config in configs:
        report_progress(f"traffic {config}")
        loss_spec = TRAFFIC_LOSSES[config.loss]
        gen = torch.Generator().manual_seed(1000 * rank + config.batch + config.num_classes)
        torch.manual_seed(0)  # the same initial model on every rank (DDP also broadcasts it)
        model = DistributedDataParallel(torch.nn.Linear(TRAFFIC_FEATURES, config.num_classes))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        # queue_size = one global batch (sharded: each rank keeps queue_size // W of its own)
        queue = config.batch * world_size
        loss_fn = loss_spec.build(config.num_classes, queue, config.sharded)
        steps = []
        for _ in range(TRAFFIC_STEPS):
            x = torch.randn(config.batch, TRAFFIC_FEATURES, generator=gen)
            y = loss_spec.labels(gen, config.batch, config.num_classes)
            optimizer.zero_grad(set_to_none=True)
            start = time.perf_counter()
            before = _distributed.traffic()
            loss = loss_fn(model(x), y)
            middle = _distributed.traffic()
            loss.backward()
            after = _distributed.traffic()
            optimizer.step()
            elapsed = time.perf_counter() - start
            steps.append(
                {
                    "forward": _counter_delta(before, middle),
                    "backward": _counter_delta(middle, after),
                    "ms": elapsed * 1e3,
                    "loss": float(loss.detach()),
                }
            )
        out.append({"config": config.__dict__, "queue_size": queue, "steps": steps})
    return out


def _bytes(part: dict[str, int]) -> int:
    return part["reduced"] + part["gathered"]


def _summarise_traffic(per_rank: list[list[dict[str, Any]]], world_size: int) -> list[dict]:
    """Per configuration: the steady steps' bytes (the same on every rank and step, else the
    largest, flagged) and the median step time over ranks and steady steps."""
    rows = []
    for i, first in enumerate(per_rank[0]):
        steady = [s for r in per_rank for s in r[i]["steps"][TRAFFIC_STEADY_FROM:]]
        forward = {k: max(s["forward"][k] for s in steady) for k in steady[0]["forward"]}
        backward = {k: max(s["backward"][k] for s in steady) for k in steady[0]["backward"]}
        constant = all(
            s["forward"] == steady[0]["forward"] and s["backward"] == steady[0]["backward"]
            for s in steady
        )
        losses = [[s["loss"] for s in r[i]["steps"]] for r in per_rank]
        rows.append(
            {
                **first["config"],
                "world_size": world_size,
                "queue_size": first["queue_size"],
                "forward": forward,
                "backward": backward,
                "bytes_forward": _bytes(forward),
                "bytes_backward": _bytes(backward),
                "bytes_per_step": _bytes(forward) + _bytes(backward),
                "metadata_bytes": forward["gathered"] - forward["rows"],
                "bytes_same_every_rank_and_step": constant,
                "loss_same_on_every_rank": all(lo == losses[0] for lo in losses),
                "median_step_ms": statistics.median(s["ms"] for s in steady),
            }
        )
    return rows


def traffic_model(
    at: dict[tuple[int, int], dict[str, Any]],
    worlds: list[int],
    batches: tuple[int, int],
    units: Callable[[int], int] = int,
    unit: str = "row",
) -> dict[str, Any]:
    """Bytes per step as ``fixed + per_unit * W * units(N) + metadata_per_rank * W``.

    ``units(N)``: what a rank's share grows with (its rows, or its positives). Fitted at the
    largest measured W through the two batch sizes (metadata: the all_gather of one small row
    per rank), then checked on every other measured W > 1: ``max_error`` is the largest
    relative miss (0.0 when the model holds exactly, as it should for byte counts).
    """
    small, large = batches
    top = max(worlds)
    metadata = at[top, small]["metadata_bytes"] / top

    def data(w: int, n: int) -> float:
        return at[w, n]["bytes_per_step"] - at[w, n]["metadata_bytes"]

    per_unit = (data(top, large) - data(top, small)) / (top * (units(large) - units(small)))
    fixed = data(top, small) - per_unit * top * units(small)
    model = {
        "unit": unit,
        "fixed_bytes": fixed,
        "bytes_per_global_unit": per_unit,
        "metadata_bytes_per_rank": metadata,
    }
    errors = [
        abs(project_bytes(model, w, units(n)) - at[w, n]["bytes_per_step"])
        / at[w, n]["bytes_per_step"]
        for w in worlds
        if w > 1
        for n in batches
    ]
    return {**model, "max_error": max(errors)}


def project_bytes(model: dict[str, Any], world_size: int, units_per_rank: int) -> float:
    """The model's bytes per step at ``world_size`` ranks of ``units_per_rank`` rows/positives."""
    return (
        model["fixed_bytes"]
        + model["bytes_per_global_unit"] * world_size * units_per_rank
        + model["metadata_bytes_per_rank"] * world_size
    )


def _traffic_verdicts(
    rows: list[dict[str, Any]], worlds: list[int], batches: tuple[int, int]
) -> list[dict]:
    """Per loss and C, judged on exact byte counts: gathered bytes grow as W*N (no fixed part,
    a constant per global row); sharded bytes follow their loss's rule (recall: nothing per
    row, flat in N and W apart from the metadata row of each rank; Smooth-AP: per global
    positive, far less than gathered). Every point must fit the model exactly."""
    out = []
    for loss in sorted({r["loss"] for r in rows}):
        spec = TRAFFIC_LOSSES[loss]
        for c in sorted({r["num_classes"] for r in rows if r["loss"] == loss}):
            by_mode = {
                mode: {
                    (r["world_size"], r["batch"]): r
                    for r in rows
                    if (r["loss"], r["num_classes"], r["sharded"]) == (loss, c, mode)
                }
                for mode in (False, True)
            }
            gathered = traffic_model(by_mode[False], worlds, batches)
            verdict: dict[str, Any] = {"loss": loss, "num_classes": c, "gathered": gathered}
            verdict["gathered_grows_as_w_n"] = bool(
                gathered["max_error"] < 1e-12
                and abs(gathered["fixed_bytes"]) < 1e-6
                and gathered["bytes_per_global_unit"] >= 4 * c
            )
            if not by_mode[True]:
                verdict["sharded_ok"] = None
                out.append(verdict)
                continue
            unit = "positive" if spec.sharded_grows == "positives" else "row"
            sharded = traffic_model(by_mode[True], worlds, batches, spec.sharded_units, unit)
            verdict["sharded"] = sharded
            rows_gathered = [r["forward"]["rows"] for r in by_mode[True].values()]
            exact = sharded["max_error"] < 1e-12
            if spec.sharded_grows == "nothing":
                verdict["sharded_ok"] = bool(
                    exact and sharded["bytes_per_global_unit"] == 0 and not any(rows_gathered)
                )
            else:  # per global positive, and fewer bytes than gathered at the largest point
                top, large = max(worlds), max(batches)
                verdict["sharded_ok"] = bool(
                    exact
                    and by_mode[True][top, large]["bytes_per_step"]
                    < by_mode[False][top, large]["bytes_per_step"]
                )
            times = {
                f"W={w},N={n}": by_mode[True][w, n]["median_step_ms"]
                / by_mode[False][w, n]["median_step_ms"]
                for (w, n) in by_mode[True]
                if w > 1
            }
            verdict["step_time_sharded_over_gathered"] = times
            out.append(verdict)
    return out


def traffic_worlds(largest: int) -> list[int]:
    """1, 2, 4, ... up to ``largest``, and ``largest`` itself."""
    worlds = [1]
    while worlds[-1] * 2 <= largest:
        worlds.append(worlds[-1] * 2)
    return sorted({*worlds, largest})


def run_traffic_case(case: Case, args: argparse.Namespace) -> dict[str, Any]:
    from imbalanced_losses.testing import run_ranks

    small, large, largest = case.sizes(args.quick)
    worlds = traffic_worlds(largest)
    # The recall loss always (its gathered mode at least); the others once they can shard.
    losses = [
        spec
        for spec in TRAFFIC_LOSSES.values()
        if spec.name == "recall" or spec.sharded_available()
    ]
    configs = [
        TrafficConfig(spec.name, c, n, sharded)
        for spec in losses
        for c in spec.classes
        for n in (small, large)
        for sharded in ([False, True] if spec.sharded_available() else [False])
    ]
    rows = []
    for w in worlds:
        per_rank = run_ranks(
            traffic_rank, w, backend="gloo", timeout_s=600.0, args=(w, configs), threads_per_rank=1
        )
        rows += _summarise_traffic(per_rank, w)
    verdicts = _traffic_verdicts(rows, worlds, (small, large))
    sharded_missing = any(v["sharded_ok"] is None for v in verdicts)
    met = all(v["gathered_grows_as_w_n"] and v["sharded_ok"] is not False for v in verdicts)
    met = met and all(r["bytes_same_every_rank_and_step"] for r in rows)
    projection = [
        {
            "loss": v["loss"],
            "num_classes": v["num_classes"],
            "world_size": w,
            "batch": n,
            "gathered_bytes": project_bytes(v["gathered"], w, n),
            "sharded_bytes": (
                project_bytes(v["sharded"], w, TRAFFIC_LOSSES[v["loss"]].sharded_units(n))
                if "sharded" in v
                else None
            ),
        }
        for v in verdicts
        for w in TRAFFIC_PROJECTED_WORLDS
        for n in (small, large)
    ]
    return {
        "kind": "traffic",
        "worlds": worlds,
        "batches": [small, large],
        "losses": [spec.name for spec in losses],
        "classes": {spec.name: list(spec.classes) for spec in losses},
        "sharded_measured": not sharded_missing,
        "steps": TRAFFIC_STEPS,
        "steady_from_step": TRAFFIC_STEADY_FROM,
        "rows": rows,
        "verdicts": verdicts,
        "projection": projection,
        "ours_median_ms": statistics.median(r["median_step_ms"] for r in rows),
        "reference_median_ms": None,
        "method": (
            "for each world size, W spawned gloo ranks (FileStore in a temp dir, 1 thread each); "
            f"each configuration builds a Linear({TRAFFIC_FEATURES}, C) under "
            "DistributedDataParallel and the loss with queue_size = one global batch, and trains "
            f"{TRAFFIC_STEPS} steps on fresh batches of N rows per rank; bytes received per rank "
            "are counted at the collective calls of imbalanced_losses._distributed (all_gather: "
            "every rank's block, own included; all_reduce: the reduced tensor; payload bytes, "
            "not wire bytes), forward = the loss call, backward = loss.backward(); DDP's own "
            "gradient all-reduce of the model (the same in both modes) is not counted; steps "
            f"from index {TRAFFIC_STEADY_FROM} on (queue full) are measured; step time = forward "
            "+ backward + optimizer step, median over ranks and measured steps. Projection: "
            "bytes = fixed + per global row * W * N + metadata per rank * W, fitted at the "
            "largest measured W through both N and checked exactly on every other W"
        ),
        "target": (
            "bytes exact and the same on every rank and step; gathered grows as W*N; sharded "
            "recall flat in N and W (but its metadata row per rank), sharded Smooth-AP per "
            "global positive"
        ),
        "met": bool(met),
        "not_judged": "sharded mode not in this checkout" if sharded_missing else None,
    }


def fmt_bytes(value: float) -> str:
    """Bytes with a binary unit, 3 significant figures (exact counts are in the JSON)."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(value) >= size:
            return (
                f"{value / size:,.3g} {unit}"
                if value / size < 1000
                else f"{value / size:,.0f} {unit}"
            )
    return f"{value:,.0f} B"


def traffic_rows(name: str, r: dict[str, Any]) -> list[list[str]]:
    """One row per (loss, C, W, N): sharded as "ours", gathered as "baseline"; then verdicts
    and the projection to large worlds (each figure marked projected)."""
    at = {
        (x["loss"], x["num_classes"], x["world_size"], x["batch"], x["sharded"]): x
        for x in r["rows"]
    }
    out = []
    for (loss, c, w, n, sharded), row in at.items():
        if sharded:
            continue
        shard = at.get((loss, c, w, n, True))
        fwd, bwd = fmt_bytes(row["bytes_forward"]), fmt_bytes(row["bytes_backward"])
        parts = [f"gathered {fwd} fwd + {bwd} bwd"]
        if shard is not None:
            fwd, bwd = fmt_bytes(shard["bytes_forward"]), fmt_bytes(shard["bytes_backward"])
            parts.append(f"sharded {fwd} fwd + {bwd} bwd")
        out.append(
            [
                f"{name} ({loss} C={c}, W={w}, N={n:,}/rank)",
                fmt_ms(shard["median_step_ms"]) if shard else "—",
                fmt_ms(row["median_step_ms"]),
                "received/rank/step: " + "; ".join(parts),
                "",
                "",
            ]
        )
    for v in r["verdicts"]:
        g = v["gathered"]
        text = (
            f"gathered: {fmt_bytes(g['bytes_per_global_unit'])} per global row + "
            f"{fmt_bytes(g['metadata_bytes_per_rank'])} per rank (fit max error "
            f"{g['max_error']:.0%})"
        )
        verdict = "yes" if v["gathered_grows_as_w_n"] and v["sharded_ok"] is not False else "NO"
        if v["sharded_ok"] is None:
            verdict += " (gathered only: no sharded mode here)"
        else:
            s = v["sharded"]
            text += (
                f"; sharded: {fmt_bytes(s['fixed_bytes'])} + "
                f"{fmt_bytes(s['bytes_per_global_unit'])} per global {s['unit']} + "
                f"{fmt_bytes(s['metadata_bytes_per_rank'])} per rank (fit max error "
                f"{s['max_error']:.0%}); step time sharded/gathered "
                + ", ".join(
                    f"{k}: {x:.2f}x" for k, x in v["step_time_sharded_over_gathered"].items()
                )
            )
        out.append(
            [
                f"{name} verdict ({v['loss']} C={v['num_classes']})",
                "",
                "",
                text,
                r["target"],
                verdict,
            ]
        )
    for p in r["projection"]:
        text = f"projected: gathered {fmt_bytes(p['gathered_bytes'])}/step"
        if p["sharded_bytes"] is not None:
            text += f", sharded {fmt_bytes(p['sharded_bytes'])}/step"
        where = f"W={p['world_size']:,}, N={p['batch']:,}/rank"
        what = f"{name} projected ({p['loss']} C={p['num_classes']}, {where})"
        out.append([what, "—", "—", text, "projected from the measured per-rank costs", ""])
    return out


# --------------------------------------------------------------------------- Smooth-AP case
def smooth_ap_child(impl: str, rows: int, positives: int, repeats: int) -> dict[str, Any]:
    """Runs in a fresh process: forward+backward times and peak extra RSS of one implementation.

    ``impl`` is ``ours`` (SmoothAPLoss, chunked) or ``plain`` (the full-matrix reference in
    float32). Binary, no queue, temperature 0.01, float32 logits.
    """

    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(rows, 1, generator=gen).requires_grad_(True)
    targets = torch.zeros(rows, dtype=torch.long)
    targets[torch.randperm(rows, generator=gen)[:positives]] = 1
    if impl == "ours":
        from imbalanced_losses import SmoothAPLoss

        loss_fn = SmoothAPLoss(1, queue_size=0, temperature=0.01)
    else:
        from imbalanced_losses.testing.reference import reference_smooth_ap_loss

        def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return reference_smooth_ap_loss(
                x, y, num_classes=1, temperature=0.01, dtype=torch.float32
            )[0]

    times, extras, value = _timed_peak_calls(loss_fn, logits, targets, repeats)
    return {
        "impl": impl,
        "rows": rows,
        "positives": positives,
        "ms": [t * 1e3 for t in times],
        "peak_extra_mb": extras,
        "loss": value,
    }


def run_smooth_ap_case(case: Case, args: argparse.Namespace) -> dict[str, Any]:
    """Each measurement in a fresh process (default glibc malloc: what a user's process gets)."""
    full = case.sizes(args.quick)
    side = case.side_by_side[1 if args.quick else 0]
    repeats = 1 if args.quick else min(args.repeats, 3)
    runs: dict[str, Any] = {}
    for key, impl, (rows, positives) in (
        ("ours_full", "ours", full),
        ("ours_side", "ours", side),
        ("plain_side", "plain", side),
    ):
        try:
            runs[key] = run_child("smooth_ap_child", impl, rows, positives, repeats, timeout=3600)
        except RuntimeError as exc:
            runs[key] = {"error": str(exc)[-2000:]}
            continue
        runs[key]["median_ms"] = statistics.median(runs[key]["ms"])
        runs[key]["max_peak_extra_mb"] = max(runs[key]["peak_extra_mb"])
    ok = all("error" not in r for r in runs.values())
    limit = case.max_extra
    agree = ok and math.isclose(runs["ours_side"]["loss"], runs["plain_side"]["loss"], rel_tol=1e-4)
    return {
        "kind": "smooth_ap",
        "runs": runs,
        "losses_agree": agree,
        "target": f"{full[0]:,} rows / {full[1]:,} positives with peak extra < {limit:,} MiB",
        "met": bool(agree and runs["ours_full"]["max_peak_extra_mb"] < limit),
        "method": "fresh subprocess per run, default malloc; VmHWM reset after the inputs exist; "
        "peak extra = VmHWM after forward+backward - VmRSS before; max over calls",
    }


def smooth_ap_rows(name: str, r: dict[str, Any]) -> list[list[str]]:
    """Table rows of the Smooth-AP case: ours at full size, then both at the side-by-side size."""
    out = []
    for key, label in (("ours_full", "ours"), ("ours_side", "ours"), ("plain_side", "plain")):
        run = r["runs"][key]
        if "error" in run:
            out.append([f"{name} {label}", "error", "", "", r["target"], "NO"])
            continue
        size = f"{run['rows']:,} rows, {run['positives']:,} positives"
        ms = fmt_ms(run["median_ms"])
        cells = [ms, "—"] if label == "ours" else ["—", ms]
        met = ("yes" if r["met"] else "NO") if key == "ours_full" else ""
        out.append(
            [
                f"{name} {label} ({size})",
                *cells,
                f"peak extra {run['max_peak_extra_mb']:,.0f} MiB",
                r["target"],
                met,
            ]
        )
    return out


# --------------------------------------------------------------------------- PAUC cases
PAUC_BAND = (0.0, 0.1)  # FPR band: the pairwise band holds ~10% of the negatives
PAUC_NON_IID = 0.1  # share of rows not drawn i.i.d. (the band edges come from the others)


def pauc_inputs(
    rows: int, positives: int, seed: int = 13
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Binary float32 logits (positives shifted up), targets and an iid mask; the rows not
    iid are shifted up too (densified near the top, as a caller's hard negatives would be)."""
    gen = torch.Generator().manual_seed(seed)
    targets = torch.zeros(rows, dtype=torch.long)
    targets[torch.randperm(rows, generator=gen)[:positives]] = 1
    iid = torch.rand(rows, generator=gen) >= PAUC_NON_IID
    shift = 1.5 * targets + 1.0 * ~iid
    logits = (torch.randn(rows, 1, generator=gen) + shift[:, None]).requires_grad_(True)
    return logits, targets, iid


def pauc_loss_fn(impl: str, surrogate: str) -> Callable[..., torch.Tensor]:
    """``ours`` (PAUCAtBudgetLoss) or ``plain`` (PlainPAUCLoss, float32), no queue; called as
    ``fn(logits, targets, iid)``."""
    alpha, beta = PAUC_BAND
    options = {"surrogate": surrogate, "n_knots": 5, "temperature": 0.1, "queue_size": 0}
    if impl == "ours":
        from imbalanced_losses import PAUCAtBudgetLoss

        ours = PAUCAtBudgetLoss(1, alpha, beta, **options)  # type: ignore[arg-type]
        return lambda x, y, iid: ours(x, y, iid)
    from imbalanced_losses.testing.reference import PlainPAUCLoss

    plain = PlainPAUCLoss(1, alpha=alpha, beta=beta, dtype=torch.float32, **options)
    return lambda x, y, iid: plain(x, y, iid)  # type: ignore[return-value]


def pauc_speed_child(
    surrogate: str, rows: int, positives: int, repeats: int, warmup: int
) -> dict[str, Any]:
    """Runs in a fresh process: ours and the plain reference interleaved (ABBA), same inputs."""
    logits, targets, iid = pauc_inputs(rows, positives)
    fns = {impl: pauc_loss_fn(impl, surrogate) for impl in ("ours", "plain")}
    times: dict[str, list[float]] = {"ours": [], "plain": []}
    losses = {}
    for i in range(warmup + repeats):
        order = ["ours", "plain"] if i % 2 == 0 else ["plain", "ours"]
        for impl in order:
            logits.grad = None
            start = time.perf_counter()
            loss = fns[impl](logits, targets, iid)
            loss.backward()
            elapsed = time.perf_counter() - start
            losses[impl] = float(loss.detach())
            if i >= warmup:
                times[impl].append(elapsed)
    return {
        "rows": rows,
        "positives": positives,
        "ours_ms": [t * 1e3 for t in times["ours"]],
        "plain_ms": [t * 1e3 for t in times["plain"]],
        "loss_ours": losses["ours"],
        "loss_plain": losses["plain"],
    }


def pauc_memory_child(
    impl: str, surrogate: str, rows: int, positives: int, repeats: int
) -> dict[str, Any]:
    """Runs in a fresh process: forward+backward times and peak extra RSS of one implementation."""
    logits, targets, iid = pauc_inputs(rows, positives)
    fn = pauc_loss_fn(impl, surrogate)
    times, extras, value = _timed_peak_calls(lambda x, y: fn(x, y, iid), logits, targets, repeats)
    negatives = rows - positives
    return {
        "impl": impl,
        "rows": rows,
        "positives": positives,
        "ms": [t * 1e3 for t in times],
        "peak_extra_mb": extras,
        "loss": value,
        # What the plain reference's [positives, band] float32 matrix alone would take.
        "dense_pairs_mb": positives * negatives * (PAUC_BAND[1] - PAUC_BAND[0]) * 4 / 2**20,
        "pool_mb": rows * 4 / 2**20,
    }


def run_pauc_case(case: Case, args: argparse.Namespace) -> dict[str, Any]:
    """Speed side by side at a size the plain reference holds; our memory at full size."""
    surrogate = "pairwise" if "pair" in case.name else "trapezoid"
    full = case.sizes(args.quick)
    side = case.side_by_side[1 if args.quick else 0]
    repeats = 1 if args.quick else args.repeats
    warmup = min(args.warmup, 1) if args.quick else args.warmup
    result: dict[str, Any] = {"kind": "pauc", "surrogate": surrogate, "band": PAUC_BAND}
    try:
        speed = run_child("pauc_speed_child", surrogate, *side, repeats, warmup, timeout=3600)
        memory = run_child(
            "pauc_memory_child", "ours", surrogate, *full, 1 if args.quick else 2, timeout=3600
        )
    except RuntimeError as exc:
        return {**result, "error": str(exc)[-2000:], "met": False, "target": ""}
    med_ours, med_plain = statistics.median(speed["ours_ms"]), statistics.median(speed["plain_ms"])
    agree = math.isclose(speed["loss_ours"], speed["loss_plain"], rel_tol=1e-4)
    limit = case.max_extra
    peak = max(memory["peak_extra_mb"])
    return {
        **result,
        "speed": speed,
        "memory": memory,
        "ours_median_ms": med_ours,
        "reference_median_ms": med_plain,
        "speedup": med_plain / med_ours,
        "losses_agree": agree,
        "peak_extra_mb": peak,
        "target": f"{full[0]:,} rows / {full[1]:,} positives with peak extra < {limit:,} MiB; "
        "speed shown",
        "met": bool(agree and limit is not None and peak < limit),
        "method": "speed: one fresh process, ours and the plain reference interleaved (ABBA) on "
        "the same inputs after warm-up, medians; memory: a fresh process, default malloc, VmHWM "
        "reset after the inputs exist, peak extra = VmHWM after forward+backward - VmRSS "
        "before, max over calls",
    }


def pauc_rows(name: str, r: dict[str, Any]) -> list[list[str]]:
    """Speed side by side at the smaller size, then our peak memory at the full size."""
    speed, memory = r["speed"], r["memory"]
    side = f"{speed['rows']:,} rows, {speed['positives']:,} positives"
    full = f"{memory['rows']:,} rows, {memory['positives']:,} positives"
    agree = "" if r["losses_agree"] else "; LOSSES DIFFER"
    return [
        [
            f"{name} {r['surrogate']}, FPR band {r['band'][1]:g}, vs plain ({side})",
            fmt_ms(r["ours_median_ms"]),
            fmt_ms(r["reference_median_ms"]),
            f"{r['speedup']:.1f}x{agree}",
            "speed shown, no target",
            "",
        ],
        [
            f"{name} {r['surrogate']} ours ({full})",
            fmt_ms(statistics.median(memory["ms"])),
            "—",
            f"peak extra {r['peak_extra_mb']:,.0f} MiB (pool {memory['pool_mb']:,.1f} MiB"
            + (
                f"; the dense pair matrix alone {memory['dense_pairs_mb']:,.0f} MiB)"
                if r["surrogate"] == "pairwise"
                else ")"
            ),
            r["target"],
            _verdict(r),
        ],
    ]


# --------------------------------------------------------------------------- report
def fmt_ms(value: float | None) -> str:
    return "—" if value is None else f"{value:,.1f}"


def _verdict(r: dict[str, Any]) -> str:
    if r.get("not_judged"):
        if r["met"] is None:
            return "n/a at --quick sizes"
        return f"{'yes' if r['met'] else 'NO'} ({r['not_judged']})"
    return "n/a" if r["met"] is None else ("yes" if r["met"] else "NO")


def speed_rows(name: str, r: dict[str, Any]) -> list[list[str]]:
    what = f"C={r['num_classes']:,}, batch {r['batch']:,}, queue {r['queue']:,}"
    if r["quantile"] != QUANTILE:
        what += f", quantile {r['quantile']:g}"
    if r["reference_median_ms"] is None:
        ref = f"> {r['reference_at_least_ms'] / 1e3:,.0f} s (stopped)"
        measured = f"> {r['speedup']:,.0f}x"
    else:
        ref, measured = fmt_ms(r["reference_median_ms"]), f"{r['speedup']:.1f}x"
    if "host_syncs_per_forward" in r:
        measured += (
            f"; host syncs {sum(r['host_syncs_per_forward'].values())} per "
            f"forward, {sum(r['host_syncs_per_backward'].values())} in backward"
        )
    if "peak_extra_over_pool" in r:
        measured += (
            f"; peak extra {max(r['peak_extra_mb']):,.0f} MiB = "
            f"{r['peak_extra_over_pool']:.2f}x pool ({r['pool_mb']:,.0f} MiB)"
        )
    return [
        [f"{name} ({what})", fmt_ms(r["ours_median_ms"]), ref, measured, r["target"], _verdict(r)]
    ]


def memory_rows(name: str, r: dict[str, Any]) -> list[list[str]]:
    ref = f"raises at {r['reference_rows']:,} rows" if r["reference_raises"] else "did not raise"
    measured = (
        f"peak extra {max(r['peak_extra_mb']):,.0f} MiB = "
        f"{r['peak_extra_over_logits']:.2f}x logits ({r['logits_mb']:,.0f} MiB)"
    )
    what = f"{name} (C=1, {r['rows']:,} rows, one call)"
    return [[what, fmt_ms(r["ours_median_ms"]), ref, measured, r["target"], _verdict(r)]]


def rss_rows(name: str, r: dict[str, Any]) -> list[list[str]]:
    what = (
        f"{name} (C={r['num_classes']:,}, batch {r['batch']:,}, queue {r['queue']:,}, "
        f"quantile {r['quantile']:g}: fill the queue, one more step)"
    )
    measured = (
        f"peak RSS growth {r['peak_growth_mb']:,.0f} MiB = "
        f"{r['peak_growth_over_pool']:.2f}x pool ({r['pool_mb']:,.0f} MiB)"
    )
    return [[what, fmt_ms(r["ours_median_ms"]), "—", measured, r["target"], _verdict(r)]]


def ddp_rows(name: str, r: dict[str, Any]) -> list[list[str]]:
    what = f"{name} (C={r['num_classes']}, batches {r['per_rank_batch']}, queue {r['queue']:,})"
    measured = (
        f"{r['collectives_per_forward_steady_max']} per forward, "
        f"{r['collectives_per_backward_steady_max']} in backward"
    )
    return [[what, fmt_ms(r["ours_median_ms"]), "—", measured, r["target"], _verdict(r)]]


def table_rows(results: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name, r in results.items():
        if "error" in r:
            rows.append([name, "error", "", "", r.get("target", ""), "NO"])
        else:
            rows += CASES[name].rows(name, r)
    return rows


# --------------------------------------------------------------------------- the cases
# quantile=0.3 takes the k-th value path of the threshold.
def _speed(name: str, full: tuple[int, ...], quick: tuple[int, ...], **options: Any) -> Case:
    return Case(name, run_speed_case, speed_rows, full, quick, cpu_only=False, **options)


_CASES = [
    _speed(
        "c16_q64k",
        full=(4096, 65536),
        quick=(512, 4096),
        num_classes=16,
        speedup=10.0,
        max_syncs=(2, 0),
    ),
    _speed(
        "c100_q64k",
        full=(8192, 65536),
        quick=(2048, 16384),
        num_classes=100,
        speedup=4.0,
        max_extra=2.0,
    ),
    _speed(
        "c100_q64k_q03",
        full=(8192, 65536),
        quick=(2048, 16384),
        num_classes=100,
        quantile=0.3,
        max_extra=2.0,
    ),
    _speed(
        "c10k_q16k",
        full=(1024, 16384),
        quick=(64, 256),
        num_classes=10_000,
        quantile=0.3,
        max_extra=2.0,
        reference_limit_s=(60.0, 5.0),
        repeats=3,
        warmup=0,
        max_syncs=(2, 0),
    ),
    # Its growth depends on size: --quick runs it at full size.
    Case(
        "c1000_q16k_rss",
        run_rss_case,
        rss_rows,
        full=(1024, 16384),
        quick=(1024, 16384),
        num_classes=1000,
        quantile=0.3,
        max_extra=2.0,
    ),
    _speed("c1_1m", full=(1_000_000, 0), quick=(50_000, 0), speedup=1.0),
    # --quick runs ours on 1M rows; the reference is still shown to refuse > 2**24 rows.
    Case(
        "c1_20m",
        run_memory_case,
        memory_rows,
        full=(20_000_000,),
        quick=(1_000_000,),
        max_extra=4.0,
    ),
    # (rank 0 batch, rank 1 batch, queue, steps)
    Case(
        "ddp_gloo_2",
        run_ddp_case,
        ddp_rows,
        full=(4096, 3072, 65536, 8),
        quick=(512, 384, 4096, 4),
        num_classes=16,
        max_collectives=(2, 0),
    ),
    # ---- sharded vs gathered traffic (issue 19): (N small, N large, largest world size)
    Case(
        "ddp_traffic",
        run_traffic_case,
        traffic_rows,
        full=(512, 4096, 8),
        quick=(32, 512, 3),
        default=False,
    ),
    _speed(
        "c100_pool1m",
        full=(8192, 1_000_000 - 8192),
        quick=(1024, 16384),
        num_classes=100,
        default=False,
    ),
    # (rows, positives): ours alone at full size, ours and the plain full-matrix Smooth-AP
    # side by side at a size the plain one can hold; limit in MiB.
    Case(
        "sap_1m",
        run_smooth_ap_case,
        smooth_ap_rows,
        full=(1_000_000, 5000),
        quick=(20_000, 100),
        side_by_side=((100_000, 500), (5_000, 25)),
        max_extra=1024,
        default=False,
    ),
    # PAUCAtBudgetLoss, (rows, positives): ours alone at full size (memory), ours and the plain
    # reference side by side (speed) at a size the plain one holds; limit in MiB.
    Case(
        "pauc_pair_1m",
        run_pauc_case,
        pauc_rows,
        full=(1_000_000, 5000),
        quick=(20_000, 100),
        side_by_side=((100_000, 500), (5_000, 25)),
        max_extra=1024,
        default=False,
    ),
    Case(
        "pauc_trap_1m",
        run_pauc_case,
        pauc_rows,
        full=(1_000_000, 5000),
        quick=(20_000, 100),
        side_by_side=((100_000, 500), (5_000, 25)),
        max_extra=1024,
        default=False,
    ),
]
CASES = {case.name: case for case in _CASES}


def print_report(info: dict[str, Any], results: dict[str, Any], quick: bool) -> str:
    lines = [
        f"torch {info['torch']} | device {info['device']}"
        + (f" ({info['gpu']})" if "gpu" in info else "")
        + f" | CPU {info['cpu_model']} ({info['logical_cpus']} logical CPUs) | "
        f"torch threads {info['torch_threads']} | load avg at start "
        f"{info.get('load_avg_at_start')} | {info['date']}",
        f"float32, forward+backward, quantile={QUANTILE} unless shown; medians of interleaved "
        "runs after warm-up (see JSON for every sample)",
        *(
            [
                "--quick: small sizes. Speed targets and the 20M-row memory ratio are set for the "
                "full sizes and are not judged here; the pool-memory, fresh-process RSS (run at "
                "full size) and collective targets are."
            ]
            if quick
            else []
        ),
        "",
        "| case | ours median ms | baseline median ms | speedup / measured | target | met? |",
        "| --- | ---: | ---: | --- | --- | --- |",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(results)]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


# --------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per side (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per side (default 2)")
    p.add_argument(
        "--json",
        default=os.path.join(REPO, "results", "bench.json"),
        help="where to write the results (default results/bench.json)",
    )
    p.add_argument(
        "--cases",
        default=",".join(name for name, case in CASES.items() if case.default),
        help=f"comma-separated subset of {', '.join(CASES)}",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)"
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i] for the speed cases")
    p.add_argument(
        "--slow-budget-s",
        type=float,
        default=60.0,
        help="cap on the reference's timed seconds per case (>= 3 calls always)",
    )
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    unknown = [c for c in args.cases.split(",") if c not in CASES]
    if unknown:
        p.error(f"unknown case(s) {unknown}; choose from {list(CASES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.repeats = min(args.repeats, 2)
        args.warmup = min(args.warmup, 1)
    # Uniform multi-class targets put 1/C of the rows in each class, above the default
    # quantile: the loss rightly warns once per case. The bench measures speed, not that rule.
    warnings.filterwarnings("ignore", message=".*positives make up")
    info = machine_info(args.device)
    results: dict[str, Any] = {}
    for name in args.cases.split(","):
        case = CASES[name]
        if case.cpu_only and args.device != "cpu":
            print(f"[{name}] skipped: CPU-only case (device {args.device})", flush=True)
            continue
        print(f"[{name}] running...", flush=True)
        start = time.perf_counter()
        results[name] = case.measure(case, args)
        results[name]["wall_s"] = time.perf_counter() - start
        print(f"[{name}] done in {results[name]['wall_s']:.1f} s", flush=True)
    print()
    table = print_report(info, results, args.quick)
    out = {
        "machine": info,
        "quick": args.quick,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "cases": results,
        "table_markdown": table,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)
    print(f"\nwrote {args.json}")
    missed = [name for name, r in results.items() if r.get("met") is False]
    if missed:
        print(f"targets missed: {', '.join(missed)}")
    else:
        judged = "size-independent targets" if args.quick else "targets"
        print(f"all {judged} met")
    return 1 if (missed and args.strict) else 0


if __name__ == "__main__":
    sys.exit(main())
