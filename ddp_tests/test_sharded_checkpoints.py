"""What a queue shard does when a checkpoint is loaded (docs/ddp.md, "Sharded mode"):

* the same rank at the same world size restores its shard exactly: the run continues bit for bit;
* a shard loaded by another rank or at another world size starts empty, with a warning saying
  why, and the rest of the state (temperature, subsampling step) is kept;
* a gathered-mode checkpoint (the whole queue) loaded in sharded mode is split, row ``i`` of its
  FIFO order to rank ``i % W``: the union of the shards is the saved queue, and with equal
  per-rank batches and ``queue_size`` a multiple of the global batch the run continues exactly
  as the gathered run would (checked against one process resuming the same checkpoint);
* a shard of a sharded run over several ranks loaded in gathered mode starts empty, with a
  warning (it is one rank's share of the pool only).
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch

from imbalanced_losses import RecallAtQuantileLoss
from imbalanced_losses.testing import run_ranks

OPTIONS = {"num_classes": 3, "quantile": 0.3, "temperature": 0.5, "queue_size": 12}


def _batches(seed: int, steps: int, world_size: int, per_rank: int):
    gen = torch.Generator().manual_seed(seed)
    n = world_size * per_rank
    return [
        (
            torch.randn(n, 3, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (n,), generator=gen),
        )
        for _ in range(steps)
    ]


def _step(loss_fn, logits, targets) -> torch.Tensor:
    x = logits.clone().requires_grad_()
    loss = loss_fn(x, targets)
    loss.backward()
    return torch.cat([loss.detach()[None], x.grad.flatten()])


def _save(loss_fn) -> bytes:
    buffer = io.BytesIO()
    torch.save(loss_fn.state_dict(), buffer)
    return buffer.getvalue()


def _load(loss_fn, saved: bytes) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss_fn.load_state_dict(torch.load(io.BytesIO(saved), weights_only=True))
    # The annealed temperature's own warning is another test's business.
    return [str(w.message) for w in caught if "loaded queue" in str(w.message)]


def _shard_rows(loss_fn) -> torch.Tensor:
    scores, _, _ = loss_fn.queue.rows()
    return scores.clone()


def _same_world_rank(rank: int) -> dict:
    """Train 3 steps, save; a fresh loss loading this rank's file runs on exactly as the
    original; one loading the other rank's file starts with an empty shard."""
    per_rank, rows = 3, slice(3 * rank, 3 * rank + 3)
    batches = _batches(1, 6, 2, per_rank)
    original = RecallAtQuantileLoss(**OPTIONS, sharded=True).double()
    for logits, targets in batches[:3]:
        _step(original, logits[rows], targets[rows])
    original.temperature = 0.25  # annealed by hand: the replicated state
    mine = _save(original)
    files: list = [None, None]
    torch.distributed.all_gather_object(files, mine)  # each rank's own file
    resumed = RecallAtQuantileLoss(**OPTIONS, sharded=True).double()
    restored_warnings = _load(resumed, files[rank])
    restored = torch.equal(_shard_rows(resumed), _shard_rows(original))
    swapped = RecallAtQuantileLoss(**OPTIONS, sharded=True).double()
    swapped_warnings = _load(swapped, files[1 - rank])
    gathered_mode = RecallAtQuantileLoss(**OPTIONS).double()
    gathered_warnings = _load(gathered_mode, mine)
    out = {
        "restored": restored,
        "restored_warnings": restored_warnings,
        "swapped": (swapped.queue.count, swapped.temperature, swapped_warnings),
        "gathered": (gathered_mode.queue.count, gathered_mode.queue.capacity, gathered_warnings),
        "continued": [],
    }
    for logits, targets in batches[3:]:
        a = _step(original, logits[rows], targets[rows])
        b = _step(resumed, logits[rows], targets[rows])
        _step(swapped, logits[rows], targets[rows])  # every rank joins every collective
        out["continued"].append(torch.equal(a, b))
    return out


def test_the_same_rank_and_world_restore_a_shard_exactly_and_others_start_empty():
    results = run_ranks(_same_world_rank, 2, timeout_s=300)
    for rank, out in enumerate(results):
        assert out["restored"] and out["restored_warnings"] == [], (rank, out["restored_warnings"])
        assert out["continued"] == [True] * 3, f"rank {rank}: the resumed run drifted"
        count, temperature, messages = out["swapped"]
        assert count == 0 and temperature == 0.25, (rank, count, temperature)
        assert len(messages) == 1
        assert f"rank {1 - rank}'s shard of a sharded run over 2 ranks" in messages[0]
        assert f"this is rank {rank} of 2" in messages[0] and "counted twice" in messages[0]
        count, capacity, messages = out["gathered"]
        assert (count, capacity) == (0, 12), (rank, count, capacity)
        assert len(messages) == 1 and "one rank's share of the pool" in messages[0]


def _gathered_rank(rank: int) -> bytes:
    """Two ranks train the gathered loss for 3 steps (equal batches of 3); rank 0's file."""
    batches = _batches(2, 3, 2, 3)
    loss_fn = RecallAtQuantileLoss(**OPTIONS).double()
    for logits, targets in batches:
        _step(loss_fn, logits[3 * rank : 3 * rank + 3], targets[3 * rank : 3 * rank + 3])
    return _save(loss_fn)


def _resume_split(rank: int, saved: bytes, world_size: int) -> dict:
    per_rank = 6 // world_size
    rows = slice(per_rank * rank, per_rank * (rank + 1))
    loss_fn = RecallAtQuantileLoss(**OPTIONS, sharded=True).double()
    messages = _load(loss_fn, saved)
    shard = _shard_rows(loss_fn)
    outputs = [
        _step(loss_fn, logits[rows], targets[rows])
        for logits, targets in _batches(3, 4, world_size, per_rank)
    ]
    return {
        "messages": messages,
        "shard": shard,
        "capacity": loss_fn.queue.capacity,
        "out": outputs,
    }


@pytest.mark.parametrize("world_size", [2, 3])
def test_a_gathered_checkpoint_is_split_over_the_ranks_and_the_run_continues_exactly(world_size):
    saved = run_ranks(_gathered_rank, 2, timeout_s=300)[0]
    results = run_ranks(_resume_split, world_size, args=(saved, world_size), timeout_s=300)
    # One process resumes the gathered loss from the same file and sees the global batches.
    oracle = RecallAtQuantileLoss(**OPTIONS).double()
    oracle.load_state_dict(torch.load(io.BytesIO(saved), weights_only=True))
    whole = oracle.queue.scores.clone()
    expected = [
        _step(oracle, logits, targets)
        for logits, targets in _batches(3, 4, world_size, 6 // world_size)
    ]
    union = torch.cat([out["shard"] for out in results])
    assert sorted(map(tuple, union.tolist())) == sorted(map(tuple, whole.tolist()))
    per_rank = 6 // world_size
    for rank, out in enumerate(results):
        assert out["messages"] == [] and out["capacity"] == 12 // world_size
        for step, (got, want) in enumerate(zip(out["out"], expected)):
            # [loss, gradient of the global batch]: this rank holds its rows' gradient x W.
            grad = want[1:].view(-1, 3)[per_rank * rank : per_rank * (rank + 1)].flatten()
            torch.testing.assert_close(
                got[0], want[0], rtol=1e-12, atol=1e-12, msg=f"{rank} {step}"
            )
            torch.testing.assert_close(got[1:] / world_size, grad, rtol=1e-12, atol=1e-12)
