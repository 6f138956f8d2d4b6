"""CI runs exactly the test command the README gives a new user (.ci/run and README agree)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command():
    readme = re.findall(
        r"pip install torch==2\.13\.0 tox && (tox -e [\w,]+)", (ROOT / "README.md").read_text()
    )
    ci = [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines()]
    tox_lines = [line for line in ci if line.startswith("tox ")]
    assert len(readme) == 1 and tox_lines == readme, (readme, tox_lines)
    assert "python -m pip install --quiet torch==2.13.0 tox" in ci
