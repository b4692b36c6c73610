"""Repository-level checks: the Cloud Build config and Terraform formatting, offline."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from .helpers import REPO, VENV_BIN


def test_cloudbuild_config_matches_the_cloud_build_schema() -> None:
    exe = shutil.which("check-jsonschema", path=str(VENV_BIN))
    assert exe, "check-jsonschema is not installed: run `make dev`"
    result = subprocess.run(
        [exe, "--builtin-schema", "vendor.cloudbuild", str(REPO / "cloudbuild.yaml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_cloudbuild_runs_the_readme_test_command() -> None:
    assert "make test" in (REPO / "cloudbuild.yaml").read_text()


def test_terraform_is_formatted() -> None:
    terraform = shutil.which("terraform")
    if terraform is None:
        pytest.skip("terraform is not on PATH (it is not in the package registries)")
    result = subprocess.run(
        [terraform, "fmt", "-check", "-recursive", "-diff", str(REPO / "infra" / "terraform")],
        capture_output=True,
        text=True,
        env={**os.environ, "CHECKPOINT_DISABLE": "1"},
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def borrowed_test_modules(tests: Path) -> list[str]:
    """Each import, anywhere under ``tests``, that names a test module (``test_*``)."""
    found = []
    for path in sorted(tests.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                module = node.module or ""
                names = [module] + [f"{module}.{alias.name}" for alias in node.names]
            else:
                continue
            if any(part.startswith("test_") for name in names for part in name.split(".")):
                found.append(f"{path.relative_to(tests)}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_test_module_imports_another() -> None:
    # What tests share lives in tests/helpers (or a conftest fixture): a helper borrowed from a
    # test module ties that module's tests to every borrower and hides where it lives.
    assert borrowed_test_modules(REPO / "tests") == []
