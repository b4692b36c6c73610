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


# aifn's layers: what each may import (besides itself). core knows no transport; http and
# files both stand on core and never on each other; build is for build time only, so nothing
# that serves imports it (the serving image does not carry it).
LAYERS = {
    "core": {"core", "settings"},
    "settings": {"core"},
    "logs": set(),
    "http": {"core", "settings", "logs", "http"},
    "files": {"core", "settings", "logs", "files"},
    "build": {"core", "settings", "logs", "build"},
}
AIFN = REPO / "common" / "src"


def aifn_imports() -> dict[str, set[str]]:
    """Each aifn module's imports of other aifn modules, wherever in the module they are
    (functions and ``TYPE_CHECKING`` blocks included)."""
    modules = {}
    for path in sorted((AIFN / "aifn").rglob("*.py")):
        name = ".".join(path.relative_to(AIFN).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    found.add(full if full in modules else node.module)
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def test_aifn_has_no_import_cycles() -> None:
    graph = aifn_imports()
    assert "aifn.core.model" in graph, "the walk found nothing"
    assert "aifn.http.service" in graph
    done: set[str] = set()
    cycles = []

    def walk(module: str, path: list[str]) -> None:
        for dep in sorted(graph[module] - {"aifn"}):
            if dep in path:
                cycles.append([*path[path.index(dep) :], dep])
            elif dep not in done:
                walk(dep, [*path, dep])
        done.add(module)

    for module in sorted(graph):
        walk(module, [module])
    assert cycles == []


def test_aifn_layers_import_only_the_layers_below_them() -> None:
    def layer(module: str) -> str:
        return module.split(".")[1]

    wrong = sorted(
        f"{module} imports {dep}"
        for module, deps in aifn_imports().items()
        if module != "aifn"
        for dep in deps
        if dep != "aifn" and layer(dep) not in LAYERS[layer(module)] | {layer(module)}
    )
    assert wrong == []


def test_core_raises_errors_without_a_status_code() -> None:
    """The core says what went wrong; only the HTTP edge decides the status code."""
    from aifn.core import errors

    kinds = [v for v in vars(errors).values() if isinstance(v, type) and issubclass(v, Exception)]
    assert errors.Overloaded in kinds
    assert [k.__name__ for k in kinds if hasattr(k, "status") or hasattr(k, "headers")] == []
    for path in (AIFN / "aifn" / "core").glob("*.py"):
        for transport in ("import flask", "from flask", "werkzeug", "functions_framework"):
            assert transport not in path.read_text(), f"{path.name}: {transport}"
