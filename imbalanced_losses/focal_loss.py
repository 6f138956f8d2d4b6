"""Focal losses (Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017).

Per-element losses, so unlike the queued ranking losses they need nothing from other rows,
except for the normaliser of ``"mean"`` and ``"mean_positive"``. What
``gather_distributed`` means for them: each rank computes its own elements' losses, the
ranks agree on inputs and options (one small metadata collective, the exchange protocol of
``_exchange``), then ``"mean"``, ``"mean_positive"`` and ``"sum"`` all-reduce two numbers (the
sum of the weighted losses and the denominator's mass, in at least float32), so the traffic
does not grow with the batch. The value is the global batch's on every rank; the gradient of
a rank's elements is ``group size x`` their single-process gradient (the gather's rule, see
``_distributed``), so DDP's average equals the single-process gradient exactly, also with
uneven or empty ranks, ignored positions and weights, where a per-rank mean is off.
``reduction="none"`` gathers the global batch's per-element losses (``[rows, elements per
row]``), as the reference does. Alone (no pooling) the forward makes no collective and one
host read: the value checks, so bad targets or weights raise a ``ValueError`` naming the
argument on every device rather than a device-side assert that ends the CUDA context.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _distributed, _exchange, _validation
from ._exchange import Agreed
from ._group_handle import ProcessGroupHandle, caller_stacklevel
from ._options import Option, arguments, flag, integer, local, real, validated

__all__ = ["SigmoidFocalLoss", "SoftmaxFocalLoss"]

_DTYPE_FIX = (
    "pass inputs of one dtype on every rank (the same model precision, autocast and "
    ".to(dtype) on every rank)"
)
_ALPHA_FIX = (
    "build the loss with the same alpha on every rank, and load a checkpoint on every rank "
    "(load_state_dict on one rank only leaves the others behind)"
)
_HASH_BASE = 1_000_003.0
_HASH_MOD = 2.0**52  # exact in float64


def _shape_code(shape: Sequence[int]) -> float:
    """A number that differs for different trailing shapes (agreed across ranks)."""
    code = float(len(shape))
    for d in shape:
        code = (code * _HASH_BASE + d) % _HASH_MOD
    return code


def _reduction(supported: tuple[str, ...]) -> Option:
    """``reduction``, refused with the reference's words; ranks agree on it."""

    def check(value: Any) -> str:
        if value not in supported:
            modes = ", ".join(repr(m) for m in supported)
            raise ValueError(f"Invalid reduction: {value!r}. Supported modes: {modes}.")
        return str(value)

    return Option(
        "reduction", check, "mean", encode=supported.index, show=lambda c: repr(supported[int(c)])
    )


def _sigmoid_alpha(alpha: Any) -> float:
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, (int, float))
        or not (0.0 <= alpha <= 1.0 or alpha == -1)
    ):
        raise ValueError(
            f"Invalid alpha value: {alpha!r}. alpha must be in [0, 1] or -1 for ignore."
        )
    return float(alpha)


def _class_weights(alpha: Any) -> Tensor | None:
    if alpha is None:
        return None
    weights = torch.as_tensor(alpha, dtype=torch.float32)
    if weights.ndim != 1:
        raise ValueError(
            f"alpha must be a 1-D tensor of shape (C,), got shape {tuple(weights.shape)}"
        )
    if not (torch.isfinite(weights).all() and (weights >= 0).all()):
        raise ValueError(f"alpha must be finite and non-negative, got {weights.tolist()}")
    return weights


GAMMA = real("gamma", lambda g: g >= 0, "a finite number >= 0", default=2.0)
# Each rank's own: a rank that does not gather cannot agree; the group is a local handle.
GATHER = (flag("gather_distributed", optional=True, default=None), local("process_group"))


