"""A ``once_differentiable`` that holds even when the incoming gradient is a constant."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch._C import _functions

_MESSAGE = (
    "trying to differentiate twice a function that was marked with @once_differentiable: "
    "{what} is not twice differentiable, so a gradient penalty or a second-order method "
    "(create_graph=True) cannot differentiate through it"
)


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
            raising = _functions.DelayedError(message, len(marked))(
                *(outputs[i].detach().requires_grad_() for i in marked)
            )
            raising = raising if isinstance(raising, tuple) else (raising,)
            result = list(outputs)
            for i, out in zip(marked, raising):
                result[i] = out
            return tuple(result)

        return wrapper

    return decorate
