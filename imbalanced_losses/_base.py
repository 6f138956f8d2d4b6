"""The shared flow of every *queued ranking loss*.

``QueuedRankingLoss.forward`` is a template method: validate -> (gather across
ranks) -> drop ignored rows -> merge with the queue -> optionally subsample the
threshold rows -> ``per_class_loss`` (the only thing a subclass writes) ->
reduce -> enqueue. Every check runs, and every rank agrees that it passed,
before any state changes, so a bad batch can neither corrupt the queue nor
leave another rank waiting in a collective.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from . import _distributed
from ._queue import MemoryQueue
from .functional import out_of_range_targets, positive_scores, reduce_per_class

REDUCTIONS = ("mean", "sum", "none")

LossOutput = Tensor | tuple[Tensor, Tensor, Tensor]


@dataclass
class Rows:
    """A block of pooled rows: ``scores [n, C]``, ``targets [n]``, ``weights [n]``."""

    scores: Tensor
    targets: Tensor
    weights: Tensor


@dataclass
class Pool:
    """The rows a loss ranks this step: the live rows (with gradient) and the queued rows.

    They are kept as two blocks rather than concatenated, so a step does not
    copy the whole queue. ``threshold_rows`` indexes (live first, then queue)
    the rows to estimate thresholds from when ``max_pool_size`` capped them
    (``None``: all rows); every row still counts in per-row terms such as recall.
    """

    live: Rows
    queued: Rows
    num_classes: int
    threshold_rows: Tensor | None = None

    @property
    def size(self) -> int:
        """Number of pooled rows (live plus queued)."""
        return self.live.scores.shape[0] + self.queued.scores.shape[0]

    def threshold_blocks(self) -> list[Tensor]:
        """Detached score blocks to estimate thresholds from (a subsample when capped)."""
        live, queued = self.live.scores.detach(), self.queued.scores
        rows = self.threshold_rows
        if rows is None:
            return [live, queued]
        n_live = live.shape[0]
        if n_live == 0 or queued.shape[0] == 0:
            return [(queued if n_live == 0 else live)[rows]]
        # Gather the sample from each block instead of concatenating the whole pool:
        # the same rows in the same order, without a pool-sized copy or a host sync.
        from_live = live[rows.clamp(max=n_live - 1)]
        from_queue = queued[(rows - n_live).clamp(min=0)]
        return [torch.where((rows < n_live).unsqueeze(1), from_live, from_queue)]

    def positives(self) -> tuple[Tensor, Tensor, Tensor]:
        """Every positive's own-class score, class and weight (live ones carry gradient)."""
        parts = [
            positive_scores(rows.scores, rows.targets, rows.weights, self.num_classes)
            for rows in (self.live, self.queued)
        ]
        return tuple(torch.cat(p) for p in zip(*parts))  # type: ignore[return-value]


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


class _Meta:
    """Column layout of the per-rank metadata row that the first collective gathers."""

    STATIC_ERROR, ROWS, FINITE_ROWS, BAD_TARGETS, BAD_WEIGHTS = range(5)
    CONFIG = 5