def _weight_problem(sample_weight: Any, inputs: Tensor, reference: str, like: Tensor) -> str | None:
    """Shape/dtype/device problem of ``sample_weight`` (``reference``: what dim 0 must match)."""
    if sample_weight is None:
        return None
    if not isinstance(sample_weight, Tensor) or not sample_weight.is_floating_point():
        seen = _validation.describe(sample_weight)
        return f"sample_weight must be a floating-point tensor, got {seen}"
    if sample_weight.device != inputs.device:
        return f"sample_weight is on {sample_weight.device} but inputs are on {inputs.device}"
    n = like.shape[0] if like.dim() else 0
    if sample_weight.dim() == 0 or sample_weight.shape[0] != n:
        return (
            f"sample_weight must match {reference} dim-0, got {tuple(sample_weight.shape)} vs N={n}"
        )
    return None


class _FocalBase(ProcessGroupHandle):
    """The shared flow: validate and agree, per-element terms, reduce (or gather, reduce).

    A deep copy shares ``process_group`` and a pickle leaves it behind (``ProcessGroupHandle``,
    as the queued losses do).
    """

    options: ClassVar[tuple[Option, ...]] = ()
    _zero_weight_warned = False
    reduction: str
    gather_distributed: bool | None
    process_group: Any

    def __init__(self, **options: Any) -> None:
        """Validate the options by the loss's table (a tensor option becomes a buffer)."""
        super().__init__()
        for name, value in validated(type(self).__name__, self.options, options).items():
            if isinstance(value, Tensor):
                self.register_buffer(name, value)
            else:
                setattr(self, name, value)

    def extra_repr(self) -> str:
        shown = [o.name for o in self.options if o.name != "process_group"]
        return ", ".join(f"{n}={getattr(self, n)!r}" for n in shown) + self._group_repr()

    # Subclasses: host-only input checks and the per-element terms.
    def _static_problem(self, inputs: Any, targets: Any, sample_weight: Any) -> str | None:
        raise NotImplementedError

    def _config(self) -> list[Agreed]:
        """The values every rank must hold: the agreed options of the table."""
        return [o.agreed(getattr(self, o.name)) for o in self.options if o.agree]

    def _agreed_shapes(self, inputs: Tensor | None) -> list[Agreed]:
        """Input sizes beyond dim 0 that every rank must share (``None``: a placeholder row)."""
        return []

    def _elements(
        self, inputs: Tensor, targets: Tensor, sample_weight: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor, torch.Size]:
        """``(numerator [n, L], denominator [n, L], bad_targets flag, trailing shape)``."""
        raise NotImplementedError

    def _describe_bad_targets(self, inputs: Tensor, targets: Tensor) -> str:
        return "targets are invalid"

    def forward(
        self, inputs: Tensor, targets: Tensor, *, sample_weight: Tensor | None = None
    ) -> Tensor:
        """The loss of ``inputs`` against ``targets`` (of every rank's, when pooling).

        Every rank checks its inputs and agrees with the others on them, the options, the
        dtype and the number of classes (one small collective, one host read) before any
        value is computed from another rank, so bad input or disagreeing ranks raise the same
        error everywhere. Alone, the same checks cost one host read and no collective.
        """
        group = self.process_group
        distributed = _distributed.should_gather(self.gather_distributed, group)
        problem = self._static_problem(inputs, targets, sample_weight)
        agreed = self._config() + [Agreed("sample_weight passed", float(sample_weight is not None))]
        check = _exchange.Check(problem)
        if problem is None:
            num, den, bad_targets, trailing = self._elements(inputs, targets, sample_weight)
            weight = sample_weight if sample_weight is not None else num.new_zeros(0)
            bad_weights = _validation.bad_weights(weight.detach())
            # Informative, not agreed on: whether this rank's weights are all zero.
            all_zero = (weight == 0).all() if weight.numel() else False
            agreed += [
                Agreed(
                    "inputs dtype",
                    _exchange.dtype_code(inputs.dtype),
                    _DTYPE_FIX,
                    _exchange.dtype_name,
                ),
                *self._agreed_shapes(inputs),
                Agreed("elements per row", float(num.shape[1])),
                Agreed("trailing shape", _shape_code(trailing)),
            ]
            check = _exchange.Check(
                rows=num.shape[0],
                flags={"targets": bad_targets, "weights": bad_weights},
                counts={"all weights zero": all_zero},
            )
        else:  # the placeholder row: the same columns, any values (the problem flag decides)
            agreed += [
                Agreed("inputs dtype", -1.0),
                *self._agreed_shapes(None),
                Agreed("elements per row", -1.0),
                Agreed("trailing shape", -1.0),
            ]
        exchange = _exchange.agree(
            check,
            agreed,
            flags={
                "targets": lambda: self._describe_bad_targets(inputs, targets),
                "weights": lambda: _validation.describe_bad_weights(sample_weight),
            },
            counts=("all weights zero",),
            device=_device_of(inputs),
            distributed=distributed,
            group=group,
        )
        if exchange.mine("all weights zero"):
            self._warn_zero_weight()
        if self.reduction == "none":
            num = exchange.gather(num)
            return num.reshape(num.shape[0], *trailing)
        if distributed:
            return self._reduce_pooled(num, den, inputs.dtype, group)
        return self._reduce(num, den, inputs.dtype)

    def _reduce_pooled(self, num: Tensor, den: Tensor, dtype: torch.dtype, group: Any) -> Tensor:
        """``"mean"``/``"sum"`` of every rank's elements from one all-reduce of two numbers.

        The value is the global sum (over the global mass); the gradient of this rank's
        elements is ``group size x`` theirs in the single process, so that DDP's average over
        the ranks is the single-process gradient (the rule the gather's backward applies).
        The traffic is two numbers per rank whatever the batch.
        """
        acc = torch.promote_types(dtype, torch.float32)
        local = num.sum(dtype=acc)
        sums = _distributed.all_reduce_sum(torch.stack([local.detach(), den.sum(dtype=acc)]), group)
        replicated = local * _distributed.world(group)[1]
        total = sums[0] + (replicated - replicated.detach())  # the value of sums[0] exactly
        if self.reduction == "sum":
            return total.to(dtype)
        mass = sums[1]
        return (total / torch.where(mass > 0, mass, torch.ones_like(mass))).to(dtype)

    def _reduce(self, num: Tensor, den: Tensor, dtype: torch.dtype) -> Tensor:
        """One process: sums run in at least float32, the result is in ``dtype``.

        Summed in float16, a count above 65,504 elements would overflow; only a result
        beyond the dtype's range (a float16 ``"sum"`` above 65,504) is ``inf``.
        """
        acc = torch.promote_types(dtype, torch.float32)
        total = num.sum(dtype=acc)
        if self.reduction == "sum":
            return total.to(dtype)
        mass = den.sum(dtype=acc)
        return (total / torch.where(mass > 0, mass, torch.ones_like(mass))).to(dtype)

    def _warn_zero_weight(self) -> None:
        if self._zero_weight_warned:
            return
        self._zero_weight_warned = True
        warnings.warn(
            f"{type(self).__name__}: sample_weight is entirely zero for this call, a likely "
            "misconfiguration: these rows contribute no loss and no gradient. "
            "(This warning is shown once per instance.)",
            UserWarning,
            stacklevel=caller_stacklevel(),
        )


