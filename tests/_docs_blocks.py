"""Code blocks of README.md and docs/*.md, their docs-test markers, and how to run them.

The line right before a fence may hold one marker:

* ``<!-- docs-test: skip (REASON) -->``: not run; REASON is the reported skip reason.
* ``<!-- docs-test: torchrun N -->``: a python block saved to a file and run with
  ``torchrun --standalone --nproc_per_node N``.
* ``<!-- docs-test: accelerate N -->``: the same under ``accelerate launch`` with the shipped
  CPU config and ``ACCELERATE_USE_CPU=1`` (what a script built on ``Accelerator`` needs here).
* ``<!-- docs-test: output -->`` on a text block: equals what the previous python block
  printed (trailing whitespace stripped).

A text block right after a python block must carry a marker, so no printed value shown in the
docs escapes the comparison. Each block runs in a fresh scratch directory that links every
tracked top-level entry of the repository (so ``scripts/...`` resolves as from the root) and
takes whatever the block writes, with the checkout first on ``PYTHONPATH``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = re.compile(r"^\s*<!--\s*docs-test:\s*(.*?)\s*-->\s*$")
MARKER_KINDS = re.compile(
    r"^(skip \((?P<reason>.+)\)|(?P<launcher>torchrun|accelerate) (?P<n>\d+)|output)$"
)
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[\w-]*)\s*$")
LAUNCH_ENV_VARS = (
    "WORLD_SIZE",
    "RANK",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
    "ACCELERATE_USE_CPU",
)


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    marker: str | None  # the marker text, e.g. "output", "torchrun 2", "skip (why)"
    expected: str | None = None  # for a python block: its output block's text

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def skip_reason(self) -> str | None:
        match = MARKER_KINDS.match(self.marker or "")
        return match["reason"] if match else None

    @property
    def launcher(self) -> tuple[str, int] | None:
        match = MARKER_KINDS.match(self.marker or "")
        return (match["launcher"], int(match["n"])) if match and match["launcher"] else None


def parse(path: Path) -> tuple[list[Block], list[str]]:
    """Every fenced block of ``path`` with its marker (python blocks get their output block),
    and the marker problems found, each naming its line."""
    lines = path.read_text().splitlines()
    blocks: list[Block] = []
    problems: list[str] = []
    i = 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        indent = fence["indent"]
        end = i + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        if end == len(lines):
            problems.append(f"{path.name}:{i + 1}: unclosed code fence")
        code = "\n".join(line[len(indent) :] for line in lines[i + 1 : end]) + "\n"
        previous = MARKER.match(lines[i - 1]) if i > 0 else None
        marker = previous[1] if previous else None
        if marker is not None and not MARKER_KINDS.match(marker):
            problems.append(f"{path.name}:{i}: unknown docs-test marker {marker!r}")
        blocks.append(Block(path, i + 1, fence["lang"], code, marker))
        i = end + 1
    return _attach_outputs(blocks, lines, problems), problems


def _attach_outputs(blocks: list[Block], lines: list[str], problems: list[str]) -> list[Block]:
    out: list[Block] = []
    for block in blocks:
        is_output = block.marker == "output"
        if is_output and (block.lang != "text" or not out or out[-1].lang != "python"):
            problems.append(
                f"{block.id}: an output marker belongs on a text block right after a python block"
            )
            continue
        if is_output:
            out[-1] = Block(**{**out[-1].__dict__, "expected": block.code})
        elif block.lang == "text" and out and out[-1].lang == "python" and block.marker is None:
            between = lines[out[-1].line : block.line - 1]
            closing = next(k for k, line in enumerate(between) if line.strip() == "```")
            if not "".join(between[closing + 1 :]).strip():
                problems.append(
                    f"{block.id}: a text block right after a python block needs "
                    "<!-- docs-test: output --> (or a skip marker with a reason)"
                )
        out.append(block)
    return out


def all_blocks(lang: str) -> list[Block]:
    return [b for path in DOC_FILES for b in parse(path)[0] if b.lang == lang]


def normalised(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.strip("\n").splitlines())


def scratch_root(tmp: Path) -> Path:
    """A directory that reads like the repository root but keeps what a block writes."""
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    for top in sorted({name.split("/")[0] for name in tracked}):
        if (ROOT / top).exists():
            (tmp / top).symlink_to(ROOT / top)
    return tmp


def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV_VARS}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
    env["MPLBACKEND"] = "Agg"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run(
    cmd: list[str], cwd: Path, timeout: float, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own session; on timeout kill the whole session, then raise."""
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env or environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{' '.join(cmd)} ran past {timeout:.0f}s\n{out}\n{err}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def launch_command(block: Block, script: Path) -> list[str]:
    """The launcher a ``torchrun N`` / ``accelerate N`` block runs under."""
    assert block.launcher is not None
    kind, n = block.launcher
    if kind == "torchrun":
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(n),
            str(script),
        ]
    accelerate = shutil.which("accelerate", path=environment()["PATH"]) or "accelerate"
    return [
        accelerate,
        "launch",
        "--config_file",
        str(ROOT / "scripts/accelerate_cpu_2ranks.yaml"),
        "--num_processes",
        str(n),
        str(script),
    ]


def bash_commands(block: Block) -> list[str]:
    """Each command of a bash block: continuation lines joined, comments and blanks dropped."""
    commands, current = [], ""
    for line in block.code.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        commands.append(current + stripped)
        current = ""
    return commands
