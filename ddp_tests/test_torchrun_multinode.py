"""The loopback two-"node" torchrun run of docs/integrations.md, exactly as the page shows it.

Two torchrun processes (``--nnodes 2 --nproc_per_node 1``) meet at a c10d rendezvous on
127.0.0.1 and train the demo as one 2-rank gloo job; both must end cleanly (exit status 0, no
gloo exit-time abort). The commands are read from the page, so the page cannot drift from what
runs; only the port (taken free here) and the output folder (a temp dir) are substituted.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGE = REPO / "docs" / "integrations.md"
DOC_PORT = "127.0.0.1:29531"
DOC_OUT = "results/loopback"
TIMEOUT_S = 240


def _commands_from_the_page() -> list[list[str]]:
    lines = [
        line.rstrip(" &")
        for line in PAGE.read_text().splitlines()
        if line.startswith("torchrun --nnodes 2 --nproc_per_node 1")
    ]
    assert len(lines) == 2 and all(DOC_PORT in line for line in lines), lines
    return [shlex.split(line) for line in lines]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_torchrun_nodes_on_loopback_train_as_one_job(tmp_path: Path) -> None:
    endpoint = f"127.0.0.1:{_free_port()}"
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    procs = []
    for command in _commands_from_the_page():
        command = [
            endpoint if a == DOC_PORT else str(tmp_path) if a == DOC_OUT else a for a in command
        ]
        command[0:1] = [sys.executable, "-m", "torch.distributed.run"]  # torchrun, this Python
        procs.append(
            subprocess.Popen(
                command,
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
        )
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"the two nodes did not finish in {TIMEOUT_S}s")
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    both = "\n".join(outputs)
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, f"a node exited with {proc.returncode}:\n{out[-4000:]}"
        assert "terminate called" not in out, out[-4000:]
    assert "world_size=2 backend=gloo" in both, both[-4000:]
    report = json.loads((tmp_path / "train_alerts.json").read_text())
    assert report["world_size"] == 2 and report["backend"] == "gloo"
