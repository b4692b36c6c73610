"""Repository-level checks: the Cloud Build config and Terraform formatting, offline."""

from __future__ import annotations

import os
import shutil
import subprocess

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
