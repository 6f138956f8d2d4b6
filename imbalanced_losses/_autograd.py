"""A ``once_differentiable`` that holds even when the incoming gradient is a constant."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

try:  # private: torch's own node for "differentiated twice"; may move in a future release
    from torch._C import _functions as _torch_functions

    _TorchDelayedError: Any = getattr(_torch_functions, "DelayedError", None)
except ImportError:  # pragma: no cover - exercised by forcing the fallback in the tests
    _TorchDelayedError = None

_MESSAGE = (
    "trying to differentiate twice a function that was marked with @once_differentiable: "
    "{what} is not twice differentiable, so a gradient penalty or a second-order method "
    "(create_graph=True) cannot differentiate through it"
)


class _RaiseOnBackward(torch.autograd.Function):
    """Pure-Python stand-in for ``DelayedError``: identity forward, a backward that raises."""

    @staticmethod
    def forward(ctx: Any, message: str, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.message = message
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:
        raise RuntimeError(ctx.message)


def _delayed_error(message: bytes, tensors: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """``tensors`` tied to a node that raises ``message`` when differentiated through.

    Uses torch's private ``DelayedError`` when it exists, else :class:`_RaiseOnBackward`, so
    ``import imbalanced_losses`` never depends on the private API.
    """
    if _TorchDelayedError is not None:
        out = _TorchDelayedError(message, len(tensors))(*tensors)
        return out if isinstance(out, tuple) else (out,)
    return _RaiseOnBackward.apply(message.decode(), *tensors)


def once_differentiable(what: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Mark a custom ``backward`` as not differentiable again, naming ``what`` in the error.

    ``torch.autograd.function.once_differentiable`` marks the gradients only when the
    incoming gradient requires grad. A loss's incoming gradient often does not (it is the
    reduction's constant weight), and then ``create_graph=True`` returns a gradient whose
    own derivative is silently zero. Here, whenever the graph is being built
    (``create_graph=True``), every gradient that reaches an input that requires grad is
    tied to a node that raises once something differentiates through it.
    """
    message = _MESSAGE.format(what=what).encode()

    def decorate(backward: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(backward)
        def wrapper(ctx: Any, *grads: Any) -> Any:
            with torch.no_grad():
                outputs = backward(ctx, *grads)
            if not torch.is_grad_enabled():
                return outputs
            outputs = outputs if isinstance(outputs, tuple) else (outputs,)
            marked = [
                i
                for i, (out, needs) in enumerate(zip(outputs, ctx.needs_input_grad))
                if isinstance(out, torch.Tensor) and needs
            ]
            if not marked:
                return outputs
            raising = _delayed_error(
                message, [outputs[i].detach().requires_grad_() for i in marked]
            )
            result = list(outputs)
            for i, out in zip(marked, raising):
                result[i] = out
            return tuple(result)

        return wrapper

    return decorate
