"""Docs that cannot rot: every python and bash block of README.md and docs/*.md runs as written,
and every output shown under a python block is what it prints. Markers are described in
``_docs_blocks``; blocks under a launcher run in ddp_tests/test_docs_ddp.py."""

from __future__ import annotations

import re
import sys

import pytest
from _docs_blocks import (
    DOC_FILES,
    ROOT,
    Block,
    all_blocks,
    bash_commands,
    normalised,
    parse,
    run,
    scratch_root,
)

TIMEOUT_S = 300  # a guard against a hang, not a speed check


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_markers_are_well_formed_and_every_shown_output_is_compared(path):
    blocks, problems = parse(path)
    for block in blocks:  # a skip reason that names where a block runs must name a real file
        for named in re.findall(r"[\w./-]+\.py|\.ci/run", block.skip_reason or ""):
            if "/" in named and not (ROOT / named).exists():
                problems.append(f"{block.id}: the skip reason names {named}, which does not exist")
    assert not problems, "\n".join(problems)


def _skip_unless_runnable(block: Block) -> None:
    if block.skip_reason:
        pytest.skip(block.skip_reason)
    if block.launcher:
        pytest.skip(f"runs under {block.launcher[0]} in ddp_tests/test_docs_ddp.py")


@pytest.mark.parametrize("block", all_blocks("python"), ids=lambda b: b.id)
def test_python_block_runs_and_prints_what_the_docs_show(block: Block, tmp_path):
    _skip_unless_runnable(block)
    cwd = scratch_root(tmp_path)
    script = tmp_path / f"docs_block_{block.line}.py"
    script.write_text(block.code)
    done = run([sys.executable, str(script)], cwd, TIMEOUT_S)
    assert done.returncode == 0, f"{block.id} failed:\n{done.stdout}\n{done.stderr}"
    if block.expected is not None:
        assert normalised(done.stdout) == normalised(block.expected), (
            f"{block.id} printed something else than the docs show:\n{done.stdout}"
        )


@pytest.mark.parametrize("block", all_blocks("bash"), ids=lambda b: b.id)
def test_bash_block_runs(block: Block, tmp_path):
    _skip_unless_runnable(block)
    cwd = scratch_root(tmp_path)
    for command in bash_commands(block):
        done = run(["bash", "-c", f"set -euo pipefail; {command}"], cwd, TIMEOUT_S)
        assert done.returncode == 0, (
            f"{block.id}: `{command}` failed:\n{done.stdout}\n{done.stderr}"
        )


def test_install_commands_pin_the_cpu_torch_first():
    for block in all_blocks("bash"):
        for command in bash_commands(block):
            if "pip install" in command:
                assert "pip install torch==2.13.0 " in command, f"{block.id}: {command}"


def test_user_facing_text_cites_no_internal_sections():
    """Users cannot look up the project's contract or issues."""
    texts = [
        *ROOT.glob("*.md"),
        *(ROOT / "docs").glob("*.md"),
        *(ROOT / "scripts").glob("*"),
        *(ROOT / "imbalanced_losses").rglob("*.py"),
    ]
    pattern = re.compile(r"\bcontract\b|§\s*\d", re.IGNORECASE)
    hits = [
        f"{p.relative_to(ROOT)}:{n}: {line.strip()}"
        for p in texts
        if p.is_file() and p.name != "CHANGELOG.md"
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not hits, "\n".join(hits)


def _starts_a_process_group(block: Block) -> bool:
    return bool(block.launcher) or "init_process_group" in block.code


@pytest.mark.parametrize(
    "block", [b for b in all_blocks("python") if _starts_a_process_group(b)], ids=lambda b: b.id
)
def test_distributed_example_ends_with_the_gloo_exit_remedy(block: Block):
    """The exit-time abort is intermittent, so the launches in ddp_tests cannot always show a
    missing remedy; this check does: barrier, destroy the group, flush, then ``os._exit(0)``."""
    steps = [
        r"dist\.barrier\(\)|wait_for_everyone\(\)",
        r"destroy_process_group\(\)",
        r"sys\.stdout\.flush\(\)",
        r"^os\._exit\(0\)",
    ]
    lines = [line.strip() for line in block.code.strip().splitlines()]
    assert re.search(steps[-1], lines[-1]), f"{block.id}: the last line should be os._exit(0)"
    found = [
        max((i for i, line in enumerate(lines) if re.search(step, line)), default=-1)
        for step in steps
    ]
    assert -1 not in found and found == sorted(found), (
        f"{block.id}: the script should end with barrier, destroy_process_group(), "
        f"sys.stdout.flush(), os._exit(0) in that order; got the last lines {lines[-6:]}"
    )


# A measured figure in scientific notation below 1e-9 is a float-rounding residue (a last-bit
# gap), whose digits change with the CPU, the thread count and the BLAS build: docs print a
# verdict against a tolerance instead. A tolerance itself ("to 1e-12", "limit 1e-09") is fine.
ROUNDING_RESIDUE = re.compile(
    r"(?<!to )(?<!limit )(?<!tolerance )\b\d(?:\.\d+)?e-(?:[1-9]\d|0?9)\b", re.IGNORECASE
)


def test_printed_outputs_pin_no_float_rounding_residue():
    """Every output block is compared with what its code prints; none may pin a last-bit gap."""
    hits = [
        f"{block.id}: {line.strip()}"
        for block in all_blocks("python")
        if block.expected is not None
        for line in block.expected.splitlines()
        if ROUNDING_RESIDUE.search(line)
    ]
    assert not hits, "output blocks pin rounding-dependent figures:\n" + "\n".join(hits)
