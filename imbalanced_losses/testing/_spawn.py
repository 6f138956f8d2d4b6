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
* the first failure is the one the parent *saw* first (an exit, or a death by signal), and a
  rank says where it was (``report_progress``), so every error names the step that failed;
* a hang is a parent-side deadline of ``timeout_s`` without progress: every live rank then dumps
  its Python stack (``faulthandler`` on SIGUSR1, into the rank's log file) and the dumps go into
  the error; Ctrl-C in the parent does the same before it stops;
* every rank runs in its own session (process group) and is killed with ``killpg`` whatever
  happens, so neither ranks nor anything they started outlive the call. If the parent itself is
  killed, the ranks die with it (``PR_SET_PDEATHSIG``) and a tiny janitor process, which holds
  the read end of a pipe from the parent, sees it close and removes the work directory.
"""

from __future__ import annotations

import datetime
import faulthandler
import os
import shutil
import signal
import subprocess
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

__all__ = [
    "NotEnoughGPUs",
    "RankFailure",
    "RankTimeout",
    "RanksInterrupted",
    "report_progress",
    "run_ranks",
]

_LOG_TAIL_CHARS = 8000  # per rank, in error messages
_DUMP_SETTLE_S = 2.0  # how long the parent waits for stack dumps to land in the logs
_POLL_S = 0.25  # how often the parent looks for progress while it waits

# Run by the janitor: wait until the parent's end of the pipe closes (the parent returned or
# died), then kill what is left of the ranks' sessions and remove the work directory.
_JANITOR = """
import os, shutil, signal, sys
workdir = sys.argv[1]
sys.stdin.buffer.read()
try:
    with open(os.path.join(workdir, "pids")) as f:
        pids = [int(p) for p in f.read().split()]
except (OSError, ValueError):
    pids = []
for pid in pids:
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass
shutil.rmtree(workdir, ignore_errors=True)
"""

_progress_file: str | None = None  # set in a rank: where report_progress writes
_NOT_STARTED = "starting (before the rank body ran)"
_stage = _NOT_STARTED


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
    """No rank made progress for ``timeout_s``; ``logs`` holds each live rank's stack then."""


class RanksInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) reached the parent; the message holds each rank's stack at that moment."""


