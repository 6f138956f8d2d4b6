"""docs/api.md is generated from the docstrings; this test keeps the two from drifting apart.

It regenerates the page into a temporary file with scripts/gen_api_docs.py and compares it with
the committed one. When it fails, run ``python scripts/gen_api_docs.py`` and commit the result.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gen_api_docs.py"
PAGE = REPO / "docs" / "api.md"


def _generator():
    spec = importlib.util.spec_from_file_location("gen_api_docs", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_api_reference_is_regenerated_from_the_current_docstrings(tmp_path: Path) -> None:
    fresh = tmp_path / "api.md"
    assert _generator().main(["--output", str(fresh)]) == 0
    committed = PAGE.read_text() if PAGE.exists() else ""
    assert committed == fresh.read_text(), (
        "docs/api.md is out of date with the docstrings; "
        "run `python scripts/gen_api_docs.py` and commit docs/api.md"
    )


def test_api_reference_documents_every_public_name() -> None:
    import imbalanced_losses
    import imbalanced_losses.testing

    page = PAGE.read_text()
    for module in (imbalanced_losses, imbalanced_losses.testing):
        for name in getattr(module, "__all__", ()):
            assert f"### `{name}(" in page, f"{module.__name__}.{name} missing from docs/api.md"
