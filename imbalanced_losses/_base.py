"""The shared flow of every *queued ranking loss*.

``QueuedRankingLoss.forward`` is a template method: validate (every rank
agrees that every input is good, see ``_validation``) -> gather the live rows
across ranks -> pool them with the queue (optionally subsampling the threshold
rows) -> ``per_class_loss`` (the only thing a subclass writes) -> reduce ->
enqueue. Every check runs, and every rank agrees that it passed, before any
state changes, so a bad batch can neither corrupt the queue nor leave another
rank waiting in a collective.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from . import _distributed, _validation
from ._queue import MemoryQueue
from ._validation import Meta
from .functional import positive_columns, positive_scores, reduce_per_class

REDUCTIONS = ("mean", "sum", "none")
POSITIVES = ("pool", "live")
STATE_VERSION = 1  # format of get_extra_state(); a checkpoint without one is version 0

LossOutput = Tensor | tuple[Tensor, Tensor, Tensor]


@dataclass
class Rows:
    """A block of pooled rows: ``scores [n, C]``, ``targets [n]``, ``weights [n]``.

    ``own [n]``, when set, is each row's score in its own class column and is
    the only tensor carrying gradient (``scores`` travelled detached): the cheap
    gradient path of a loss that sets ``own_class_gradient_only``.
    ``num_positives``, when the host knows it, is how many rows are a
    positive of some class: binary positives are then selected without a sync.
    """

    scores: Tensor
    targets: Tensor
    weights: Tensor
    own: Tensor | None = None
    num_positives: int | None = None


@dataclass
class Pool:
    """The rows a loss ranks this step: the live rows (with gradient) and the queued rows.

    They are kept as two blocks rather than concatenated, so a step does not
    copy the whole queue. ``threshold_rows`` indexes (live first, then queue)
    the rows to estimate thresholds from when ``max_pool_size`` capped them
    (``None``: all rows); every row still counts in per-row terms such as recall.
    ``positives_from`` is ``"pool"`` (every pooled positive) or ``"live"`` (this
    step's positives only; the queue then only sets thresholds).
    """

    live: Rows
    queued: Rows
    num_classes: int
    threshold_rows: Tensor | None = None
    positives_from: str = "pool"

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
        """Own-class score, class and weight of the rows that count as positives.

        ``(own_score [K], class [K], weight [K])``; live scores carry gradient.
        Multi-class: every row is a positive of its class. Binary: the live
        positives are selected (their count came with the metadata, so without
        a host sync); queued rows with target 0 come with weight 0 instead
        (selecting them would cost a sync, and the queue is small).
        """
        blocks = [self._binary_positives_only(self.live)]
        if self.positives_from == "pool" and self.queued.targets.shape[0] > 0:
            blocks.append(self.queued)  # an empty queue joins no copy of the live positives
        parts = [
            positive_scores(rows.scores, rows.targets, rows.weights, self.num_classes, rows.own)
            for rows in blocks
        ]
        if len(parts) == 1:
            return parts[0]
        return tuple(torch.cat(p) for p in zip(*parts))  # type: ignore[return-value]

    def _binary_positives_only(self, rows: Rows) -> Rows:
        """The positive rows of a binary block whose positive count is known, else ``rows``.

        Keeps every per-positive temporary (and its gradient) positive-sized
        rather than row-sized: binary positives are often 1% of the rows.
        """
        count = rows.num_positives
        if self.num_classes != 1 or count is None or count == rows.targets.shape[0]:
            return rows
        index = _validation.true_indices(rows.targets == 1, count)
        own = None if rows.own is None else rows.own[index]
        return Rows(rows.scores[index], rows.targets[index], rows.weights[index], own, count)


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def check_temperature(value: Any) -> float:
    """A temperature is a finite number > 0."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not (math.isfinite(value) and value > 0)
    ):
        raise ValueError(f"temperature must be a finite float > 0, got {value!r}")
    return float(value)