def report_progress(stage: str) -> None:
    """Inside a rank: say what it is doing now (e.g. ``"plan step 3 (...)"``).

    Each call restarts the parent's hang deadline, and a failure, a death by signal or a hang
    of this rank is reported with the last stage it announced. A no-op outside a rank.
    """
    global _stage
    _stage = stage
    if _progress_file is not None:
        with open(_progress_file, "w") as f:
            f.write(stage)


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *,
    backend: str = "gloo",
    timeout_s: float = 60.0,
    start_timeout_s: float = 180.0,
    pg_timeout_s: float | None = None,
    args: Sequence[Any] = (),
    kwargs: dict[str, Any] | None = None,
    threads_per_rank: int = 1,
) -> list[Any]:
    """Call ``fn(rank, *args, **kwargs)`` on ``world_size`` spawned ranks; return results by rank.

    Inside ``fn`` the default process group is initialised (``backend``, this world size, a
    process-group timeout of ``pg_timeout_s``, by default 15 s more than either deadline)
    and, for NCCL, the current CUDA device is ``rank``. ``fn``, ``args`` and the results must
    be picklable (``fn`` a module-level function: the spawned ranks import it by name); every
    rank gets its own copy of ``args`` (tensors included: nothing is shared between ranks).

    Raises ``RankFailure`` as soon as one rank fails (the first one the parent saw fail leads,
    with the stage it had announced with :func:`report_progress`), ``RankTimeout`` when no rank
    has returned or reported progress for ``timeout_s`` seconds once all have joined the
    process group (``start_timeout_s`` for that, from the spawn), ``RanksInterrupted`` (a
    ``KeyboardInterrupt``) on Ctrl-C, after printing every rank's stack, and ``NotEnoughGPUs``
    (a skip) for ``backend="nccl"`` with fewer GPUs than ranks. ``threads_per_rank`` caps
    intra-op threads so that several ranks on a small machine do not oversubscribe it.
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
    janitor = _start_janitor(workdir)
    try:
        # Through a file, not the spawn pipe: torch's pickler would hand every rank the same
        # shared-memory tensor, and one rank's in-place update would show up in the others.
        torch.save((fn, tuple(args), kwargs or {}), os.path.join(workdir, "call.pt"))
    except Exception as exc:
        _stop_janitor(janitor, workdir)
        raise TypeError(
            "run_ranks: fn and its arguments must be picklable (fn a module-level function), "
            f"because each rank is a fresh process that imports them: {exc}"
        ) from exc
    spec = {
        "world_size": world_size,
        "backend": backend,
        # Later than the parent's deadline, so that a hang is reported as one, with the stacks.
        "pg_timeout_s": (
            pg_timeout_s if pg_timeout_s is not None else max(timeout_s, start_timeout_s) + 15
        ),
        "workdir": workdir,
        "threads": threads_per_rank,
        "parent_pid": os.getpid(),
    }
    ctx = mp.get_context("spawn")
    procs: list[Any] = []
    try:
        for rank in range(world_size):
            proc = ctx.Process(target=_rank_main, args=(rank, spec), name=f"rank{rank}")
            proc.start()
            procs.append(proc)
            with open(os.path.join(workdir, "pids"), "a") as f:
                f.write(f"{proc.pid}\n")
        try:
            failed = _wait_for_ranks(procs, workdir, timeout_s, start_timeout_s)
        except KeyboardInterrupt:
            _dump_stacks(procs, workdir)
            _kill_all(procs)
            message = _interrupted(procs, workdir, backend)
            print(message, file=sys.stderr, flush=True)
            raise RanksInterrupted(message) from None
        if failed is None:
            return [_load_result(workdir, rank) for rank in range(world_size)]
        _dump_stacks(procs, workdir)
        _kill_all(procs)
        deadline = timeout_s if _all_joined(workdir, world_size) else start_timeout_s
        raise _failure(procs, workdir, failed, backend, deadline)
    finally:
        _kill_all(procs)
        _stop_janitor(janitor, workdir)


def _start_janitor(workdir: str) -> subprocess.Popen | None:
    """A process that removes ``workdir`` once our end of its stdin closes, even if we die."""
    try:
        return subprocess.Popen(
            [sys.executable, "-S", "-c", _JANITOR, workdir],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C in the terminal must not stop it before it cleans
        )
    except OSError:
        return None  # the normal path still cleans up; only a killed parent would leave the dir


def _stop_janitor(janitor: subprocess.Popen | None, workdir: str) -> None:
    shutil.rmtree(workdir, ignore_errors=True)
    if janitor is not None:
        assert janitor.stdin is not None
        janitor.stdin.close()
        janitor.wait()


def _wait_for_ranks(
    procs: list[Any], workdir: str, timeout_s: float, start_timeout_s: float
) -> list[int] | None:
    """Block until every rank exits (None), one fails (the failed ranks, in the order the
    parent saw them), or the deadline passes ([]): ``start_timeout_s`` after the spawn while
    some rank has not joined the process group yet (starting an interpreter and importing
    torch is slow on a loaded machine), then ``timeout_s`` without progress."""
    running = {p.sentinel: rank for rank, p in enumerate(procs)}
    last_progress = spawned = time.monotonic()
    seen = [_mtime(_path(workdir, rank, "progress")) for rank in range(len(procs))]
    while running:
        now = [_mtime(_path(workdir, rank, "progress")) for rank in range(len(procs))]
        if now != seen:
            seen, last_progress = now, time.monotonic()
        if sys.maxsize in now:  # a rank has not reported yet: still starting
            left = spawned + start_timeout_s - time.monotonic()
        else:
            left = last_progress + timeout_s - time.monotonic()
        if left <= 0:
            return []  # nobody failed on its own: a hang
        ended = [running.pop(s) for s in wait(list(running), timeout=min(left, _POLL_S))]
        for rank in ended:
            procs[rank].join()
        failed = [
            rank
            for rank in ended
            if procs[rank].exitcode != 0 or not os.path.exists(_path(workdir, rank, "result"))
        ]
        if failed:
            # Seen in the same instant: a death by signal is a cause (nobody here sends one);
            # among tracebacks, the earliest written is.
            return sorted(failed, key=lambda r: (procs[r].exitcode >= 0, _error_time(workdir, r)))
        if ended:
            last_progress = time.monotonic()
    return None


def _failure(
    procs: list[Any], workdir: str, failed: list[int], backend: str, timeout_s: float
) -> RankFailure:
    """Build the error: who failed first, each failure's traceback, each rank's output and stack."""
    world = f"{len(procs)} ranks on {backend}"
    logs = {rank: _tail(_path(workdir, rank, "log")) for rank in range(len(procs))}
    failures = {}
    for rank, proc in enumerate(procs):
        reason = _read(_path(workdir, rank, "error"))
        if not reason and (rank in failed or not failed):
            if rank in failed:
                reason = _describe_exit(proc.exitcode)
            elif os.path.exists(_path(workdir, rank, "result")):
                reason = "returned its result"
            else:
                reason = "still running"
            reason += f"; it was at: {_read(_path(workdir, rank, 'progress')) or _NOT_STARTED}"
        if reason:
            failures[rank] = reason
    # The parent's own observation leads; ranks that failed while it was stopping the others
    # (usually "connection closed" from a peer that died) follow, earliest traceback first.
    later = sorted(set(failures) - set(failed), key=lambda r: (_error_time(workdir, r), r))
    order = [*failed, *later]
    parts = []
    if not failed:
        parts.append(
            f"{world}: deadline of {timeout_s:g} s expired with no rank making progress; "
            "Python stack of each rank below."
        )
        error_cls: type[RankFailure] = RankTimeout
    else:
        parts.append(f"{world}: rank {failed[0]} failed first.")
        error_cls = RankFailure
    for i, rank in enumerate(order):
        if not failed:
            title = f"=== rank {rank} ==="
        elif i:
            title = f"=== rank {rank} failed (later: probably a consequence of the first) ==="
        else:
            title = f"=== rank {rank} failed ==="
        parts.append(f"{title}\n{failures[rank].rstrip()}")
    for rank in range(len(procs)):
        if logs[rank].strip():
            parts.append(f"=== rank {rank} output (tail, with its stack dump) ===\n{logs[rank]}")
    return error_cls("\n".join(parts), failures, logs)


def _interrupted(procs: list[Any], workdir: str, backend: str) -> str:
    parts = [f"{len(procs)} ranks on {backend}: interrupted (Ctrl-C); Python stack of each rank:"]
    for rank in range(len(procs)):
        stage = _read(_path(workdir, rank, "progress")) or _NOT_STARTED
        parts.append(
            f"=== rank {rank} (at: {stage}) output (tail, with its stack dump) ===\n"
            + _tail(_path(workdir, rank, "log"))
        )
    return "\n".join(parts)


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
    global _progress_file
    workdir, world_size, backend = spec["workdir"], spec["world_size"], spec["backend"]
    _progress_file = _path(workdir, rank, "progress")
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
        report_progress(f"running {getattr(fn, '__name__', fn)!s} (joined the process group)")
        result = fn(rank, *args, **kwargs)
        tmp = _path(workdir, rank, "result.tmp")
        torch.save(result, tmp)
        os.replace(tmp, _path(workdir, rank, "result"))
        dist.barrier()  # nobody tears down while a peer may still be talking to it
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        text = f"{traceback.format_exc()}(rank {rank} was at: {_stage})\n"
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


def _all_joined(workdir: str, world_size: int) -> bool:
    return all(os.path.exists(_path(workdir, r, "progress")) for r in range(world_size))


def _error_time(workdir: str, rank: int) -> int:
    return _mtime(_path(workdir, rank, "error"))


def _mtime(path: str) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except FileNotFoundError:
        return sys.maxsize
