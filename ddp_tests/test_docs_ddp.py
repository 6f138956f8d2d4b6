"""The distributed examples of the docs, under their launchers, end cleanly every time.

On torch 2.13 with gloo a rank can abort at interpreter exit ("terminate called without an
active exception", SIGABRT) after printing correct results; it happens in some runs only. So
every launcher block (``<!-- docs-test: torchrun N -->`` / ``accelerate N``) runs RUNS times,
each time with a zero exit status, no abort message, and the output its docs show. Blocks whose
skip reason names this file (commands that need the script saved under its name, a block that
reads the checkpoint it wrote) run after the launched scripts of their page, in one directory.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
from _docs_blocks import (
    DOC_FILES,
    ROOT,
    Block,
    bash_commands,
    environment,
    launch_command,
    normalised,
    parse,
    run,
    scratch_root,
)

RUNS = int(os.environ.get("DOCS_DDP_RUNS", "10"))  # launches per example; 10 is the bar
TIMEOUT_S = 300  # a guard against a hang, not a speed check
THIS_TEST = "ddp_tests/test_docs_ddp.py"
SCRIPT_NAME = re.compile(r"^#\s*(?P<name>[\w-]+\.py):")
ABORT = "terminate called"


def _launcher_blocks() -> list[Block]:
    return [b for path in DOC_FILES for b in parse(path)[0] if b.launcher]


def _pages_with_followers() -> list[Path]:
    return [p for p in DOC_FILES if any(THIS_TEST in (b.skip_reason or "") for b in parse(p)[0])]


def _launch(block: Block, cwd: Path) -> None:
    """Save the block under the name its first comment gives, launch it, check how it ended."""
    name = SCRIPT_NAME.match(block.code)
    script = cwd / (name["name"] if name else f"docs_block_{block.line}.py")
    script.write_text(block.code)
    env = environment()
    if block.launcher and block.launcher[0] == "accelerate":
        env["ACCELERATE_USE_CPU"] = "1"
    done = run(launch_command(block, script), cwd, TIMEOUT_S, env)
    _assert_clean(block, done.returncode, done.stdout + done.stderr)
    if block.expected is not None:
        assert normalised(done.stdout) == normalised(block.expected), done.stdout


def _assert_clean(block: Block, returncode: int, output: str) -> None:
    assert ABORT not in output, f"{block.id}: a rank aborted at exit:\n{output[-3000:]}"
    assert returncode == 0, f"{block.id}: exit status {returncode}:\n{output[-3000:]}"


@pytest.mark.parametrize("run_index", range(RUNS))
@pytest.mark.parametrize("block", _launcher_blocks(), ids=lambda b: b.id)
def test_launched_example_prints_the_docs_output_and_exits_cleanly(block, run_index, tmp_path):
    _launch(block, scratch_root(tmp_path))


@pytest.mark.parametrize("path", _pages_with_followers(), ids=lambda p: p.name)
def test_commands_that_use_the_launched_scripts(path, tmp_path):
    cwd = scratch_root(tmp_path)
    for block in parse(path)[0]:
        if block.launcher:
            _launch(block, cwd)
        elif THIS_TEST in (block.skip_reason or "") and block.lang == "python":
            script = cwd / f"docs_block_{block.line}.py"
            script.write_text(block.code)
            done = run([sys.executable, str(script)], cwd, TIMEOUT_S)
            _assert_clean(block, done.returncode, done.stdout + done.stderr)
            if block.expected is not None:
                assert normalised(done.stdout) == normalised(block.expected), done.stdout
        elif THIS_TEST in (block.skip_reason or "") and block.lang == "bash":
            for command in bash_commands(block):
                done = run(["bash", "-c", f"set -euo pipefail; {command}"], cwd, TIMEOUT_S)
                _assert_clean(block, done.returncode, done.stdout + done.stderr)


def test_every_docs_launch_is_found():
    """The parametrisation above is not silently empty."""
    ids = {b.id for b in _launcher_blocks()}
    assert {"docs/ddp.md"} <= {i.split(":")[0] for i in ids}, ids
    assert ROOT / "docs" / "ddp.md" in _pages_with_followers()
