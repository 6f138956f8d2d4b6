"""A parent process for the fault tests: spawns 2 ranks that hang, so the test can interrupt or
kill this parent and look at what is left. Run as ``python -c "from _fault_parent import main;
main()"`` with ``ddp_tests`` on the path (the ranks import ``hang`` from here by name)."""

from __future__ import annotations

import sys
import time

from imbalanced_losses.testing import report_progress, run_ranks


def hang(rank: int) -> None:
    report_progress(f"rank {rank} waiting forever")
    print(f"rank {rank} ready", flush=True)
    time.sleep(600)


def main() -> None:
    try:
        run_ranks(hang, 2, timeout_s=300)
    except KeyboardInterrupt as exc:
        print(f"parent caught {type(exc).__name__}", file=sys.stderr, flush=True)
        sys.exit(130)