def _device_of(inputs: Any) -> torch.device:
    return inputs.device if isinstance(inputs, Tensor) else torch.device("cpu")


class SigmoidFocalLoss(_FocalBase):
    r"""Sigmoid focal loss (RetinaNet): every element is an independent binary prediction.

    ``FL = -alpha_t (1 - p_t)^gamma log(p_t)`` with ``p = sigmoid(x)``,
    ``p_t = p t + (1 - p)(1 - t)``, ``alpha_t = alpha t + (1 - alpha)(1 - t)`` (Lin et al.
    2017). For multi-label or binary targets; mutually exclusive classes want
    :class:`SoftmaxFocalLoss`. Values and signature are the reference library's.

    Args:
        alpha: weight of the positives in ``[0, 1]``, or ``-1`` for none.
        gamma: focusing exponent ``>= 0`` (0 gives BCE).
        reduction: ``"mean"`` (over every element; weighted: over the weight mass),
            ``"sum"`` or ``"none"``.
        gather_distributed: ``None`` (default) pools every rank's elements when
            ``torch.distributed`` runs with more than one rank, ``False`` keeps each
            rank on its own, ``True`` insists. Pooled, every rank returns the loss of
            the rank-ordered global batch (``"none"``: its ``[N_global, ...]`` losses)
            and DDP's gradient equals the single-process gradient exactly, also with
            uneven per-rank batches (a per-rank mean is only right for equal ones).
        process_group: the ranks to pool (default: all), e.g. the data-parallel group.
            A deep copy shares it; pickling leaves it behind (the unpickled loss uses
            the default group, warns, and its repr names the group it was pickled with).

    Forward: ``inputs`` logits of any shape ``[N, ...]``; ``targets`` the same shape, 0/1
    (or soft labels in ``[0, 1]``); ``sample_weight`` ``[N, ...]`` broadcastable to
    ``inputs`` (dim 0 exactly ``N``), finite and non-negative.

    Sums and counts run in at least float32 (float16 holds no count above 65,504); the
    loss comes back in the inputs' dtype. Bad values (targets, weights) raise a
    ``ValueError`` naming the argument on every device, alone and on every rank when
    pooling; the check costs one host read per forward (a device-side assert would save
    it but end the CUDA context with a message that names nothing).
    """

    options = (
        Option("alpha", _sigmoid_alpha, 0.25),
        GAMMA,
        _reduction(("none", "mean", "sum")),
        *GATHER,
    )
    alpha: float
    gamma: float

    def __init__(
        self,
        alpha: float = 0.25,
        gamma: float = 2.0,
        reduction: str = "mean",
        gather_distributed: bool | None = None,
        *,
        process_group: Any = None,
    ) -> None:
        super().__init__(**arguments(locals()))

    def _static_problem(self, inputs: Any, targets: Any, sample_weight: Any) -> str | None:
        if not isinstance(inputs, Tensor) or not inputs.is_floating_point() or inputs.dim() == 0:
            seen = _validation.describe(inputs)
            return f"inputs must be a floating-point tensor [N, ...], got {seen}"
        if not isinstance(targets, Tensor) or targets.shape != inputs.shape:
            shape = tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__
            return f"targets must have the shape of inputs {tuple(inputs.shape)}, got {shape}"
        if targets.device != inputs.device:
            return f"targets are on {targets.device} but inputs are on {inputs.device}"
        problem = _weight_problem(sample_weight, inputs, "inputs", inputs)
        if problem is None and sample_weight is not None:
            try:
                torch.broadcast_shapes(sample_weight.shape, inputs.shape)
                broadcast_ok = sample_weight.dim() <= inputs.dim()
            except RuntimeError:
                broadcast_ok = False
            if not broadcast_ok:
                return (
                    f"sample_weight must be broadcastable to inputs, got "
                    f"{tuple(sample_weight.shape)} vs inputs {tuple(inputs.shape)}"
                )
        return problem

    def _elements(
        self, inputs: Tensor, targets: Tensor, sample_weight: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor, torch.Size]:
        t = targets.to(inputs.dtype)
        p = torch.sigmoid(inputs)
        ce = F.binary_cross_entropy_with_logits(inputs, t, reduction="none")
        p_t = p * t + (1 - p) * (1 - t)
        loss = ce * (1 - p_t) ** self.gamma
        if self.alpha >= 0:
            loss = (self.alpha * t + (1 - self.alpha) * (1 - t)) * loss
        if sample_weight is None:
            den = torch.ones_like(loss, requires_grad=False)
        else:
            w = sample_weight.detach().to(inputs.dtype)
            loss, den = loss * w, w.expand_as(loss)
        shape = (inputs.shape[0], math.prod(inputs.shape[1:]))
        no_bad = torch.zeros((), dtype=torch.bool, device=inputs.device)
        return loss.reshape(shape), den.reshape(shape).detach(), no_bad, inputs.shape[1:]


