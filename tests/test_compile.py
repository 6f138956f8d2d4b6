"""torch.compile: a compiled model feeding the loss, and a compiled loss, equal the eager run.

The loss's forward always runs eagerly (``torch.compiler.disable``): pool sizes are data
dependent and the forward talks to torch.distributed. So ``torch.compile(loss_fn)`` is a graph
break around the loss, never a crash. The compiled model uses the "aot_eager" backend (the
traced forward and backward graphs, without Inductor's C++ build, which is slow on this CPU
machine); ``torch.compile(loss_fn)`` uses the default backend (Inductor), since the loss's
forward is never handed to it.
"""

from __future__ import annotations

import pytest
import torch

from imbalanced_losses import RecallAtQuantileLoss

pytestmark = pytest.mark.filterwarnings("ignore:.*pool.*:UserWarning")

STEPS = 4


def _batches():
    gen = torch.Generator().manual_seed(0)
    for _ in range(STEPS):
        x = torch.randn(16, 5, generator=gen)
        yield x, torch.randint(0, 3, (16,), generator=gen)


def _train(compile_model: bool, compile_loss: bool):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    loss_fn = RecallAtQuantileLoss(3, quantile=0.3, queue_size=32, temperature=0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    run_model = torch.compile(model, backend="aot_eager") if compile_model else model
    run_loss = torch.compile(loss_fn) if compile_loss else loss_fn
    losses = []
    for x, y in _batches():
        optimizer.zero_grad()
        loss = run_loss(run_model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    params = [p.detach().clone() for p in model.parameters()]
    return torch.stack(losses), params, loss_fn.queue.scores.clone(), loss_fn.queue.count


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize(
    "compile_model,compile_loss", [(True, False), (False, True)], ids=["model", "loss"]
)
def test_compiled_run_equals_the_eager_run(compile_model, compile_loss):
    eager = _train(False, False)
    compiled = _train(compile_model, compile_loss)
    assert compiled[3] == eager[3] == 32  # the queue filled up over the steps
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-6)
    for got, want in zip(compiled[1], eager[1]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled[2], eager[2], rtol=1e-5, atol=1e-6)
