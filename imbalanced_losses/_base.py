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

# Of get_extra_state() and the queue; 0: no version saved, 2: queue.iid saved, 3: the queue is
# one rank's shard (sharded mode; saved with the rank and world it belongs to). A gathered
# loss still saves 2, so older versions read its checkpoints; they refuse a shard.
STATE_VERSION = 3
_GATHERED_STATE_VERSION = 2
WHOLE = "whole"  # the queue holds rows of every rank (gathered mode, or one process)

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
    flag("sharded", agree=True, default=False),  # a rank pooling alone would be another pool
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

    ``sharded=True`` (a loss that sets ``supports_sharded``): nothing is gathered; each rank
    keeps a queue shard of ``queue_size // world_size`` of its own rows, and
    :meth:`per_class_loss` gets this rank's rows (``Pool.sharded``) and reduces per-class
    statistics over ``Pool.group`` with the same gradient rule (docs/ddp.md, "Sharded mode").

    A loss that declares ``TEMPERATURE`` lets users anneal it by assignment; ranks agree
    on it and ``state_dict()`` saves it. The forward always runs eagerly: inside a compiled
    program (``torch.compile``) it is a graph break.
    """

    options: ClassVar[tuple[Option, ...]] = BASE_OPTIONS
    own_class_gradient_only: ClassVar[bool] = False
    # Whether per_class_loss handles a sharded pool (Pool.sharded): reduces statistics over
    # Pool.group instead of reading rows. A loss that does not refuses sharded=True.
    supports_sharded: ClassVar[bool] = False
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
    sharded: bool
    process_group: Any

    def __init__(self, num_classes: int, **options: Any) -> None:
        super().__init__()
        options = {"num_classes": num_classes, **options}
        for name, value in validated(type(self).__name__, self.options, options).items():
            setattr(self, name, value)
        name = type(self).__name__
        if self.sharded and not type(self).supports_sharded:
            raise ValueError(
                f"sharded=True: {name} has no sharded mode (its per_class_loss reads every "
                "pooled row); expected sharded=False for this loss"
            )
        if self.sharded and self.max_pool_size is not None:
            raise ValueError(
                f"max_pool_size={self.max_pool_size} with sharded=True: the sample is drawn "
                "from the gathered pool's row order, which no rank holds in sharded mode; "
                "expected max_pool_size=None with sharded=True (or sharded=False)"
            )
        self.subsample_step = 0
        # Training steps since the queue was last emptied: the one queue state every rank
        # shares in sharded mode (shards fill at their own pace), so it is agreed there.
        self.queue_writes = 0
        # Sharded: this rank's shard, sized for the world known now; resized at the first
        # forward (when the world is known for sure) while it is empty.
        rank, world = self._shard_world()
        self.queue = MemoryQueue(self.queue_size // world, self.num_classes, per_rank=self.sharded)
        # Whose rows the queue holds: WHOLE, (rank, world) of a shard, or None (none yet).
        self._queue_of: str | tuple[int, int] | None = None
        self._warned: set[str] = set()
        self.register_load_state_dict_post_hook(_settle_loaded_queue)

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
        self.queue_writes = 0
        self._warned.clear()

    def get_extra_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "version": _GATHERED_STATE_VERSION,
            "subsample_step": self.subsample_step,
        }
        if self._has_temperature():
            state["temperature"] = self._temperature
        if isinstance(self._queue_of, tuple):  # a shard: whose rows, so a resume can tell
            state["version"] = STATE_VERSION
            state["shard"] = list(self._queue_of)
            state["queue_writes"] = self.queue_writes  # agreed across the shards
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
        # Missing (a gathered-mode or one-rank checkpoint): 0 on every rank that loads it.
        self.queue_writes = integer("queue_writes", 0).check(int(state.get("queue_writes", 0)))
        self._load_queue_owner(state.get("shard"))

    def _load_queue_owner(self, shard: Any) -> None:
        """Note whose rows the checkpoint's queue holds; the next forward decides what to keep.

        Runs before the queue's own buffers load (a module's extra state loads before its
        children), so it tells the queue which capacity to accept: a shard of
        ``queue_size // world`` rows, or the whole queue.
        """
        if shard is None:
            self._queue_of = WHOLE
            self.queue.load_capacity = None if not self.sharded else self.queue_size
            return
        if (
            not isinstance(shard, (list, tuple))
            or len(shard) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in shard)
            or not 0 <= shard[0] < shard[1]
        ):
            raise ValueError(
                f"loss state: shard must be [rank, world] with 0 <= rank < world, got {shard!r}"
            )
        rank, world = shard
        self._queue_of = WHOLE if world == 1 else (rank, world)
        self.queue.load_capacity = self.queue_size // world

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
        live, num_finite, shards = self._agreed_live_rows(
            logits, targets, iid_mask, sample_weight, update_queue, updates_state
        )
        pool = self._pool(live, advance_sample=updates_state, shards=shards)
        anchor = live.scores if live.own is None else live.own
        # Sharded: the global pool size, the same on every rank, picks the branch (a rank
        # with no rows of its own still joins the collectives of a non-empty pool).
        if (pool.global_size if pool.sharded else pool.size) == 0:
            # Nothing to rank; still connected to the (empty) graph, so backward() works
            # for every reduction, "none" included.
            per_class = live.scores.new_zeros(self.num_classes) + anchor.sum() * 0.0
            valid = torch.zeros(self.num_classes, dtype=torch.bool, device=live.scores.device)
        else:
            per_class, valid = self.per_class_loss(pool)
        loss = reduce_per_class(per_class, valid, self.reduction, anchor=anchor)
        if updates_state and self.queue.capacity > 0:
            self._enqueue(live, num_finite)
        self.queue_writes += int(updates_state)
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
            # Sharded: each rank's shard fills at its own pace; its count rides in the
            # metadata row instead ("queued"), and the ranks agree on the training steps
            # since the shards were emptied (a reset or a load on some ranks only shows there).
            Agreed("queue fill count", queue.count, *_QUEUE_SHOWN)
            if not self.sharded
            else Agreed(
                "training steps written to the queue shards since they were emptied",
                self.queue_writes,
                _exchange.QUEUE_FIX,
            ),
            Agreed("queue write position", -1 if self.sharded else queue.ptr, *_QUEUE_SHOWN),
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
    ) -> tuple[Rows, int, tuple[Any, int, bool] | None]:
        """This step's non-padding rows of every rank in rank order, and how many are finite.

        Checks this rank's inputs (value checks stay on the device and ride in the metadata
        row, so the whole validation costs the one host sync the gather needs anyway) and
        agrees with every rank; raises on every rank, before any state changes, when any
        rank's input is invalid or the ranks disagree. Sharded (and distributed): this
        rank's rows only, their finite count, and ``(group, global pool size)``; else the
        third item is None.
        """
        distributed = _distributed.should_gather(self.gather_distributed, self.process_group)
        rank, world = _distributed.world(self.process_group) if distributed else (0, 1)
        # Before the agreement: the shard's row count rides in the metadata row. It only
        # settles what a loaded checkpoint left (the same on any retry), never this step.
        self._prepare_queue(rank, world)
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
                    # A host number: copied without blocking (pinned) on CUDA.
                    "queued": _device.to_device(torch.tensor(self.queue.count), device),
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
            counts=("finite", "positives", "queued"),
            device=device,
            distributed=distributed,
            group=self.process_group,
        )
        # agree() raised on every rank if any rank had a problem: this rank's rows exist.
        sharded = self.sharded and agreed.distributed
        if sharded:
            self._check_shard_capacity(len(agreed.sizes))  # the same verdict on every rank
        iid = None if iid_mask is None else iid_mask.detach().bool()
        scores, tgt, weights = agreed.keep(keep, logits.to(dtype), tgt, weights)
        if iid is not None:
            (iid,) = agreed.keep(keep, iid)
        if sharded:
            live = Rows(scores, tgt, weights, iid)
            live.num_positives = int(agreed.mine("positives"))
            pool_size = sum(agreed.sizes) + agreed.total("queued")
            full = agreed.total("queued") == len(agreed.sizes) * self.queue.capacity
            return live, int(agreed.mine("finite")), (agreed.group, pool_size, full)
        if agreed.distributed:
            live = self._gather(agreed, scores, tgt, weights, iid)
        else:
            live = Rows(scores, tgt, weights, iid)
        live.num_positives = agreed.total("positives")
        return live, agreed.total("finite"), None

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

    # ----------------------------------------------------------- sharded queue
    def _known_world(self) -> tuple[int, int] | None:
        """``(rank, size)`` of the ranks this loss pools now (``(0, 1)`` alone), or None while
        that cannot be known (not a member of the group yet)."""
        try:
            distributed = _distributed.should_gather(self.gather_distributed, self.process_group)
            return _distributed.world(self.process_group) if distributed else (0, 1)
        except (RuntimeError, ValueError):
            return None

    def _shard_world(self) -> tuple[int, int]:
        """``(rank, size)`` a shard is sized for at construction: ``(0, 1)`` unless sharded
        under an initialised group (the first forward resizes an empty shard if need be)."""
        return (self._known_world() or (0, 1)) if self.sharded else (0, 1)

    def _settle_loaded_queue(self) -> None:
        """After a load: keep, split or empty the loaded queue now if the world is known
        (else at the first forward), so a resumed run's state is settled before any step."""
        if self.sharded and not _distributed.is_initialized():
            return
        known = self._known_world()
        if known is None:  # not in the group yet: at the first forward
            return
        rank, world = known
        if 0 < self.queue_size < world and self.sharded:
            return  # refused at the first forward, on every rank alike
        self._prepare_queue(rank, world)

    def _check_shard_capacity(self, world: int) -> None:
        """Refuse a queue too small to give every rank a shard (raised on every rank alike)."""
        if 0 < self.queue_size < world:
            raise ValueError(
                f"queue_size={self.queue_size} with sharded=True over {world} ranks leaves each "
                f"rank a shard of queue_size // {world} = 0 rows; expected queue_size >= "
                f"{world} (each rank keeps queue_size // world_size of its own rows; a multiple "
                "of the global batch keeps the pool the gathered mode's) or queue_size=0 for "
                "no queue"
            )

    def _prepare_queue(self, rank: int, world: int) -> None:
        """Make the queue the one this step pools: a shard of ``(rank, world)`` or the whole.

        A fresh or empty queue is resized silently. A whole queue (a gathered-mode checkpoint)
        entering sharded mode is split: row ``i`` of its FIFO order goes to rank ``i % world``,
        so the shards' union is the same pool and, with equal per-rank batches, they evict
        what the whole queue would. Anything else (a shard of another rank or world, a shard
        entering gathered mode) is emptied with a warning: its rows would be counted twice,
        or belong to another rank.
        """
        sharded = self.sharded and world > 1
        target: str | tuple[int, int] = (rank, world) if sharded else WHOLE
        capacity = self.queue_size // world if sharded else self.queue_size
        queue, held = self.queue, self._queue_of
        if capacity == 0 and self.queue_size > 0:
            return  # refused after the agreement, on every rank (_check_shard_capacity)
        if held == target and queue.capacity == capacity:
            return
        if queue.count == 0 or (held is None and queue.capacity == capacity):
            if queue.capacity != capacity:
                queue.resize(capacity)
        elif held == WHOLE and sharded and queue.capacity == self.queue_size:
            queue.keep_every(world, rank, capacity)
        else:
            queue.resize(capacity)
            self._warned.discard("shard emptied")
            self._warn_once("shard emptied", _emptied_message(held, target, type(self).__name__))
        self._queue_of = target

    def _pool(
        self, live: Rows, *, advance_sample: bool, shards: tuple[Any, int, bool] | None = None
    ) -> Pool:
        """Live rows plus the queue; a capped pool gets its sample (and warns once).

        Only a forward that updates the state (``advance_sample``) moves the
        sample stream on: evaluation draws the sample of the next training step
        and leaves the step, so validating does not change training.
        """
        q_scores, q_targets, q_weights = self.queue.rows()
        dtype = live.scores.dtype
        queued = Rows(q_scores.to(dtype), q_targets, q_weights.to(dtype), self.queue.iid_rows())
        pool = Pool(live, queued, self.num_classes, positives_from=self.positives)
        if shards is not None:  # this rank's rows; no sample (refused at construction)
            pool.sharded, (pool.group, pool.global_size, pool.shards_full) = True, shards
            return pool
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


