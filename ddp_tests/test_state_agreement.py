"""Contract §17: ranks whose loss *state* differs stop together, with a message that says why.

Options were agreed from the start; the state (queue fill count and write position, subsampling
step, temperature, dtypes) rides in the same metadata row. Each case below makes one rank's
state differ the way a user slips (a checkpoint loaded on rank 0 only, ``reset_queue()`` on one
rank, an annealing schedule run on one rank, float32 logits on one rank and float64 on another)
and checks that every rank raises the same ``ValueError``, naming what differs with each rank's
value and the fix, and that no rank changed its state. Float32 against float64 logits used to
abort inside gloo (the row gather had mismatched byte sizes): the dtype is now agreed in the
metadata row, before any row travels.
"""

from __future__ import annotations

import copy
import os
import pickle
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from imbalanced_losses import RecallAtQuantileLoss, SmoothAPLoss
from imbalanced_losses.testing import run_ranks

REPO = Path(__file__).resolve().parent.parent
OPTIONS = dict(num_classes=3, quantile=0.3, queue_size=16, temperature=0.5)


def _batch(rank: int, step: int, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(4, 3, generator=gen, dtype=dtype), torch.randint(0, 3, (4,), generator=gen)


def _trained(steps: int, **options) -> RecallAtQuantileLoss:
    """A loss that has taken ``steps`` single-process steps: the checkpoint of an earlier run."""
    loss_fn = RecallAtQuantileLoss(**{**OPTIONS, **options}, gather_distributed=False)
    for step in range(steps):
        loss_fn(*_batch(0, step))
    return loss_fn


def _state(loss_fn) -> tuple:
    return (loss_fn.queue.count, loss_fn.queue.ptr, loss_fn.subsample_step, loss_fn.temperature)


def _slip(name: str, rank: int) -> tuple[RecallAtQuantileLoss, torch.dtype]:
    """The loss of ``rank`` after the slip ``name`` (ranks other than 1 did it right)."""
    if name == "checkpoint loaded on rank 0 only":
        loss_fn = RecallAtQuantileLoss(**OPTIONS)
        if rank == 0:
            loss_fn.load_state_dict(_trained(2).state_dict())
        return loss_fn, torch.float32
    if name == "reset_queue() on one rank":
        loss_fn = RecallAtQuantileLoss(**OPTIONS)
        loss_fn(*_batch(rank, 0))  # a step every rank takes together: 4 rows per rank queued
        if rank == 1:
            loss_fn.reset_queue()
        return loss_fn, torch.float32
    if name == "subsampling step":
        loss_fn = RecallAtQuantileLoss(**OPTIONS, max_pool_size=6)
        # A checkpoint (same queue, same temperature) taken one subsampled step later.
        loss_fn.load_state_dict({**loss_fn.state_dict(), "_extra_state": {"subsample_step": rank}})
        return loss_fn, torch.float32
    if name == "temperature":
        loss_fn = RecallAtQuantileLoss(**OPTIONS)
        loss_fn.temperature = 0.25 if rank == 1 else 0.5  # an annealing schedule run on rank 1
        return loss_fn, torch.float32
    if name == "logits dtype":
        return RecallAtQuantileLoss(**OPTIONS), torch.float64 if rank == 1 else torch.float32
    if name == "loss dtype":
        loss_fn = RecallAtQuantileLoss(**OPTIONS)
        return (loss_fn.double() if rank == 1 else loss_fn), torch.float64
    # Sharded: the shards fill at their own pace, so the agreed queue state is the number of
    # training steps since they were emptied.
    if name == "sharded: reset_queue() on one rank":
        loss_fn = RecallAtQuantileLoss(**OPTIONS, sharded=True)
        loss_fn(*_batch(rank, 0))  # a step every rank takes together
        if rank == 1:
            loss_fn.reset_queue()
        return loss_fn, torch.float32
    if name == "sharded: checkpoint loaded on rank 0 only":
        loss_fn = RecallAtQuantileLoss(**OPTIONS, sharded=True)
        loss_fn(*_batch(rank, 0))  # a step every rank takes together
        if rank == 0:  # a one-process checkpoint: a gathered one, which restarts the count
            loss_fn.load_state_dict(_trained(2, sharded=True).state_dict())
        return loss_fn, torch.float32
    raise AssertionError(name)


# Per slip: what the message must name (with rank 0's and rank 1's values) and the fix it gives.
EXPECTED = {
    "checkpoint loaded on rank 0 only": (
        r"queue fill count \(rank 0: 8, rank 1: 0(, rank 2: 0)?\), "
        r"queue write position \(rank 0: 8, rank 1: 0(, rank 2: 0)?\)",
        "load the checkpoint on every rank",
    ),
    "reset_queue() on one rank": (
        r"queue fill count \(rank 0: (8|12), rank 1: 0(, rank 2: 12)?\)",
        "call reset_queue() on every rank or on none",
    ),
    "subsampling step": (
        r"subsampling step \(rank 0: 0, rank 1: 1(, rank 2: 2)?\)",
        "load the checkpoint on every rank",
    ),
    "temperature": (
        r"temperature \(rank 0: 0.5, rank 1: 0.25(, rank 2: 0.5)?\)",
        "set loss_fn.temperature to the same value on every rank",
    ),
    "logits dtype": (
        r"logits dtype \(rank 0: torch.float32, rank 1: torch.float64(, rank 2: torch.float32)?\)",
        "pass logits of one dtype on every rank",
    ),
    "loss dtype": (
        r"loss dtype \(its queue\) \(rank 0: torch.float32, rank 1: torch.float64"
        r"(, rank 2: torch.float32)?\)",
        "convert the loss the same way on every rank",
    ),
    "sharded: reset_queue() on one rank": (
        r"training steps written to the queue shards since they were emptied "
        r"\(rank 0: 1, rank 1: 0(, rank 2: 1)?\)",
        "call reset_queue() on every rank or on none",
    ),
    "sharded: checkpoint loaded on rank 0 only": (
        r"training steps written to the queue shards since they were emptied "
        r"\(rank 0: 0, rank 1: 1(, rank 2: 1)?\)",
        "load the checkpoint on every rank",
    ),
}


def _every_slip(rank: int) -> dict[str, tuple[str | None, tuple, tuple]]:
    """Each slip's error on this rank, and the loss state before and after the failing step."""
    outcome = {}
    for name in EXPECTED:
        loss_fn, dtype = _slip(name, rank)
        before = _state(loss_fn)
        try:
            loss_fn(*_batch(rank, 5, dtype))
            message = None
        except ValueError as exc:
            message = str(exc)
        outcome[name] = (message, before, _state(loss_fn))
    return outcome


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_whose_state_differs_all_raise_the_same_error_naming_it_and_the_fix(world_size):
    results = run_ranks(_every_slip, world_size, timeout_s=180)
    for name, (pattern, fix) in EXPECTED.items():
        messages = {results[rank][name][0] for rank in range(world_size)}
        assert len(messages) == 1, f"{name}: ranks raised different errors {messages}"
        (message,) = messages
        assert message is not None, f"{name}: no rank raised"
        assert re.search(pattern, message), f"{name}: {message!r} does not match {pattern!r}"
        assert fix in message, f"{name}: {message!r} lacks the fix {fix!r}"
        for rank in range(world_size):
            _, before, after = results[rank][name]
            assert before == after, f"{name}: rank {rank} changed its state {before} -> {after}"


def _agreed_state_trains(rank: int) -> list[float]:
    """The control: the same checkpoint on every rank, dtypes alike, annealed on every rank."""
    loss_fn = RecallAtQuantileLoss(**OPTIONS, max_pool_size=6)
    loss_fn.load_state_dict(_trained(2, max_pool_size=6).state_dict())
    losses = []
    for step in range(3):
        loss_fn.temperature = 0.5 / (step + 1)
        losses.append(float(loss_fn(*_batch(rank, step))))
    return losses


def _sharded_warnings_as_errors(rank: int) -> list[str]:
    """Steps of a sharded loss whose pool is too small for its quantile, with warnings turned
    into errors: rank 0's shard fills first (rank 1 has no rows at step 0)."""
    loss_fn = RecallAtQuantileLoss(1, quantile=0.1, queue_size=4, temperature=0.5, sharded=True)
    outcomes = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step, rows in enumerate([(2, 0), (2, 0), (2, 2), (2, 2)]):
            gen = torch.Generator().manual_seed(step)
            logits = torch.randn(rows[rank], 1, generator=gen)
            targets = torch.arange(rows[rank]) % 2
            try:
                loss_fn(logits, targets)
                outcomes.append("ok")
            except UserWarning as warning:
                outcomes.append(type(warning).__name__ + ": " + str(warning).split(",")[0])
    return outcomes


def test_sharded_warnings_are_judged_on_the_global_pool_so_every_rank_warns_alike():
    """A warning made an error on one rank only would leave the others waiting in the next
    collective: the small-pool warning waits until every shard is full, on every rank."""
    outcomes = run_ranks(_sharded_warnings_as_errors, 2, timeout_s=120)
    assert outcomes[0] == outcomes[1], outcomes
    assert outcomes[0][:2] == ["ok", "ok"], outcomes  # rank 1's shard is still empty
    assert any("the pool holds" in o for o in outcomes[0][2:]), outcomes


def test_ranks_with_the_same_state_train_without_error():
    losses = run_ranks(_agreed_state_trains, 2, timeout_s=120)
    assert losses[0] == losses[1]


# ------------------------------------------------------------ process_group: deepcopy, pickle


def _same_state(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        torch.equal(v, sb[k]) if isinstance(v, torch.Tensor) else v == sb[k] for k, v in sa.items()
    )


def _copies_with_a_group(rank: int) -> dict:
    group = dist.new_group([0, 1])
    loss_fn = RecallAtQuantileLoss(**OPTIONS, process_group=group)
    loss_fn(*_batch(rank, 0))
    twin = copy.deepcopy(loss_fn)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        unpickled = pickle.loads(pickle.dumps(loss_fn))
        smooth = pickle.loads(pickle.dumps(SmoothAPLoss(3, process_group=group)))
    same_state = _same_state(loss_fn, twin) and _same_state(loss_fn, unpickled)
    # The deep copy still pools over the group: it trains in step with the original.
    step = _batch(rank, 1)
    original_loss, twin_loss = float(loss_fn(*step)), float(twin(*step))
    unpickled.process_group = group  # given one, the unpickled loss pools that group again
    return {
        "twin uses the group": twin.process_group is group,
        "twin repr": repr(twin),
        "twin loss equals the original's": original_loss == twin_loss,
        "unpickled group": unpickled.process_group is group,
        "warnings": [str(w.message) for w in caught],
        "smooth repr": repr(smooth),
        "smooth group": smooth.process_group,
        "same state": same_state,
        "original repr": repr(loss_fn),
    }


def test_a_loss_with_a_process_group_deep_copies_and_pickles():
    for rank, got in enumerate(run_ranks(_copies_with_a_group, 2, timeout_s=120)):
        assert got["twin uses the group"], f"rank {rank}"
        assert got["twin loss equals the original's"], f"rank {rank}"
        assert got["same state"], f"rank {rank}"
        assert got["unpickled group"], f"rank {rank}"
        assert "process_group='the group of ranks [0, 1]'" in got["original repr"]
        assert "process_group='the group of ranks [0, 1]'" in got["twin repr"]
        # Pickled: the group stays behind, the loss says so and uses the default group.
        assert got["smooth group"] is None
        assert (
            "process_group=None (the default group; pickled with the group of ranks [0, 1])"
            in (got["smooth repr"])
        ), got["smooth repr"]
        assert any("assign loss_fn.process_group" in w for w in got["warnings"]), got["warnings"]


# ------------------------------------------------------------- as a new user: torchrun


def documented_script_and_error() -> tuple[str, str]:
    """The script of docs/ddp.md that loads a checkpoint on rank 0 only, and the error it shows."""
    page = (REPO / "docs" / "ddp.md").read_text()
    blocks = re.findall(r"```python\n(# resume_on_one_rank\.py.*?)```", page, flags=re.S)
    assert len(blocks) == 1, "docs/ddp.md should hold one block starting '# resume_on_one_rank.py'"
    errors = re.findall(r"`(ValueError: ranks disagree on queue fill count.*?)`", page, flags=re.S)
    assert len(errors) == 1, "docs/ddp.md should quote the error of resume_on_one_rank.py once"
    return blocks[0], " ".join(errors[0].split())


def test_a_checkpoint_loaded_on_one_rank_of_a_torchrun_job_stops_with_what_to_do(tmp_path):
    script, documented_error = documented_script_and_error()
    (tmp_path / "resume_on_one_rank.py").write_text(script)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        + ["resume_on_one_rank.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,  # a hang guard, not a speed check
    )
    output = run.stdout + run.stderr
    assert run.returncode != 0, output
    # It stops with the error the page shows, which says what to do. (Whether the second
    # rank's traceback is printed before torchrun stops it is a race: that every rank raises
    # the same error is checked above, with run_ranks.)
    assert "load the checkpoint on every rank" in documented_error
    assert re.search(rf"\[rank[01]\]: {re.escape(documented_error)}", output), output
    assert "Received data size doesn't match" not in output, output  # no transport crash
