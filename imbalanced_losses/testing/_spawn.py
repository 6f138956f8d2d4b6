"""Run one function on N real rank processes and get each rank's result back.

Why real processes: the distributed promises of this package (same pool on every rank, exact
DDP gradients, bit-identical queues) can only be checked with real ``torch.distributed``
collectives, and a collective test that goes wrong tends to *hang* rather than fail. So the
engine is built around failing loudly and quickly, in the spirit of PyTorch's own
``torch/testing/_internal/common_distributed.py`` (written here from scratch):

* rendezvous through a ``FileStore`` in a fresh temp dir: no ports, so parallel test workers
  (pytest-xdist) never collide;
* every rank checks that it joined the world size and backend that was asked for;
* each rank's return value comes back to the parent through a file (``torch.save``), and a rank
  that raises writes its traceback next to it;
* the parent fails fast: the first rank that fails (exception, non-zero exit, death by signal)
  gets every other rank killed at once, and the error carries that rank's traceback;
* a parent-side deadline: on expiry every live rank dumps its Python stack (``faulthandler`` on
  SIGUSR1, into the rank's log file) and the dumps go into the error;
* every rank runs in its own session (process group) and is killed with ``killpg`` whatever
  happens, so neither ranks nor anything they started outlive the call; ranks also die with
  the parent (``PR_SET_PDEATHSIG``) if the parent itself is killed.
"""

from __future__ import annotations

import datetime
import faulthandler
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
import unittest
from collections.abc import Callable, Sequence
from multiprocessing.connection import wait
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["NotEnoughGPUs", "RankFailure", "RankTimeout", "run_ranks"]

_LOG_TAIL_CHARS = 8000  # per rank, in error messages
_DUMP_SETTLE_S = 2.0  # how long the parent waits for stack dumps to land in the logs


class NotEnoughGPUs(unittest.SkipTest):
    """NCCL needs one GPU per rank and this machine has fewer.

    A subclass of ``unittest.SkipTest``, so pytest and unittest report the test as *skipped
    with this reason* -- neither a silent pass nor a failure that is not the code's fault.
    """


class RankFailure(RuntimeError):
    """A rank raised, exited without a result, or was killed by a signal.

    ``failures`` maps rank -> why it failed (its traceback when it could report one); ``logs``
    maps rank -> the tail of that rank's stdout/stderr, including the Python stack it dumped
    when the parent stopped it. ``str(error)`` contains all of it.
    """

    def __init__(self, message: str, failures: dict[int, str], logs: dict[int, str]) -> None:
        super().__init__(message)
        self.failures = failures
        self.logs = logs


