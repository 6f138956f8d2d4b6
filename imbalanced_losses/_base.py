"""The shared flow of every *queued ranking loss*.

``QueuedRankingLoss.forward`` is a template method: check this rank's inputs -> agree with
every rank (``_exchange``: nothing changes until every rank's input is good and every rank
holds the same options and state) -> gather the live rows -> pool them with the queue
(``_pool``; ``max_pool_size`` samples it) -> ``per_class_loss`` (the one method a loss
writes) -> reduce -> enqueue. A loss declares its options once, in its ``options`` table
(``_options``), from which validation, agreement and ``extra_repr`` follow.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from typing import Any, ClassVar

import torch
from torch import Tensor

from . import _device, _distributed, _exchange, _validation
from ._device import true_indices
from ._exchange import Agreed
from ._group_handle import ProcessGroupHandle, caller_stacklevel
from ._options import Option, choice, flag, integer, local, real, validated
from ._pool import Pool, Rows
from ._queue import MemoryQueue
from ._sampling import uniform_sample
from .functional import positive_columns, reduce_per_class

STATE_VERSION = 2  # of get_extra_state() and the queue; 0: no version saved, 2: queue.iid saved

LossOutput = Tensor | tuple[Tensor, Tensor, Tensor]

# The options every queued ranking loss has, declared once; a loss passes them through.
BASE_OPTIONS: tuple[Option, ...] = (
    integer("num_classes", 1),
    integer("queue_size", 0, default=1024),
    choice("reduction", ("mean", "sum", "none"), default="mean"),
    integer("ignore_index", default=-100),
    flag("update_queue_in_eval", default=False),  # agreed through what a step does
    flag("gather_distributed", optional=True, default=None),  # a rank not gathering can't agree
    integer("max_pool_size", 1, optional=True, default=None),
    integer("seed", 0, default=0),
    local("process_group", default=None),
)
# Options the base serves for the losses that declare them.
POSITIVES = choice("positives", ("pool", "live"), default="pool")
TEMPERATURE = real(
    "temperature", lambda t: t > 0, "a finite float > 0", fix=_exchange.TEMPERATURE_FIX
)


class QueuedRankingLoss(ProcessGroupHandle):
    """Base class for ranking losses over a pool of live rows plus a memory queue.

    A loss declares ``options`` (``BASE_OPTIONS`` plus its own, e.g. ``TEMPERATURE``) and
    implements :meth:`per_class_loss`. It needs no ``__init__``: the base takes
    ``num_classes`` and the other options by keyword; a loss that keeps a published
    positional signature passes it through (``super().__init__(**arguments(locals()))``),
    and an argument its table does not declare is refused (``TypeError``). Under DDP
    the forward gathers all ranks' rows (of ``process_group``) in rank order with two
    collectives (metadata, then rows) and the gradient equals the single-process gradient
    of the global batch after DDP's averaging. A loss whose gradient flows only through
    each row's own-class score sets ``own_class_gradient_only = True``: the gathered rows
    then travel detached and only a ``[rows]`` vector carries gradient.

    A loss that declares ``TEMPERATURE`` lets users anneal it by assignment; ranks agree
    on it and ``state_dict()`` saves it. The forward always runs eagerly: inside a compiled
    program (``torch.compile``) it is a graph break.
    """

    options: ClassVar[tuple[Option, ...]] = BASE_OPTIONS
    own_class_gradient_only: ClassVar[bool] = False
    positives: str = "pool"  # for a loss that does not declare POSITIVES
    _temperature: float  # set only by losses that declare TEMPERATURE
    num_classes: int
    queue_size: int
    reduction: str
    ignore_index: int
    update_queue_in_eval: bool
    gather_distributed: bool | None
    max_pool_size: int | None
    seed: int
    process_group: Any

    def __init__(self, num_classes: int, **options: Any) -> None:
        super().__init__()
        options = {"num_classes": num_classes, **options}
        for name, value in validated(type(self).__name__, self.options, options).items():
            setattr(self, name, value)
        self.subsample_step = 0
        self.queue = MemoryQueue(self.queue_size, self.num_classes)
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ hooks
    def per_class_loss(self, pool: Pool) -> tuple[Tensor, Tensor]:
        """``(loss [C], valid [C] bool)`` for a non-empty pool; invalid entries are ignored."""
        raise NotImplementedError

    # ----------------------------------------------------------------- public
    @property
    def temperature(self) -> float:
        """Sigmoid width; assign a new value to anneal it (kept in ``state_dict()``)."""
        if not self._has_temperature():
            raise AttributeError(f"{type(self).__name__} has no temperature")
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self._temperature = TEMPERATURE.check(value)

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
        step = integer("subsample_step", 0).check(
            int(state.get("subsample_step", self.subsample_step))
        )
        saved = state.get("temperature")
        if saved is not None and self._has_temperature():
            saved = TEMPERATURE.check(saved)
            if saved != self._temperature:
                warnings.warn(
                    f"the checkpoint's temperature={saved} replaces this loss's "
                    f"temperature={self._temperature} (a run anneals it by hand, and "
                    "resuming continues from the saved value); assign loss_fn.temperature "
                    "after loading to use another",
                    UserWarning,
                    stacklevel=caller_stacklevel(),
                )
            self._temperature = saved
        self.subsample_step = step

    def extra_repr(self) -> str:
        """Every option but the process group, in table order, then the group if any."""
        shown = [o.name for o in self.options if o.name != "process_group"]
        return ", ".join(f"{n}={getattr(self, n)!r}" for n in shown) + self._group_repr()

    @torch.compiler.disable
    def forward(
        self,
        logits: Tensor,
        targets: Tensor,
        iid_mask: Tensor | None = None,
        return_per_class: bool = False,
        *,
        sample_weight: Tensor | None = None,
        update_queue: bool | None = None,
    ) -> LossOutput:
        """Loss of ``logits`` ``[N, C]`` against ``targets`` ``[N]`` over the pooled rows.

        Returns a scalar (``mean``/``sum``) or ``[C]`` (``none``, NaN for
        classes without a positive); with ``return_per_class=True`` the triple
        ``(loss, per_class [C] NaN where invalid, valid [C] bool)``.
        ``iid_mask [N]`` bool marks the rows drawn i.i.d. from the population (default:
        all); it travels with the rows through the gather and the queue
        (``Rows.iid``), for losses that estimate population quantiles.
        ``update_queue``: write this step's rows to the queue (``True``) or not
        (``False``); ``None`` follows the mode (train mode, or
        ``update_queue_in_eval``). Pass ``False`` for a validation pass with the
        loss left in train mode. Always eager, also inside ``torch.compile``.
        """
        self._warn_if_running_alone()
        updates_state = self._updates_state(update_queue)
        live, num_finite = self._agreed_live_rows(
            logits, targets, iid_mask, sample_weight, update_queue, updates_state
        )
        pool = self._pool(live, advance_sample=updates_state)
        anchor = live.scores if live.own is None else live.own
        if pool.size == 0:
            # Nothing to rank; still connected to the (empty) graph, so backward() works
            # for every reduction, "none" included.
            per_class = live.scores.new_zeros(self.num_classes) + anchor.sum() * 0.0
            valid = torch.zeros(self.num_classes, dtype=torch.bool, device=live.scores.device)
        else:
            per_class, valid = self.per_class_loss(pool)
        loss = reduce_per_class(per_class, valid, self.reduction, anchor=anchor)
        if updates_state and self.queue.capacity > 0:
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
        warnings.warn(message, UserWarning, stacklevel=caller_stacklevel())

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
        """Whether this forward writes the queue and advances the subsampling step."""
        if update_queue is None:
            update_queue = self.training or self.update_queue_in_eval
        return update_queue is True

    def _agreement(
        self, logits: Any, sample_weight: Any, iid_mask: Any, updates_state: bool
    ) -> list[Agreed]:
        """What every rank must agree on this step: options, call options and state."""
        queue = self.queue
        agreed = [o.agreed(getattr(self, o.name)) for o in self.options if o.agree]
        return agreed + [
            Agreed("sample_weight given (1) or not (0)", float(sample_weight is not None)),
            Agreed("iid_mask given (1) or not (0)", float(iid_mask is not None)),
            Agreed(
                "whether this step updates the loss state (train/eval mode, update_queue)",
                float(updates_state),
            ),
            Agreed("queue fill count", queue.count, _exchange.QUEUE_FIX),
            Agreed("queue write position", queue.ptr, _exchange.QUEUE_FIX),
            Agreed("subsampling step", self.subsample_step, _exchange.CHECKPOINT_FIX),
            Agreed(
                "logits dtype",
                _exchange.dtype_code(logits.dtype if isinstance(logits, Tensor) else None),
                _exchange.LOGITS_DTYPE_FIX,
                _exchange.dtype_name,
            ),
            Agreed(
                "loss dtype (its queue)",
                _exchange.dtype_code(queue.scores.dtype),
                _exchange.LOSS_DTYPE_FIX,
                _exchange.dtype_name,
            ),
        ]

    def _agreed_live_rows(
        self,
        logits: Tensor,
        targets: Tensor,
        iid_mask: Tensor | None,
        sample_weight: Tensor | None,
        update_queue: Any,
        updates_state: bool,
    ) -> tuple[Rows, int]:
        """This step's non-padding rows of every rank in rank order, and how many are finite.

        Checks this rank's inputs (value checks stay on the device and ride in the metadata
        row, so the whole validation costs the one host sync the gather needs anyway) and
        agrees with every rank; raises on every rank, before any state changes, when any
        rank's input is invalid or the ranks disagree.
        """
        device = self.queue.scores.device
        problem = _validation.static_problem(
            logits, targets, sample_weight, self.num_classes, device, iid_mask
        )
        if problem is None and update_queue is not None and not isinstance(update_queue, bool):
            problem = f"update_queue must be None, True or False, got {update_queue!r}"
        check = _exchange.Check(problem)
        if problem is None:
            dtype = torch.promote_types(
                torch.promote_types(logits.dtype, self.queue.scores.dtype), torch.float32
            )
            tgt = targets.reshape(-1).long()
            keep = tgt != self.ignore_index
            if sample_weight is None:
                weights = torch.ones((), dtype=dtype, device=device).expand(tgt.shape[0])
            else:
                weights = sample_weight.detach().to(dtype)
            positive = keep & (tgt == 1) if self.num_classes == 1 else keep
            check = _exchange.Check(
                rows=keep.sum(),
                flags={
                    "targets": _validation.bad_targets(tgt, self.num_classes, self.ignore_index),
                    "weights": sample_weight is not None and _validation.bad_weights(weights),
                },
                counts={
                    "finite": (torch.isfinite(logits).all(dim=1) & keep).sum(),
                    "positives": positive.sum(),
                },
            )
        agreed = _exchange.agree(
            check,
            self._agreement(logits, sample_weight, iid_mask, updates_state),
            flags={
                "targets": lambda: _validation.describe_bad_targets(
                    targets, self.num_classes, self.ignore_index
                ),
                "weights": lambda: _validation.describe_bad_weights(sample_weight),
            },
            counts=("finite", "positives"),
            device=device,
            distributed=_distributed.should_gather(self.gather_distributed, self.process_group),
            group=self.process_group,
        )
        # agree() raised on every rank if any rank had a problem: this rank's rows exist.
        iid = None if iid_mask is None else iid_mask.detach().bool()
        scores, tgt, weights = agreed.keep(keep, logits.to(dtype), tgt, weights)
        if iid is not None:
            (iid,) = agreed.keep(keep, iid)
        if agreed.distributed:
            live = self._gather(agreed, scores, tgt, weights, iid)
        else:
            live = Rows(scores, tgt, weights, iid)
        live.num_positives = agreed.total("positives")
        return live, agreed.total("finite")

    def _gather(
        self,
        agreed: _exchange.Exchange,
        scores: Tensor,
        targets: Tensor,
        weights: Tensor,
        iid: Tensor | None = None,
    ) -> Rows:
        """All ranks' rows in rank order (one collective), with the exact gradient rule."""
        extra = [targets.to(scores.dtype), weights] + (
            [] if iid is None else [iid.to(scores.dtype)]
        )
        packed, n = torch.stack(extra, dim=1), len(extra)
        if self.own_class_gradient_only:
            column = positive_columns(targets, self.num_classes).clamp(min=0)
            scores, packed, own = _distributed.gather_own_column(
                scores, column, packed, agreed.sizes, agreed.group
            )
        else:
            own = None
            rows = agreed.gather(torch.cat([scores, packed], dim=1))
            scores, packed = rows[:, :-n], rows[:, -n:]
        gathered_iid = None if iid is None else packed[:, 2].bool()
        return Rows(scores, packed[:, 0].long(), packed[:, 1], gathered_iid, own)

    def _enqueue(self, live: Rows, num_finite: int) -> None:
        """Write the live rows (detached) to the queue; rows with inf/NaN never take a slot."""
        rows = live
        if num_finite < live.scores.shape[0]:
            rows = live.take(true_indices(torch.isfinite(live.scores).all(dim=1), num_finite))
        self.queue.push(rows.scores.detach(), rows.targets, rows.weights, rows.iid)

    def _pool(self, live: Rows, *, advance_sample: bool) -> Pool:
        """Live rows plus the queue; a capped pool gets its sample (and warns once).

        Only a forward that updates the state (``advance_sample``) moves the
        sample stream on: evaluation draws the sample of the next training step
        and leaves the step, so validating does not change training.
        """
        q_scores, q_targets, q_weights = self.queue.rows()
        dtype = live.scores.dtype
        queued = Rows(q_scores.to(dtype), q_targets, q_weights.to(dtype), self.queue.iid_rows())
        pool = Pool(live, queued, self.num_classes, positives_from=self.positives)
        cap = self.max_pool_size
        if cap is not None and pool.size > cap:
            self._warn_once(
                "max_pool_size",
                f"{type(self).__name__}: pool size {pool.size} exceeds max_pool_size={cap}; "
                f"the loss now estimates over a uniform sample of {cap} pooled rows, redrawn at "
                "each training step, so it is a stochastic approximation. (This warning is "
                "shown once per instance; reset_queue() re-arms it.)",
            )
            rows = self._subsample(pool.size).sort().values  # on the host: no sync
            pool.threshold_rows = _device.to_device(rows, live.scores.device)
            self.subsample_step += int(advance_sample)
        return pool

    def _subsample(self, size: int) -> Tensor:
        """``max_pool_size`` rows of ``size``, uniform without replacement, seeded by (seed, step).

        From a private generator (the global RNG is untouched), so every rank
        draws the same rows, and a resumed run the rows it would have drawn.
        """
        # torch's CPU generator keeps only 32 bits of its seed: hash both parts into them.
        digest = hashlib.blake2b(f"{self.seed},{self.subsample_step}".encode(), digest_size=4)
        generator = torch.Generator().manual_seed(int.from_bytes(digest.digest(), "little"))
        assert self.max_pool_size is not None
        return uniform_sample(size, self.max_pool_size, generator)