class QueuedRankingLoss(nn.Module):
    """Base class for ranking losses over a pool of live rows plus a memory queue.

    Subclasses implement :meth:`per_class_loss` and may extend
    :meth:`config_fingerprint` with the options every rank must agree on.
    Under DDP the forward gathers all ranks' rows in rank order with two
    collectives (metadata, then rows) and the gradient equals the
    single-process gradient of the global batch after DDP's averaging.
    """

    def __init__(
        self,
        num_classes: int,
        queue_size: int = 1024,
        reduction: str = "mean",
        ignore_index: int = -100,
        update_queue_in_eval: bool = False,
        gather_distributed: bool | None = None,
        max_pool_size: int | None = None,
        *,
        seed: int = 0,
    ) -> None:
        super().__init__()
        _check_int("num_classes", num_classes, 1)
        _check_int("queue_size", queue_size, 0)
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
        if not isinstance(update_queue_in_eval, bool):
            raise ValueError(f"update_queue_in_eval must be a bool, got {update_queue_in_eval!r}")
        if gather_distributed is not None and not isinstance(gather_distributed, bool):
            raise ValueError(
                f"gather_distributed must be None (auto), True or False, got {gather_distributed!r}"
            )
        if max_pool_size is not None:
            _check_int("max_pool_size", max_pool_size, 1)
        _check_int("seed", seed, 0)
        self.num_classes = num_classes
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.update_queue_in_eval = update_queue_in_eval
        self.gather_distributed = gather_distributed
        self.max_pool_size = max_pool_size
        self.seed = seed
        self.subsample_step = 0
        self.queue = MemoryQueue(queue_size, num_classes)

    # ------------------------------------------------------------------ hooks
    def per_class_loss(self, pool: Pool) -> tuple[Tensor, Tensor]:
        """``(loss [C], valid [C] bool)`` for a non-empty pool; invalid entries are ignored."""
        raise NotImplementedError

    def config_fingerprint(self) -> dict[str, float]:
        """Options that must be equal on every rank, as floats (checked each distributed step)."""
        return {
            "num_classes": float(self.num_classes),
            "queue_size": float(self.queue.capacity),
            "ignore_index": float(self.ignore_index),
            "reduction": float(REDUCTIONS.index(self.reduction)),
            "max_pool_size": float(self.max_pool_size or -1),
            "seed": float(self.seed),
            "train/eval mode (whether the queue is written)": float(self._writes_queue()),
        }

    # ----------------------------------------------------------------- public
    def reset_queue(self) -> None:
        """Empty the memory queue (e.g. after the score scale changed)."""
        self.queue.reset()

    def get_extra_state(self) -> dict[str, Any]:
        return {"subsample_step": self.subsample_step}

    def set_extra_state(self, state: Any) -> None:
        self.subsample_step = _check_int("subsample_step", int(state["subsample_step"]), 0)

    def forward(
        self,
        logits: Tensor,
        targets: Tensor,
        *,
        return_per_class: bool = False,
        sample_weight: Tensor | None = None,
    ) -> LossOutput:
        """Loss of ``logits`` ``[N, C]`` against ``targets`` ``[N]`` over the pooled rows.

        Returns a scalar (``mean``/``sum``) or ``[C]`` (``none``, NaN for
        classes without a positive); with ``return_per_class=True`` the triple
        ``(loss, per_class [C] NaN where invalid, valid [C] bool)``.
        """
        live, num_finite = self._gathered_live_rows(logits, targets, sample_weight)
        pool = self._pool(live)
        if pool.size == 0:
            per_class = live.scores.new_zeros(self.num_classes)
            valid = torch.zeros(self.num_classes, dtype=torch.bool, device=live.scores.device)
        else:
            per_class, valid = self.per_class_loss(pool)
        loss = reduce_per_class(per_class, valid, self.reduction, anchor=live.scores)
        if self._writes_queue():
            self._enqueue(live, num_finite)
        if return_per_class:
            return loss, per_class.masked_fill(~valid, float("nan")), valid
        return loss

    # ---------------------------------------------------------------- helpers
    def _gathered_live_rows(
        self, logits: Tensor, targets: Tensor, sample_weight: Tensor | None
    ) -> tuple[Rows, int]:
        """This step's non-padding rows of every rank in rank order, and how many are finite.

        Raises on every rank, before any state changes, when any rank's input is
        invalid or the ranks disagree on their configuration.
        """
        distributed = _distributed.should_gather(self.gather_distributed)
        problem = self._static_problem(logits, targets, sample_weight)
        if problem is not None and not distributed:
            raise ValueError(problem)

        meta, (scores, tgt, weights, keep) = self._local_rows(
            logits, targets, sample_weight, problem
        )
        metas = (
            torch.stack(_distributed.all_gather_rows_of_equal_shape(meta)).tolist()
            if distributed
            else [meta.tolist()]
        )
        self._raise_on_any_problem(metas, problem, targets, sample_weight)

        rank = _distributed.world()[0] if distributed else 0
        num_kept = int(metas[rank][_Meta.ROWS])
        if num_kept < tgt.shape[0]:  # padding present: keep real rows only
            rows = _true_indices(keep, num_kept)
            scores, tgt, weights = scores[rows], tgt[rows], weights[rows]
        if distributed:
            sizes = [int(m[_Meta.ROWS]) for m in metas]
            packed = torch.cat([scores, tgt.to(scores.dtype)[:, None], weights[:, None]], dim=1)
            packed = _distributed.gather_rows(packed, sizes)
            scores, tgt, weights = packed[:, :-2], packed[:, -2].long(), packed[:, -1]
        num_finite = int(sum(m[_Meta.FINITE_ROWS] for m in metas))
        return Rows(scores, tgt, weights), num_finite

    def _enqueue(self, live: Rows, num_finite: int) -> None:
        """Write the live rows (detached) to the queue; rows with inf/NaN never take a slot."""
        scores, targets, weights = live.scores.detach(), live.targets, live.weights
        if num_finite < scores.shape[0]:
            finite = torch.isfinite(scores).all(dim=1)
            rows = _true_indices(finite, num_finite)
            scores, targets, weights = scores[rows], targets[rows], weights[rows]
        self.queue.push(scores, targets, weights)

    def _writes_queue(self) -> bool:
        return self.queue.capacity > 0 and (self.training or self.update_queue_in_eval)

    def _compute_dtype(self, logits: Tensor) -> torch.dtype:
        return torch.promote_types(
            torch.promote_types(logits.dtype, self.queue.scores.dtype), torch.float32
        )

    def _static_problem(self, logits: Any, targets: Any, sample_weight: Any) -> str | None:
        """First shape/dtype/device problem of the inputs, without touching their values."""
        c = self.num_classes
        if not isinstance(logits, Tensor) or not logits.is_floating_point():
            return f"logits must be a floating-point tensor [N, {c}], got {_describe(logits)}"
        if logits.dim() != 2 or logits.shape[1] != c:
            return (
                f"logits must have shape [N, {c}] for num_classes={c}, "
                f"got shape {tuple(logits.shape)}"
            )
        if not isinstance(targets, Tensor):
            return f"targets must be an integer or bool tensor [N], got {_describe(targets)}"
        if targets.is_floating_point() or targets.is_complex():
            return f"targets must hold integer or bool class ids, got dtype {targets.dtype}"
        n = logits.shape[0]
        if not (tuple(targets.shape) == (n,) or tuple(targets.shape) == (n, 1)):
            return (
                f"targets must have shape [{n}] or [{n}, 1] to match logits, "
                f"got {tuple(targets.shape)}"
            )
        if targets.device != logits.device:
            return f"targets are on {targets.device} but logits are on {logits.device}"
        if self.queue.scores.device != logits.device:
            return (
                f"logits are on {logits.device} but the loss's queue is on "
                f"{self.queue.scores.device}; move the loss with loss_fn.to({str(logits.device)!r})"
            )
        if sample_weight is not None:
            if not isinstance(sample_weight, Tensor) or not sample_weight.is_floating_point():
                return (
                    f"sample_weight must be a floating-point tensor [{n}], "
                    f"got {_describe(sample_weight)}"
                )
            if tuple(sample_weight.shape) != (n,):
                return f"sample_weight must have shape [{n}], got {tuple(sample_weight.shape)}"
            if sample_weight.device != logits.device:
                return (
                    f"sample_weight is on {sample_weight.device} but logits are on {logits.device}"
                )
        return None

    def _agreement(self, sample_weight: Any) -> dict[str, float]:
        """What every rank must agree on this step: the configuration, and whether weights came."""
        return {**self.config_fingerprint(), "has_sample_weight": float(sample_weight is not None)}

    def _local_rows(
        self,
        logits: Tensor,
        targets: Tensor,
        sample_weight: Tensor | None,
        problem: str | None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor, Tensor]]:
        """Metadata row and the local ``(scores, targets, weights, keep)`` before filtering.

        Value checks stay on the device and ride in the metadata, so the whole
        validation costs only the one host sync the gather needs anyway, and
        the row counts it carries let filtering avoid a sync of its own.
        """
        device = self.queue.scores.device
        config = list(self._agreement(sample_weight).values())
        if problem is not None:
            meta = torch.tensor([1.0, 0, 0, 0, 0, *config], dtype=torch.float64, device=device)
            empty = torch.empty(0, self.num_classes, device=device)
            no_rows = torch.empty(0, dtype=torch.bool, device=device)
            return meta, (empty, no_rows.long(), empty[:, 0], no_rows)
        dtype = self._compute_dtype(logits)
        tgt = targets.reshape(-1).long()
        keep = tgt != self.ignore_index
        bad_targets = (keep & out_of_range_targets(tgt, self.num_classes)).any()
        if sample_weight is None:
            weights = torch.ones((), dtype=dtype, device=device).expand(tgt.shape[0])
            bad_weights = torch.zeros((), dtype=torch.bool, device=device)
        else:
            weights = sample_weight.detach().to(dtype)
            bad_weights = ~torch.isfinite(weights).all() | (weights < 0).any()
        finite = (torch.isfinite(logits).all(dim=1) & keep).sum()
        values = torch.stack([keep.sum(), finite, bad_targets, bad_weights]).to(torch.float64)
        static = torch.zeros(1, dtype=torch.float64, device=device)
        config_t = torch.tensor(config, dtype=torch.float64, device=device)
        return torch.cat([static, values, config_t]), (logits.to(dtype), tgt, weights, keep)

    def _raise_on_any_problem(
        self,
        metas: list[list[float]],
        problem: str | None,
        targets: Tensor,
        sample_weight: Tensor | None,
    ) -> None:
        """Raise the same decision on every rank: bad input anywhere, or ranks that disagree."""
        rank = _distributed.world()[0] if len(metas) > 1 else 0
        for column, describe in (
            (_Meta.STATIC_ERROR, lambda: problem or ""),
            (_Meta.BAD_TARGETS, lambda: self._describe_bad_targets(targets)),
            (_Meta.BAD_WEIGHTS, lambda: _describe_bad_weights(sample_weight)),
        ):
            flagged = [r for r, m in enumerate(metas) if m[column]]
            if not flagged:
                continue
            if rank in flagged:
                message = describe()
                raise ValueError(message if len(metas) == 1 else f"rank {rank}: {message}")
            raise ValueError(
                f"invalid input on rank(s) {flagged} (see their error); "
                "no rank changed its state this step"
            )
        names = list(self._agreement(sample_weight))
        for i, name in enumerate(names):
            seen = [m[_Meta.CONFIG + i] for m in metas]
            if any(v != seen[0] for v in seen):
                by_rank = ", ".join(f"rank {r}: {_fmt(v)}" for r, v in enumerate(seen))
                what = "sample_weight given (1) or not (0)" if name == "has_sample_weight" else name
                raise ValueError(f"ranks disagree on {what} ({by_rank}); every rank must match")

    def _describe_bad_targets(self, targets: Tensor) -> str:
        t = targets.reshape(-1).long()
        t = t[t != self.ignore_index]
        if self.num_classes == 1:
            bad = t[out_of_range_targets(t, 1)].unique()[:8].tolist()
            return (
                f"targets for binary mode (num_classes=1) must be 0, 1 or "
                f"ignore_index={self.ignore_index}; got values {bad}"
            )
        return (
            f"targets must be in [0, {self.num_classes}) or ignore_index={self.ignore_index}; "
            f"got min {int(t.min())}, max {int(t.max())}"
        )

    def _pool(self, live: Rows) -> Pool:
        q_scores, q_targets, q_weights = self.queue.rows()
        dtype = live.scores.dtype
        pool = Pool(
            live=live,
            queued=Rows(q_scores.to(dtype), q_targets, q_weights.to(dtype)),
            num_classes=self.num_classes,
        )
        if self.max_pool_size is not None and pool.size > self.max_pool_size:
            pool.threshold_rows = self._subsample(pool.size).to(live.scores.device)
        return pool

    def _subsample(self, size: int) -> Tensor:
        """Uniform rows without replacement from a private generator: same on every rank."""
        # torch's CPU generator keeps only 32 bits of its seed: hash both parts into them.
        digest = hashlib.blake2b(f"{self.seed},{self.subsample_step}".encode(), digest_size=4)
        generator = torch.Generator().manual_seed(int.from_bytes(digest.digest(), "little"))
        self.subsample_step += 1
        assert self.max_pool_size is not None
        return torch.randperm(size, generator=generator)[: self.max_pool_size]


def _true_indices(mask: Tensor, count: int) -> Tensor:
    """Indices of the ``count`` True entries of ``mask`` (a count the host already knows).

    ``nonzero_static`` needs no device sync; CUDA has it from torch 2.6, older
    builds fall back to ``nonzero`` (one sync).
    """
    try:
        return mask.nonzero_static(size=count).squeeze(1)
    except NotImplementedError:
        return mask.nonzero().squeeze(1)


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"tensor of dtype {value.dtype} and shape {tuple(value.shape)}"
    return type(value).__name__


def _fmt(value: float) -> str:
    return str(int(value)) if math.isfinite(value) and value == int(value) else repr(value)


def _describe_bad_weights(sample_weight: Tensor | None) -> str:
    assert sample_weight is not None
    w = sample_weight.detach()
    return (
        "sample_weight must be finite and non-negative; got "
        f"{int((~torch.isfinite(w)).sum())} non-finite and {int((w < 0).sum())} negative values"
    )