class QueuedRankingLoss(nn.Module):
    """Base class for ranking losses over a pool of live rows plus a memory queue.

    Subclasses implement :meth:`per_class_loss` and may extend
    :meth:`config_fingerprint` with the options every rank must agree on.
    Under DDP the forward gathers all ranks' rows (of ``process_group``) in
    rank order with two collectives (metadata, then rows) and the gradient
    equals the single-process gradient of the global batch after DDP's
    averaging. A loss whose gradient flows only through each row's own-class
    score sets ``own_class_gradient_only = True``: the gathered rows then
    travel detached and only a ``[rows]`` vector carries gradient.

    A loss with a sigmoid width passes ``temperature=``: the base validates
    it, lets users anneal it by assignment, agrees on it across ranks and
    saves it in ``state_dict()``.

    The forward always runs eagerly: inside a compiled program (``torch.compile``) it
    is a graph break (data-dependent sizes and collectives do not trace).
    """

    own_class_gradient_only: ClassVar[bool] = False
    _temperature: float  # set only by losses that have a temperature

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
        process_group: Any = None,
        positives: str = "pool",
        temperature: float | None = None,
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
        if positives not in POSITIVES:
            raise ValueError(f"positives must be one of {POSITIVES}, got {positives!r}")
        self.num_classes = num_classes
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.update_queue_in_eval = update_queue_in_eval
        self.gather_distributed = gather_distributed
        self.max_pool_size = max_pool_size
        self.seed = seed
        self.process_group = process_group
        self.positives = positives
        if temperature is not None:  # a loss without a sigmoid width has no temperature
            self._temperature = check_temperature(temperature)
        self.subsample_step = 0
        self.queue = MemoryQueue(queue_size, num_classes)
        self._warned: set[str] = set()
        self._config_cache: tuple[tuple[Any, ...], Tensor] | None = None

    # ------------------------------------------------------------------ hooks
    def per_class_loss(self, pool: Pool) -> tuple[Tensor, Tensor]:
        """``(loss [C], valid [C] bool)`` for a non-empty pool; invalid entries are ignored."""
        raise NotImplementedError

    def config_fingerprint(self) -> dict[str, float]:
        """Options that must be equal on every rank, as floats (checked each distributed step)."""
        fingerprint = {
            "num_classes": float(self.num_classes),
            "queue_size": float(self.queue.capacity),
            "ignore_index": float(self.ignore_index),
            "reduction": float(REDUCTIONS.index(self.reduction)),
            "max_pool_size": float(self.max_pool_size or -1),
            "seed": float(self.seed),
            "positives": float(POSITIVES.index(self.positives)),
        }
        if self._has_temperature():
            fingerprint["temperature"] = self._temperature
        return fingerprint

    # ----------------------------------------------------------------- public
    @property
    def temperature(self) -> float:
        """Sigmoid width; assign a new value to anneal it (kept in ``state_dict()``)."""
        if not self._has_temperature():
            raise AttributeError(f"{type(self).__name__} has no temperature")
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self._temperature = check_temperature(value)

    def reset_queue(self) -> None:
        """Empty the memory queue (e.g. after the score scale changed); re-arms the warnings."""
        self.queue.reset()
        self._warned.clear()

    def get_extra_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"version": STATE_VERSION, "subsample_step": self.subsample_step}
        if self._has_temperature():
            state["temperature"] = self._temperature
        return state

    def set_extra_state(self, state: Any) -> None:
        """Load a state of this format or an older one; keys it lacks keep their value."""
        version = state.get("version", 0)
        if not isinstance(version, int) or not 0 <= version <= STATE_VERSION:
            raise ValueError(
                f"cannot load loss state of format version {version!r}: this version of "
                f"imbalanced_losses reads versions 0 to {STATE_VERSION}; upgrade imbalanced_losses"
            )
        step = _check_int(
            "subsample_step", int(state.get("subsample_step", self.subsample_step)), 0
        )
        saved = state.get("temperature")
        if saved is not None and self._has_temperature():
            saved = check_temperature(saved)
            if saved != self._temperature:
                warnings.warn(
                    f"the checkpoint's temperature={saved} replaces this loss's "
                    f"temperature={self._temperature} (a run anneals it by hand, and "
                    "resuming continues from the saved value); assign loss_fn.temperature "
                    "after loading to use another",
                    UserWarning,
                    stacklevel=_caller_stacklevel(),
                )
            self._temperature = saved
        self.subsample_step = step

    @torch.compiler.disable
    def forward(
        self,
        logits: Tensor,
        targets: Tensor,
        *,
        return_per_class: bool = False,
        sample_weight: Tensor | None = None,
        update_queue: bool | None = None,
    ) -> LossOutput:
        """Loss of ``logits`` ``[N, C]`` against ``targets`` ``[N]`` over the pooled rows.

        Returns a scalar (``mean``/``sum``) or ``[C]`` (``none``, NaN for
        classes without a positive); with ``return_per_class=True`` the triple
        ``(loss, per_class [C] NaN where invalid, valid [C] bool)``.
        ``update_queue``: write this step's rows to the queue (``True``) or not
        (``False``); ``None`` follows the mode (train mode, or
        ``update_queue_in_eval``). Pass ``False`` for a validation pass with the
        loss left in train mode. Always eager, also inside ``torch.compile``.
        """
        self._warn_if_running_alone()
        writes_queue = self._writes_queue(update_queue)
        live, num_finite = self._validated_live_rows(
            logits, targets, sample_weight, update_queue, writes_queue
        )
        pool = self._pool(live, advance=self._updates_state(update_queue))
        anchor = live.scores if live.own is None else live.own
        if pool.size == 0:
            # Nothing to rank; still connected to the (empty) graph, so backward() works
            # for every reduction, "none" included.
            per_class = live.scores.new_zeros(self.num_classes) + anchor.sum() * 0.0
            valid = torch.zeros(self.num_classes, dtype=torch.bool, device=live.scores.device)
        else:
            per_class, valid = self.per_class_loss(pool)
        loss = reduce_per_class(per_class, valid, self.reduction, anchor=anchor)
        if writes_queue:
            self._enqueue(live, num_finite)
        if return_per_class:
            return loss, per_class.masked_fill(~valid, float("nan")), valid
        return loss

    # ---------------------------------------------------------------- helpers
    def _has_temperature(self) -> bool:
        return "_temperature" in vars(self)

    def _warn_once(self, key: str, message: str) -> None:
        """Warn once per condition ``key`` at the caller's line; ``reset_queue`` re-arms it."""
        if key in self._warned:
            return
        self._warned.add(key)
        warnings.warn(message, UserWarning, stacklevel=_caller_stacklevel())

    def _warn_if_running_alone(self) -> None:
        world_size = os.environ.get("WORLD_SIZE", "1")
        if _distributed.is_initialized() or not world_size.isdigit() or int(world_size) <= 1:
            return
        self._warn_once(
            "WORLD_SIZE without torch.distributed",
            f"WORLD_SIZE={world_size} is set but torch.distributed is not initialised, so each "
            "process trains alone on its own batches (no gather, no DDP averaging). Initialise "
            "the process group (torch.distributed.init_process_group, or your launcher's setup) "
            "before the first step. A known trap: `accelerate launch --cpu` runs ONE process; "
            "for several CPU processes use ACCELERATE_USE_CPU=1 with `accelerate launch "
            "--multi_gpu` and a script that calls Accelerator() first.",
        )

    def _updates_state(self, update_queue: bool | None) -> bool:
        """A training step: it writes the queue and moves the subsample stream on."""
        if update_queue is None:
            update_queue = self.training or self.update_queue_in_eval
        return update_queue is True

    def _writes_queue(self, update_queue: bool | None) -> bool:
        return self.queue.capacity > 0 and self._updates_state(update_queue)

    def _agreement(self, sample_weight: Any, writes_queue: bool) -> dict[str, float]:
        """What every rank must agree on this step: the configuration and this call's options."""
        return {
            **self.config_fingerprint(),
            "sample_weight given (1) or not (0)": float(sample_weight is not None),
            "whether this step writes the queue (train/eval mode, update_queue)": float(
                writes_queue
            ),
        }

    def _config_tensor(self, values: list[float], device: torch.device) -> Tensor:
        """The agreed-on values as a float64 tensor on ``device``, cached: no copy per step."""
        key = (device, *values)
        if self._config_cache is None or self._config_cache[0] != key:
            self._config_cache = (key, torch.tensor(values, dtype=torch.float64, device=device))
        return self._config_cache[1]

    def _validated_live_rows(
        self,
        logits: Tensor,
        targets: Tensor,
        sample_weight: Tensor | None,
        update_queue: Any,
        writes_queue: bool,
    ) -> tuple[Rows, int]:
        """This step's non-padding rows of every rank in rank order, and how many are finite.

        Raises on every rank, before any state changes, when any rank's input is
        invalid or the ranks disagree on their configuration or call options.
        """
        group = self.process_group
        distributed = _distributed.should_gather(self.gather_distributed, group)
        problem = _validation.static_problem(
            logits, targets, sample_weight, self.num_classes, self.queue.scores.device
        )
        if problem is None and update_queue is not None and not isinstance(update_queue, bool):
            problem = f"update_queue must be None, True or False, got {update_queue!r}"
        if problem is not None and not distributed:
            raise ValueError(problem)

        agreement = self._agreement(sample_weight, writes_queue)
        meta, (scores, tgt, weights, keep) = self._local_rows(
            logits, targets, sample_weight, problem, list(agreement.values())
        )
        metas = _validation.exchange(meta, distributed=distributed, group=group)
        rank = _distributed.world(group)[0] if distributed else 0
        _validation.raise_on_any_problem(
            metas,
            rank,
            {
                Meta.STATIC_ERROR: lambda: problem or "",
                Meta.BAD_TARGETS: lambda: _validation.describe_bad_targets(
                    targets, self.num_classes, self.ignore_index
                ),
                Meta.BAD_WEIGHTS: lambda: _validation.describe_bad_weights(sample_weight),
            },
            list(agreement),
        )

        num_kept = int(metas[rank][Meta.ROWS])
        if num_kept < tgt.shape[0]:  # padding present: keep real rows only
            rows = _validation.true_indices(keep, num_kept)
            scores, tgt, weights = scores[rows], tgt[rows], weights[rows]
        num_finite = int(sum(m[Meta.FINITE_ROWS] for m in metas))
        num_positives = int(sum(m[Meta.POSITIVE_ROWS] for m in metas))
        if distributed:
            live = self._gather(scores, tgt, weights, [int(m[Meta.ROWS]) for m in metas])
        else:
            live = Rows(scores, tgt, weights)
        live.num_positives = num_positives
        return live, num_finite

    def _local_rows(
        self,
        logits: Tensor,
        targets: Tensor,
        sample_weight: Tensor | None,
        problem: str | None,
        config: list[float],
    ) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor, Tensor]]:
        """Metadata row and the local ``(scores, targets, weights, keep)`` before filtering.

        Value checks stay on the device and ride in the metadata, so the whole
        validation costs only the one host sync the gather needs anyway, and
        the row counts it carries let filtering avoid a sync of its own.
        """
        device = self.queue.scores.device
        config_t = self._config_tensor(config, device)
        if problem is not None:
            meta = _validation.metadata_row(
                static_error=True,
                rows=0,
                finite_rows=0,
                bad_targets=False,
                bad_weights=False,
                config=config_t,
            )
            empty = torch.empty(0, self.num_classes, device=device)
            no_rows = torch.empty(0, dtype=torch.bool, device=device)
            return meta, (empty, no_rows.long(), empty[:, 0], no_rows)
        dtype = self._compute_dtype(logits)
        tgt = targets.reshape(-1).long()
        keep = tgt != self.ignore_index
        if sample_weight is None:
            weights = torch.ones((), dtype=dtype, device=device).expand(tgt.shape[0])
            bad_weights: Tensor | bool = False
        else:
            weights = sample_weight.detach().to(dtype)
            bad_weights = _validation.bad_weights(weights)
        positive = keep & (tgt == 1) if self.num_classes == 1 else keep
        meta = _validation.metadata_row(
            static_error=False,
            rows=keep.sum(),
            finite_rows=(torch.isfinite(logits).all(dim=1) & keep).sum(),
            bad_targets=_validation.bad_targets(tgt, self.num_classes, self.ignore_index),
            bad_weights=bad_weights,
            config=config_t,
            positive_rows=positive.sum(),
        )
        return meta, (logits.to(dtype), tgt, weights, keep)

    def _gather(self, scores: Tensor, targets: Tensor, weights: Tensor, sizes: list[int]) -> Rows:
        """All ranks' rows in rank order (one collective), with the exact gradient rule."""
        group = self.process_group
        extra = torch.stack([targets.to(scores.dtype), weights], dim=1)
        if self.own_class_gradient_only:
            column = positive_columns(targets, self.num_classes).clamp(min=0)
            scores, extra, own = _distributed.gather_own_column(scores, column, extra, sizes, group)
            return Rows(scores, extra[:, 0].long(), extra[:, 1], own=own)
        packed = _distributed.gather_rows(torch.cat([scores, extra], dim=1), sizes, group=group)
        return Rows(packed[:, :-2], packed[:, -2].long(), packed[:, -1])

    def _enqueue(self, live: Rows, num_finite: int) -> None:
        """Write the live rows (detached) to the queue; rows with inf/NaN never take a slot."""
        scores, targets, weights = live.scores.detach(), live.targets, live.weights
        if num_finite < scores.shape[0]:
            finite = torch.isfinite(scores).all(dim=1)
            rows = _validation.true_indices(finite, num_finite)
            scores, targets, weights = scores[rows], targets[rows], weights[rows]
        self.queue.push(scores, targets, weights)

    def _compute_dtype(self, logits: Tensor) -> torch.dtype:
        return torch.promote_types(
            torch.promote_types(logits.dtype, self.queue.scores.dtype), torch.float32
        )

    def _pool(self, live: Rows, advance: bool) -> Pool:
        q_scores, q_targets, q_weights = self.queue.rows()
        dtype = live.scores.dtype
        pool = Pool(
            live=live,
            queued=Rows(q_scores.to(dtype), q_targets, q_weights.to(dtype)),
            num_classes=self.num_classes,
            positives_from=self.positives,
        )
        if self.max_pool_size is not None and pool.size > self.max_pool_size:
            pool.threshold_rows = _to_device(self._subsample(pool.size), live.scores.device)
            # Only training steps move the stream on: validating must not change it.
            self.subsample_step += int(advance)
        return pool

    def _subsample(self, size: int) -> Tensor:
        """Uniform rows without replacement from a private generator: same on every rank."""
        # torch's CPU generator keeps only 32 bits of its seed: hash both parts into them.
        digest = hashlib.blake2b(f"{self.seed},{self.subsample_step}".encode(), digest_size=4)
        generator = torch.Generator().manual_seed(int.from_bytes(digest.digest(), "little"))
        assert self.max_pool_size is not None
        return torch.randperm(size, generator=generator)[: self.max_pool_size]


def _to_device(host: Tensor, device: torch.device) -> Tensor:
    """Host-to-device copy that does not block the host (pinned, non-blocking) on CUDA."""
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))


def _caller_stacklevel() -> int:
    """``stacklevel`` that points a warning at the first frame outside this package and torch."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(
        (_PACKAGE_DIR, _TORCH_DIR)
    ):
        frame, level = frame.f_back, level + 1
    return level
