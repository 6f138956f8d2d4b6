"""The rank-spawning engine itself: results come back, and every way a rank can go wrong is
reported quickly, with the evidence, and without leaving a process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import unittest
import warnings
from pathlib import Path

import psutil
import pytest
import torch
import torch.distributed as dist

from imbalanced_losses.testing import (
    NotEnoughGPUs,
    RankFailure,
    RankTimeout,
    report_progress,
    run_ranks,
)

# Spawning a rank costs an interpreter start plus `import torch` (~1-3 s alone, 20 s and more on a
# loaded 2-core box). Not a speed test: without fail-fast a peer waits for the process-group
# timeout (timeout_s + 15 s = 315 s here), so anything far below that proves the parent acted.
NO_HANG_TIMEOUT_S = 300
FAST_FAILURE_S = 120.0


# --- rank bodies (module level: each spawned rank imports them by name) ---------------------


def _describe_world(rank: int, tag: str) -> dict:
    dist.barrier()
    return {
        "rank": rank,
        "dist_rank": dist.get_rank(),
        "world_size": dist.get_world_size(),
        "backend": str(dist.get_backend()),
        "env_rank": os.environ["RANK"],
        "tag": tag,
        "tensor": torch.arange(3, dtype=torch.float64) * rank,
        "threads": torch.get_num_threads(),
        "ddp_warnings": _ddp_warnings(),
    }


def _add_rank_in_place(rank: int, tensor: torch.Tensor) -> torch.Tensor:
    tensor.add_(rank + 1)  # a shared tensor would show the other ranks' additions too
    dist.barrier()
    return tensor


def _raise_on_rank_one(rank: int) -> None:
    report_progress(f"plan step 3 (train, 2 ranks) on rank {rank}")
    if rank == 1:
        raise ValueError("boom from rank 1")
    dist.barrier()  # without fail-fast, rank 0 would wait here until the process-group timeout


def _sleep_on_rank_one(rank: int) -> None:
    report_progress(f"plan step 2 on rank {rank}")
    if rank == 1:
        time.sleep(120)  # the hung rank
    dist.barrier()


def _sigkill_on_rank_one(rank: int) -> None:
    report_progress(f"plan step 4 on rank {rank}")
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()  # rank 0 then fails too ("connection closed"), as a consequence


def _ddp_warnings() -> list[str]:
    from imbalanced_losses.testing._ddp_check import _wrap_ddp

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for broadcast in (True, False):
            _wrap_ddp(torch.nn.Linear(2, 2), torch.device("cpu"), broadcast)
    return [f"{w.category.__name__}: {w.message}" for w in caught]


def _exit_without_result(rank: int) -> None:
    if rank == 0:
        os._exit(0)
    dist.barrier()


def _start_grandchild_then_fail(rank: int, pid_dir: str) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    with open(os.path.join(pid_dir, f"rank{rank}.pids"), "w") as f:
        f.write(f"{os.getpid()} {child.pid}")
    dist.barrier()  # both ranks have written their pids
    if rank == 1:
        raise RuntimeError("rank 1 fails while it and rank 0 have children running")
    dist.barrier()


def _claim_another_world(rank: int) -> None:
    from imbalanced_losses.testing._spawn import _check_world

    _check_world(rank, 3, "nccl")


# --- helpers -------------------------------------------------------------------------------


def _our_processes() -> set[int]:
    """This test process's descendants, minus multiprocessing's shared resource tracker."""
    pids = set()
    for proc in psutil.Process().children(recursive=True):
        try:
            if "resource_tracker" not in " ".join(proc.cmdline()):
                pids.add(proc.pid)
        except psutil.NoSuchProcess:
            pass
    return pids


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _run_expecting(error: type[Exception], fn, world_size: int, **kw) -> tuple[Exception, float]:
    before = _our_processes()
    start = time.monotonic()
    with pytest.raises(error) as info:
        run_ranks(fn, world_size, **kw)
    elapsed = time.monotonic() - start
    assert _our_processes() - before == set(), "a rank outlived run_ranks"
    return info.value, elapsed


# --- tests ---------------------------------------------------------------------------------


def test_each_rank_returns_its_result_in_rank_order_and_sees_the_asked_world():
    results = run_ranks(_describe_world, 3, args=("x",), timeout_s=60)
    assert [r["rank"] for r in results] == [0, 1, 2]
    assert [r["dist_rank"] for r in results] == [0, 1, 2]
    assert [r["env_rank"] for r in results] == ["0", "1", "2"]
    assert all(r["world_size"] == 3 and r["backend"] == "gloo" for r in results)
    assert all(r["tag"] == "x" and r["threads"] == 1 for r in results)
    # torch 2.13 deprecates DDP's broadcast_buffers: the harness's DDP must not fill rank logs
    # with that warning.
    assert [r["ddp_warnings"] for r in results] == [[], [], []]
    torch.testing.assert_close(
        results[2]["tensor"], torch.tensor([0.0, 2.0, 4.0], dtype=torch.float64)
    )


def test_every_rank_gets_its_own_copy_of_tensor_arguments():
    results = run_ranks(_add_rank_in_place, 3, args=(torch.zeros(2),), timeout_s=60)
    assert [r.tolist() for r in results] == [[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]


def test_rank_that_raises_is_reported_with_its_traceback_within_seconds():
    error, elapsed = _run_expecting(RankFailure, _raise_on_rank_one, 2, timeout_s=NO_HANG_TIMEOUT_S)
    assert elapsed < FAST_FAILURE_S, f"took {elapsed:.1f} s: the parent did not fail fast"
    message = str(error)
    assert "rank 1 failed first" in message
    assert "ValueError: boom from rank 1" in message
    assert "_raise_on_rank_one" in message  # the traceback, not just the exception text
    assert "ValueError: boom from rank 1" in error.failures[1]
    assert "(rank 1 was at: plan step 3 (train, 2 ranks) on rank 1)" in error.failures[1]
    assert not isinstance(error, RankTimeout)


def test_hung_rank_fails_at_the_deadline_with_every_ranks_stack():
    # The deadline leaves room for a slow start (interpreter + torch) on a loaded machine.
    error, elapsed = _run_expecting(RankTimeout, _sleep_on_rank_one, 2, timeout_s=20)
    assert elapsed < 20 + FAST_FAILURE_S
    message = str(error)
    assert "deadline of 20 s expired" in message
    # faulthandler's dump names the frame each rank was stuck in.
    assert "in _sleep_on_rank_one" in error.logs[1]
    assert "in barrier" in error.logs[0]
    assert "in _sleep_on_rank_one" in message
    assert error.failures == {
        0: "still running; it was at: plan step 2 on rank 0",
        1: "still running; it was at: plan step 2 on rank 1",
    }


def test_death_by_signal_is_reported_first_with_the_step_it_was_at():
    error, elapsed = _run_expecting(
        RankFailure, _sigkill_on_rank_one, 2, timeout_s=NO_HANG_TIMEOUT_S
    )
    assert elapsed < FAST_FAILURE_S
    message = str(error)
    # Rank 0's "connection closed" traceback is written while the parent stops everyone; the
    # parent saw rank 1 die first, so rank 1 leads.
    assert "rank 1 failed first" in message
    assert error.failures[1] == "killed by signal SIGKILL; it was at: plan step 4 on rank 1"
    assert message.index("=== rank 1 failed ===") < message.index("=== rank 0 failed (later")


def _start_hanging_parent(tmp_path: Path) -> tuple[subprocess.Popen, list[int]]:
    """A parent running 2 hung ranks, with its temp dir in ``tmp_path``; returns it and the
    ranks' pids once both ranks are running their body."""
    ddp_tests = Path(__file__).parent
    env = {
        **os.environ,
        "TMPDIR": str(tmp_path),
        "PYTHONPATH": os.pathsep.join([str(ddp_tests), str(ddp_tests.parent)]),
    }
    parent = subprocess.Popen(
        [sys.executable, "-c", "from _fault_parent import main; main()"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + FAST_FAILURE_S
    while time.monotonic() < deadline:
        workdirs = list(tmp_path.glob("imbalanced_losses_ranks_*"))
        if workdirs and len(list(workdirs[0].glob("rank*.progress"))) == 2:
            pids = [int(p) for p in (workdirs[0] / "pids").read_text().split()]
            return parent, pids
        time.sleep(0.1)
    parent.kill()
    raise AssertionError(f"the ranks never started: {parent.communicate()}")


def _gone(tmp_path: Path, pids: list[int]) -> bool:
    deadline = time.monotonic() + 10  # the janitor and init reap asynchronously
    while time.monotonic() < deadline:
        if not list(tmp_path.glob("imbalanced_losses_ranks_*")) and not any(map(_alive, pids)):
            return True
        time.sleep(0.1)
    return False


def test_ctrl_c_in_the_parent_prints_every_ranks_stack_and_cleans_up(tmp_path):
    parent, pids = _start_hanging_parent(tmp_path)
    parent.send_signal(signal.SIGINT)
    _, stderr = parent.communicate(timeout=60)
    assert "interrupted (Ctrl-C); Python stack of each rank" in stderr
    assert "=== rank 0 (at: rank 0 waiting forever)" in stderr
    assert "=== rank 1 (at: rank 1 waiting forever)" in stderr
    assert stderr.count("in hang") == 2  # each rank's faulthandler dump
    assert "parent caught RanksInterrupted" in stderr
    assert _gone(tmp_path, pids), "a rank or the work directory outlived the interrupted parent"


def test_a_killed_parent_leaves_no_rank_and_no_work_directory(tmp_path):
    parent, pids = _start_hanging_parent(tmp_path)
    parent.kill()
    parent.communicate(timeout=60)
    assert _gone(tmp_path, pids), "a rank or the work directory outlived the killed parent"


def test_rank_that_exits_zero_without_a_result_counts_as_failure():
    error, _ = _run_expecting(RankFailure, _exit_without_result, 2, timeout_s=NO_HANG_TIMEOUT_S)
    assert "without reporting a result" in error.failures[0]


def test_no_rank_or_child_of_a_rank_outlives_a_failed_run(tmp_path):
    _run_expecting(
        RankFailure,
        _start_grandchild_then_fail,
        2,
        args=(str(tmp_path),),
        timeout_s=NO_HANG_TIMEOUT_S,
    )
    pids = [int(p) for f in tmp_path.glob("rank*.pids") for p in f.read_text().split()]
    assert len(pids) == 4, "both ranks should have recorded themselves and their child"
    deadline = time.monotonic() + 5  # an orphaned grandchild is reaped by init, asynchronously
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [pid for pid in pids if _alive(pid)] == []


def test_rank_refuses_a_world_other_than_the_one_asked_for():
    error, _ = _run_expecting(RankFailure, _claim_another_world, 2, timeout_s=NO_HANG_TIMEOUT_S)
    assert "process group has world_size=2, backend='gloo'" in str(error)
    assert "expected world_size=3, backend='nccl'" in str(error)


def test_nccl_with_fewer_gpus_than_ranks_is_a_skip_with_the_reason():
    found = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(NotEnoughGPUs, match=f"needs one GPU per rank; this machine has {found}"):
        run_ranks(_describe_world, found + 1, backend="nccl", args=("x",))
    assert issubclass(NotEnoughGPUs, unittest.SkipTest)  # pytest reports it as a skip


def test_nccl_two_ranks_return_results():
    """Runs on a machine with 2+ GPUs; elsewhere run_ranks raises NotEnoughGPUs: a skip."""
    results = run_ranks(
        _describe_world, 2, backend="nccl", args=("gpu",), timeout_s=NO_HANG_TIMEOUT_S
    )
    assert [r["backend"] for r in results] == ["nccl", "nccl"]


def test_unpicklable_function_is_refused_before_spawning():
    with pytest.raises(TypeError, match="module-level function"):
        run_ranks(lambda rank: rank, 2)
