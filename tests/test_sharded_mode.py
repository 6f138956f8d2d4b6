"""``sharded=True`` in one process: what a loss refuses at construction, and that alone (one
rank: the shard is the whole queue) the sharded mode is the gathered mode, bit for bit, state
format included. The multi-rank behaviour is in ``ddp_tests/test_sharded_*.py``."""

from __future__ import annotations

import io

import pytest
import torch
from _support import random_batch

from imbalanced_losses import PAUCAtBudgetLoss, RecallAtQuantileLoss, SmoothAPLoss
from imbalanced_losses.testing._example_loss import TopQuantileHingeLoss


def test_the_recall_and_smooth_ap_losses_have_a_sharded_path_and_the_others_not():
    assert RecallAtQuantileLoss.supports_sharded and SmoothAPLoss.supports_sharded
    assert not PAUCAtBudgetLoss.supports_sharded and not TopQuantileHingeLoss.supports_sharded


@pytest.mark.parametrize("cls", [PAUCAtBudgetLoss, TopQuantileHingeLoss])
def test_a_loss_without_a_sharded_path_refuses_sharded_true_naming_it(cls):
    with pytest.raises(ValueError, match=rf"sharded=True: {cls.__name__} has no sharded mode"):
        cls(3, sharded=True)
    cls(3, sharded=False)  # the default mode stays available


def test_max_pool_size_with_sharded_is_refused_naming_both_and_why():
    with pytest.raises(ValueError, match=r"max_pool_size=64 with sharded=True: .*gathered pool"):
        RecallAtQuantileLoss(3, max_pool_size=64, sharded=True)


def test_sharded_is_a_keyword_only_option_shown_in_the_repr():
    with pytest.raises(TypeError):
        RecallAtQuantileLoss(3, 0.1, 16, 0.1, "mean", -100, False, None, "higher", None, True)
    assert "sharded=True" in repr(RecallAtQuantileLoss(3, sharded=True))
    assert "sharded=False" in repr(RecallAtQuantileLoss(3))


def _history(loss_fn, steps=6):
    gen = torch.Generator().manual_seed(3)
    out = []
    for step in range(steps):
        loss_fn.train(step != 3)
        logits, targets, weights = random_batch(gen, 7, 3, pad_frac=0.2, weighted=step % 2 == 0)
        x = logits.clone().requires_grad_()
        loss, per_class, valid = loss_fn(x, targets, sample_weight=weights, return_per_class=True)
        loss.sum().backward()
        out.append((loss.detach(), per_class, valid, x.grad))
    return out


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_alone_the_sharded_mode_is_the_gathered_mode_bit_for_bit(reduction):
    """One rank: its shard is the whole queue (queue_size // 1 rows), the same pool."""
    plain = RecallAtQuantileLoss(3, quantile=0.3, queue_size=10, reduction=reduction).double()
    sharded = RecallAtQuantileLoss(
        3, quantile=0.3, queue_size=10, reduction=reduction, sharded=True
    ).double()
    for a, b in zip(_history(plain), _history(sharded)):
        for x, y in zip(a, b):
            assert torch.equal(x.nan_to_num(), y.nan_to_num())
    assert sharded.queue.capacity == 10
    for key, value in plain.state_dict().items():
        other = sharded.state_dict()[key]
        assert torch.equal(value, other) if torch.is_tensor(value) else value == other, key


def test_a_one_rank_sharded_checkpoint_is_a_gathered_checkpoint_and_resumes_either_mode():
    sharded = RecallAtQuantileLoss(3, quantile=0.3, queue_size=10, sharded=True).double()
    _history(sharded, 4)
    buffer = io.BytesIO()
    torch.save(sharded.state_dict(), buffer)
    saved = buffer.getvalue()
    expected = [out[0] for out in _history(sharded, 2)]
    for mode in (False, True):
        resumed = RecallAtQuantileLoss(3, quantile=0.3, queue_size=10, sharded=mode).double()
        resumed.load_state_dict(torch.load(io.BytesIO(saved), weights_only=True))
        assert resumed.state_dict()["_extra_state"]["version"] == 2
        assert [out[0] for out in _history(resumed, 2)] == expected


def test_a_shard_is_no_buffer_for_ddp_to_broadcast_yet_saves_and_converts_like_one():
    plain = RecallAtQuantileLoss(3, queue_size=10)
    sharded = RecallAtQuantileLoss(3, queue_size=10, sharded=True)
    assert {name for name, _ in plain.named_buffers()} == {
        "queue.scores",
        "queue.targets",
        "queue.weights",
        "queue.iid",
    }
    assert list(sharded.named_buffers()) == []  # DDP broadcasts buffers from rank 0
    assert set(sharded.state_dict()) == set(plain.state_dict())
    sharded.double()
    assert sharded.queue.scores.dtype == torch.float64
    assert sharded.queue.targets.dtype == torch.long


def test_splitting_a_whole_queue_gives_rank_r_every_w_th_row_of_the_fifo_order():
    """Row i of the FIFO order (oldest first) to rank i % W: with equal per-rank pushes each
    rank then evicts exactly its share of what the whole queue would evict."""
    from imbalanced_losses._queue import MemoryQueue

    whole = MemoryQueue(6, 1, torch.float64)
    whole.push(torch.arange(8.0)[:, None], torch.zeros(8))  # replaces: rows 2..7, ptr 0
    whole.push(torch.arange(8.0, 10.0)[:, None], torch.zeros(2))  # FIFO: 4, 5, 6, 7, 8, 9
    for rank, expected in enumerate(([4.0, 6.0, 8.0], [5.0, 7.0, 9.0])):
        part = MemoryQueue(6, 1, torch.float64)
        part.load_state_dict(whole.state_dict())
        part.keep_every(2, rank, 3)
        assert part.capacity == part.count == 3
        assert part.rows()[0].flatten().tolist() == expected
