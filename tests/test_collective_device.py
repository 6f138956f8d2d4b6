"""Collective tensors live where the backend needs them: CUDA under NCCL, CPU under gloo.

NCCL is not available here, so the choice itself is pinned by mocking the backend, and the loss
and the metric are checked to send their metadata row to the chosen device (a stand-in device,
"meta", plays CUDA), whatever device their inputs are on.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from imbalanced_losses import RecallAtQuantileLoss, _distributed, recall_at_quantile


@pytest.fixture
def fake_world(monkeypatch):
    """An initialised 2-rank world whose backend the test picks; collectives are recorded."""
    state = {"backend": "gloo", "sent": []}
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: state["backend"])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)

    class Stop(Exception):
        pass

    def all_gather(out, tensor, group=None):
        state["sent"].append(tensor.device)
        raise Stop

    monkeypatch.setattr(dist, "all_gather", all_gather)
    state["Stop"] = Stop
    return state


@pytest.mark.parametrize(
    "backend,expected",
    [("nccl", torch.device("cuda", 3)), ("gloo", torch.device("cpu")), ("mpi", "cpu")],
)
def test_collective_device_follows_the_backend(fake_world, backend, expected):
    fake_world["backend"] = backend
    assert _distributed.collective_device() == torch.device(expected)


def test_not_initialised_means_cpu():
    assert _distributed.collective_device() == torch.device("cpu")


def _as_nccl_on_meta(fake_world, monkeypatch):
    """NCCL, with the meta device standing in for CUDA (no GPU here)."""
    fake_world["backend"] = "nccl"
    monkeypatch.setattr(_distributed, "collective_device", lambda group=None: torch.device("meta"))


def test_the_loss_sends_its_metadata_row_on_the_backend_device(fake_world, monkeypatch):
    _as_nccl_on_meta(fake_world, monkeypatch)
    loss_fn = RecallAtQuantileLoss(2, quantile=0.3)
    with pytest.raises(fake_world["Stop"]):
        loss_fn(torch.randn(4, 2), torch.tensor([0, 1, 1, 0]))
    assert fake_world["sent"] == [torch.device("meta")]
    assert loss_fn.queue.count == 0


def test_the_metric_sends_its_metadata_row_on_the_backend_device(fake_world, monkeypatch):
    _as_nccl_on_meta(fake_world, monkeypatch)
    with pytest.raises(fake_world["Stop"]):
        recall_at_quantile(torch.randn(4, 2), torch.tensor([0, 1, 1, 0]), 0.3)
    assert fake_world["sent"] == [torch.device("meta")]


def test_a_cpu_row_gather_under_nccl_moves_to_the_backend_device(fake_world, monkeypatch):
    _as_nccl_on_meta(fake_world, monkeypatch)
    with pytest.raises(fake_world["Stop"]):
        _distributed.gather_rows(torch.randn(3, 2), [3, 1])
    assert fake_world["sent"] == [torch.device("meta")]


def test_under_gloo_rows_stay_on_their_device(fake_world):
    with pytest.raises(fake_world["Stop"]):
        _distributed.gather_rows(torch.randn(3, 2), [3, 1])
    assert fake_world["sent"] == [torch.device("cpu")]
