"""The documentation site: it builds with --strict, and its generated tables cannot go stale."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path
from types import ModuleType

from .helpers import REPO, VENV_BIN


def _hooks() -> ModuleType:
    spec = importlib.util.spec_from_file_location("aifn_docs_hooks", REPO / "docs" / "hooks.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_site_builds_strictly_with_the_readme_as_home(tmp_path: Path) -> None:
    exe = shutil.which("mkdocs", path=str(VENV_BIN))
    assert exe, "mkdocs is not installed: run `make dev`"
    site = tmp_path / "site"
    result = subprocess.run(
        [exe, "build", "--strict", "--quiet", "--config-file", "mkdocs.yml", "--site-dir", site],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "make serve" in (site / "index.html").read_text(encoding="utf-8")
    assert "MAX_BATCH_TEXTS" in (site / "configuration" / "index.html").read_text(encoding="utf-8")
    # Files outside docs/ that pages link to are in the site, so the links work there too.
    for path in ("repo/SECURITY/index.html", "repo/bench/figures/load.png"):
        assert (site / path).is_file(), path


def test_a_stale_generated_table_is_reported_and_replaced() -> None:
    hooks = _hooks()
    page = (REPO / "docs" / "api.md").read_text(encoding="utf-8")
    fresh, stale = hooks.render_tables(page, "docs/api.md")
    assert (fresh, stale) == (page, [])
    edited = page.replace("No endpoint at this path.", "No endpoint here.")
    assert edited != page
    fresh, stale = hooks.render_tables(edited, "docs/api.md")
    assert fresh == page
    assert stale == ["docs/api.md: the errors_table() table is stale: run `make docs-tables`"]