def _settle_loaded_queue(module: QueuedRankingLoss, _incompatible_keys: Any) -> None:
    """``load_state_dict`` post-hook (module level: a loss stays picklable)."""
    module._settle_loaded_queue()


_QUEUE_SHOWN = (
    _exchange.QUEUE_FIX,
    lambda v: "per rank (sharded=True)" if v == -1 else _exchange.number(v),
)


def _emptied_message(held: Any, target: Any, name: str) -> str:
    """Why a loaded queue could not be kept: whose rows it held, and whose this step pools."""
    if isinstance(held, tuple):
        had = f"rank {held[0]}'s shard of a sharded run over {held[1]} ranks"
    else:
        had = "every rank's rows (a gathered-mode queue)"
    if isinstance(target, tuple):
        now = f"rank {target[0]} of {target[1]} with sharded=True"
        why = (
            "its rows would be counted twice or stand for another rank's; only the same rank "
            "at the same world size restores its shard, and a gathered-mode checkpoint is split"
        )
    else:
        now = "a loss that pools every rank's rows itself (gathered mode, or one process)"
        why = "it holds one rank's share of the pool only"
    return (
        f"{name}: the loaded queue holds {had}, but this is {now}; the queue starts empty "
        f"({why}). The rest of the loss state (temperature, subsampling step) was restored. "
        "(Shown once per instance.)"
    )