class RankTimeout(RankFailure):
    """The parent-side deadline expired; ``logs`` holds each live rank's stack at that moment."""


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *,
    backend: str = "gloo",
    timeout_s: float = 120.0,
    pg_timeout_s: float | None = None,
    args: Sequence[Any] = (),
    kwargs: dict[str, Any] | None = None,
    threads_per_rank: int = 1,
) -> list[Any]:
    """Call ``fn(rank, *args, **kwargs)`` on ``world_size`` spawned ranks; return results by rank.

    Inside ``fn`` the default process group is initialised (``backend``, this world size, a
    process-group timeout of ``pg_timeout_s``, default ``timeout_s``) and, for NCCL, the current
    CUDA device is ``rank``. ``fn``, ``args`` and the results must be picklable (``fn`` a
    module-level function: the spawned ranks import it by name); every rank gets its own copy
    of ``args`` (tensors included: nothing is shared between ranks).

    Raises ``RankFailure`` as soon as one rank fails, ``RankTimeout`` when all ranks have not
    returned within ``timeout_s`` seconds of the spawn, and ``NotEnoughGPUs`` (a skip) for
    ``backend="nccl"`` with fewer GPUs than ranks. ``threads_per_rank`` caps intra-op threads so
    that several ranks on a small machine do not oversubscribe it.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if backend == "nccl":
        found = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if found < world_size:
            raise NotEnoughGPUs(
                f"backend 'nccl' with world_size={world_size} needs one GPU per rank; "
                f"this machine has {found}"
            )
    workdir = tempfile.mkdtemp(prefix="imbalanced_losses_ranks_")
    try:
        # Through a file, not the spawn pipe: torch's pickler would hand every rank the same
        # shared-memory tensor, and one rank's in-place update would show up in the others.
        torch.save((fn, tuple(args), kwargs or {}), os.path.join(workdir, "call.pt"))
    except Exception as exc:
        shutil.rmtree(workdir, ignore_errors=True)
        raise TypeError(
            "run_ranks: fn and its arguments must be picklable (fn a module-level function), "
            f"because each rank is a fresh process that imports them: {exc}"
        ) from exc
    spec = {
        "world_size": world_size,
        "backend": backend,
        "pg_timeout_s": pg_timeout_s if pg_timeout_s is not None else timeout_s,
        "workdir": workdir,
        "threads": threads_per_rank,
        "parent_pid": os.getpid(),
    }
    ctx = mp.get_context("spawn")
    procs: list[Any] = []
    try:
        deadline = time.monotonic() + timeout_s
        for rank in range(world_size):
            proc = ctx.Process(
                target=_rank_main,
                args=(rank, spec),
                name=f"rank{rank}",
            )
            proc.start()
            procs.append(proc)
        failed = _wait_for_ranks(procs, workdir, deadline)
        if failed is None:
            return [_load_result(workdir, rank) for rank in range(world_size)]
        _dump_stacks(procs, workdir)
        _kill_all(procs)
        raise _failure(procs, workdir, failed, backend, timeout_s)
    finally:
        _kill_all(procs)
        shutil.rmtree(workdir, ignore_errors=True)


def _wait_for_ranks(procs: list[Any], workdir: str, deadline: float) -> list[int] | None:
    """Block until every rank exits (None) or one fails / the deadline passes (failed ranks)."""
    running = {p.sentinel: rank for rank, p in enumerate(procs)}
    while running:
        left = deadline - time.monotonic()
        if left <= 0:
            return []  # nobody failed on its own: a timeout
        failed = []
        for sentinel in wait(list(running), timeout=left):
            rank = running.pop(sentinel)
            procs[rank].join()
            if procs[rank].exitcode != 0 or not os.path.exists(_path(workdir, rank, "result")):
                failed.append(rank)
        if failed:
            return failed
    return None


def _failure(
    procs: list[Any], workdir: str, failed: list[int], backend: str, timeout_s: float
) -> RankFailure:
    """Build the error: who failed, each failure's traceback, each rank's output and stack."""
    world = f"{len(procs)} ranks on {backend}"
    logs = {rank: _tail(_path(workdir, rank, "log")) for rank in range(len(procs))}
    failures = {}
    for rank, proc in enumerate(procs):
        reason = _read(_path(workdir, rank, "error"))
        if reason:
            failures[rank] = reason
        elif rank in failed:
            failures[rank] = _describe_exit(proc.exitcode)
    # A rank that raised usually makes its peers fail a moment later ("connection closed"):
    # lead with the earliest traceback written, which is the cause.
    first = sorted(failures, key=lambda r: (_mtime(_path(workdir, r, "error")), r))
    parts = []
    if not failed:
        parts.append(f"{world}: deadline of {timeout_s:g} s expired; Python stack of each rank:")
        error_cls: type[RankFailure] = RankTimeout
    else:
        parts.append(f"{world}: rank {first[0]} failed first.")
        error_cls = RankFailure
    for i, rank in enumerate(first):
        later = " (later: probably a consequence of the first)" if i else ""
        parts.append(f"=== rank {rank} failed{later} ===\n{failures[rank].rstrip()}")
    for rank in range(len(procs)):
        if logs[rank].strip():
            parts.append(f"=== rank {rank} output (tail, with its stack dump) ===\n{logs[rank]}")
    return error_cls("\n".join(parts), failures, logs)


def _describe_exit(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        return f"killed by signal {signal.Signals(-exitcode).name}"
    if exitcode == 0:
        return "exited with code 0 without reporting a result (os._exit or similar)"
    return (
        f"exited with code {exitcode} without reporting a traceback (it failed before the "
        "rank body ran, e.g. unpickling fn; see the parent's stderr)"
    )


def _dump_stacks(procs: list[Any], workdir: str) -> None:
    """Ask each live rank for its Python stack (SIGUSR1 -> faulthandler) and let it land."""
    live = [rank for rank, proc in enumerate(procs) if proc.exitcode is None]
    for rank in live:
        proc = procs[rank]
        try:
            os.kill(proc.pid, signal.SIGUSR1)
        except ProcessLookupError:
            pass
    if not live:
        return
    sizes = None
    stop = time.monotonic() + _DUMP_SETTLE_S
    while time.monotonic() < stop:
        time.sleep(0.1)
        now = [_size(_path(workdir, rank, "log")) for rank in live]
        if now == sizes:
            break
        sizes = now


def _kill_all(procs: list[Any]) -> None:
    """SIGKILL each rank's whole process group (the rank and whatever it started), then reap."""
    for proc in procs:
        if proc.pid is None:
            continue
        for kill in (os.killpg, os.kill):
            try:
                kill(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    for proc in procs:
        if proc.pid is not None:
            proc.join(timeout=10)


def _rank_main(rank: int, spec: dict) -> None:
    """Body of one rank process: isolate, rendezvous, check the world, run ``fn``, report."""
    workdir, world_size, backend = spec["workdir"], spec["world_size"], spec["backend"]
    os.setsid()  # own process group, so the parent's killpg also takes our children
    _die_with_parent(spec["parent_pid"])
    log = open(_path(workdir, rank, "log"), "a", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    faulthandler.enable(file=sys.stderr, all_threads=True)  # segfaults leave a stack too
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    try:
        fn, args, kwargs = torch.load(os.path.join(workdir, "call.pt"), weights_only=False)
        torch.set_num_threads(spec["threads"])
        if backend == "nccl":
            torch.cuda.set_device(rank)
        store = dist.FileStore(os.path.join(workdir, "store"), world_size)
        dist.init_process_group(
            backend,
            store=store,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=spec["pg_timeout_s"]),
        )
        _check_world(rank, world_size, backend)
        result = fn(rank, *args, **kwargs)
        tmp = _path(workdir, rank, "result.tmp")
        torch.save(result, tmp)
        os.replace(tmp, _path(workdir, rank, "result"))
        dist.barrier()  # nobody tears down while a peer may still be talking to it
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        text = traceback.format_exc()
        with open(_path(workdir, rank, "error.tmp"), "w") as f:
            f.write(text)
        os.replace(_path(workdir, rank, "error.tmp"), _path(workdir, rank, "error"))
        os._exit(1)  # skip interpreter teardown: a broken process group can hang in it
    os._exit(0)  # the result is on disk; tearing down torch only costs time


def _check_world(rank: int, world_size: int, backend: str) -> None:
    """Fail with a clear message if this rank did not join the world it was asked to join."""
    seen = (dist.get_world_size(), str(dist.get_backend()).lower())
    if seen != (world_size, backend.lower()):
        raise RuntimeError(
            f"rank {rank}: process group has world_size={seen[0]}, backend={seen[1]!r}; "
            f"expected world_size={world_size}, backend={backend!r}"
        )


def _die_with_parent(parent_pid: int) -> None:
    """Linux: get SIGKILL when the parent dies, so a killed test runner leaves no rank behind."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 == PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _path(workdir: str, rank: int, kind: str) -> str:
    return os.path.join(workdir, f"rank{rank}.{kind}")


def _load_result(workdir: str, rank: int) -> Any:
    # weights_only=False: the file was written a moment ago by our own child process.
    return torch.load(_path(workdir, rank, "result"), weights_only=False)


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def _tail(path: str) -> str:
    text = _read(path)
    return text if len(text) <= _LOG_TAIL_CHARS else "...\n" + text[-_LOG_TAIL_CHARS:]


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except FileNotFoundError:
        return -1


def _mtime(path: str) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except FileNotFoundError:
        return sys.maxsize