class SoftmaxFocalLoss(_FocalBase):
    r"""Softmax focal loss for mutually exclusive classes.

    ``FL = -alpha_y (1 - p_y)^gamma CE`` per position, with ``p_y`` the softmax
    probability of the true class and ``CE`` the cross-entropy (with
    ``label_smoothing``); positions whose target is ``ignore_index`` count nowhere (Lin
    et al. 2017, generalised to C classes). Values and signature are the reference
    library's.

    Args:
        alpha: per-class weights ``[C]`` (non-negative), or ``None`` for none.
        gamma: focusing exponent ``>= 0`` (0 gives cross-entropy).
        reduction: ``"mean"`` (over the valid positions; weighted: their weight mass),
            ``"mean_positive"`` (the sum over valid positions divided by the count, or
            weight mass, of the non-background ones: RetinaNet's normalisation),
            ``"sum"`` or ``"none"``.
        label_smoothing: passed to the cross-entropy.
        ignore_index: target value of positions to skip.
        background_class: the class that ``"mean_positive"`` does not count.
        gather_distributed: ``None`` (default) pools every rank's positions when
            ``torch.distributed`` runs with more than one rank, ``False`` keeps each
            rank on its own, ``True`` insists. Pooled, every rank returns the loss of
            the rank-ordered global batch (``"none"``: its ``[N_global, ...]`` losses),
            normalised by the global count, and DDP's gradient equals the
            single-process gradient exactly, with uneven batches, ignored positions and
            positives spread unevenly over the ranks.
        process_group: the ranks to pool (default: all), e.g. the data-parallel group.
            A deep copy shares it; pickling leaves it behind (the unpickled loss uses
            the default group, warns, and its repr names the group it was pickled with).

    Forward: ``inputs`` ``[N, C]`` or ``[N, C, ...]`` logits; ``targets`` ``[N]`` or
    ``[N, ...]`` class ids in ``[0, C)`` or ``ignore_index``; ``sample_weight`` of the
    targets' shape, finite and non-negative.

    Sums and counts run in at least float32 (float16 holds no count above 65,504); the
    loss comes back in the inputs' dtype. Bad values (targets, weights) raise a
    ``ValueError`` naming the argument on every device, alone and on every rank when
    pooling; the check costs one host read per forward (a device-side assert would save
    it but end the CUDA context with a message that names nothing).
    """

    options = (
        # A tensor: its length and values are agreed through a code of the buffer (_config).
        Option("alpha", _class_weights, None, agree=False),
        GAMMA,
        _reduction(("none", "mean", "mean_positive", "sum")),
        real("label_smoothing", lambda x: 0.0 <= x <= 1.0, "in [0, 1]", default=0.0),
        integer("ignore_index", default=-100),
        integer("background_class", default=0),
        *GATHER,
    )
    alpha: Tensor | None
    gamma: float
    label_smoothing: float
    ignore_index: int
    background_class: int

    def __init__(
        self,
        alpha: Tensor | Sequence[float] | None = None,
        gamma: float = 2.0,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        ignore_index: int = -100,
        background_class: int = 0,
        gather_distributed: bool | None = None,
        *,
        process_group: Any = None,
    ) -> None:
        super().__init__(**arguments(locals()))

    def _config(self) -> list[Agreed]:
        alpha = self.alpha
        return super()._config() + [
            Agreed(
                "alpha (number of entries, -1: None)", -1.0 if alpha is None else float(len(alpha))
            ),
            # From the buffer at each call (a loaded checkpoint changes it), on its device.
            Agreed("alpha values", 0.0 if alpha is None else _alpha_code(alpha), _ALPHA_FIX),
        ]

    def _agreed_shapes(self, inputs: Tensor | None) -> list[Agreed]:
        classes = -1.0 if inputs is None else float(inputs.shape[1])
        return [Agreed("number of classes (inputs.shape[1])", classes)]

    def _static_problem(self, inputs: Any, targets: Any, sample_weight: Any) -> str | None:
        if not isinstance(inputs, Tensor) or not inputs.is_floating_point() or inputs.dim() < 2:
            return (
                "inputs must be a floating-point tensor [N, C] or [N, C, ...], "
                f"got {_validation.describe(inputs)}"
            )
        expected = (inputs.shape[0], *inputs.shape[2:])
        if not isinstance(targets, Tensor) or tuple(targets.shape) != expected:
            shape = tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__
            return (
                f"targets must have shape {expected} to match inputs {tuple(inputs.shape)}, "
                f"got {shape}"
            )
        if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
            return f"targets must hold integer class ids, got dtype {targets.dtype}"
        if targets.device != inputs.device:
            return f"targets are on {targets.device} but inputs are on {inputs.device}"
        if self.alpha is not None and len(self.alpha) != inputs.shape[1]:
            return f"alpha has {len(self.alpha)} entries but inputs have {inputs.shape[1]} classes"
        problem = _weight_problem(sample_weight, inputs, "targets", targets)
        if problem is None and sample_weight is not None and sample_weight.shape != targets.shape:
            return (
                f"sample_weight must be {tuple(targets.shape)} matching targets, "
                f"got {tuple(sample_weight.shape)} vs N={targets.shape[0]}"
            )
        return problem

    def _describe_bad_targets(self, inputs: Tensor, targets: Tensor) -> str:
        c = inputs.shape[1]
        t = targets[targets != self.ignore_index]
        bad = t[(t < 0) | (t >= c)].unique()[:8].tolist()
        return (
            f"targets must be class ids in [0, {c}) or ignore_index={self.ignore_index}; "
            f"got values outside that range: {bad}"
        )

    def _elements(
        self, inputs: Tensor, targets: Tensor, sample_weight: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor, torch.Size]:
        c = inputs.shape[1]
        valid = targets != self.ignore_index
        bad = (valid & ((targets < 0) | (targets >= c))).any()
        safe = torch.where(valid & (targets >= 0) & (targets < c), targets, 0)
        # cross_entropy refuses out-of-range ids; such a batch raises after the agreement.
        ce = F.cross_entropy(
            inputs,
            torch.where(valid, safe, self.ignore_index),
            reduction="none",
            label_smoothing=self.label_smoothing,
            ignore_index=self.ignore_index,
        )
        log_p_t = F.log_softmax(inputs, dim=1).gather(1, safe.unsqueeze(1)).squeeze(1)
        loss = (1.0 - log_p_t.exp()) ** self.gamma * ce
        if self.alpha is not None:
            loss = self.alpha.to(inputs.dtype)[safe] * loss
        loss = loss * valid
        counted = (
            valid & (targets != self.background_class)
            if self.reduction == "mean_positive"
            else valid
        )
        den = counted.to(inputs.dtype)
        if sample_weight is not None:
            w = sample_weight.detach().to(inputs.dtype)
            loss, den = loss * w, den * w
        shape = (targets.shape[0], math.prod(targets.shape[1:]))
        return loss.reshape(shape), den.reshape(shape), bad, targets.shape[1:]


def _alpha_code(alpha: Tensor) -> Tensor:
    """A 0-d tensor, on ``alpha``'s device, that differs for different per-class weights."""
    index = torch.arange(1, len(alpha) + 1, dtype=torch.float64, device=alpha.device)
    return (alpha.detach().double() * index.sqrt()).sum()
