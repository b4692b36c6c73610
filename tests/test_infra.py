"""The Terraform deployment's offline checking, itself checked: the schema derived from the
published bindings has the real provider's shape, and `terraform validate` against it rejects a
broken module (an unknown argument, a missing required block, a second single block, a reference
to an attribute that does not exist).

Uses the tools `make infra-check` prepares (in .cache/infra and the machine's cache; prepared
here when missing).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .conftest import REPO

MODULE = REPO / "infra" / "terraform"
TOOLS = REPO / "infra" / "tools"
CACHE = Path(os.environ.get("AIFN_INFRA_CACHE", REPO / ".cache" / "infra"))


@pytest.fixture(scope="module")
def infra_env() -> dict[str, str]:
    """Environment for terraform with the stand-in provider mirror (prepared if missing)."""
    if shutil.which("terraform") is None:
        pytest.skip("terraform is not on PATH (it is not in the package registries)")
    if not (CACHE / "terraformrc").is_file() or not (CACHE / "schema.json").is_file():
        subprocess.run(["bash", str(TOOLS / "check.sh"), "setup"], check=True, cwd=REPO)
    return {
        **os.environ,
        "CHECKPOINT_DISABLE": "1",
        "TF_CLI_CONFIG_FILE": str(CACHE / "terraformrc"),
        "TF_IN_AUTOMATION": "1",
    }


@pytest.fixture(scope="module")
def schema(infra_env: dict[str, str]) -> dict[str, Any]:
    doc = json.loads((CACHE / "schema.json").read_text())
    return doc["provider_schemas"]["registry.terraform.io/hashicorp/google"]  # type: ignore[no-any-return]


def _copy_module(dest: Path) -> Path:
    shutil.copytree(
        MODULE,
        dest,
        ignore=shutil.ignore_patterns(".terraform", ".terraform.lock.hcl", "*.tfstate*", "tests"),
    )
    return dest


def _validate(work: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    init = subprocess.run(
        ["terraform", f"-chdir={work}", "init", "-backend=false", "-input=false", "-no-color"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert init.returncode == 0, init.stdout + init.stderr
    return subprocess.run(
        ["terraform", f"-chdir={work}", "validate", "-no-color"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )


def _errors(result: subprocess.CompletedProcess[str]) -> str:
    """Terraform's error text with its line wrapping undone."""
    assert result.returncode != 0, "validate accepted a broken module:\n" + result.stdout
    return " ".join(result.stderr.split())


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) >= 1, f"{old!r} not in {path.name}: update this test"
    path.write_text(text.replace(old, new, 1))


@pytest.fixture
def module_copy(tmp_path: Path) -> Path:
    return _copy_module(tmp_path / "terraform")


def test_the_module_as_committed_validates(module_copy: Path, infra_env: dict[str, str]) -> None:
    result = _validate(module_copy, infra_env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "The configuration is valid" in result.stdout


def test_an_unknown_argument_is_rejected(module_copy: Path, infra_env: dict[str, str]) -> None:
    # A plausible typo: Cloud Run v2 calls it max_instance_request_concurrency.
    _edit(
        module_copy / "services.tf",
        "max_instance_request_concurrency = each.value.concurrency",
        "container_concurrency = each.value.concurrency",
    )
    assert 'An argument named "container_concurrency" is not expected here' in _errors(
        _validate(module_copy, infra_env)
    )


def test_a_missing_required_block_is_rejected(module_copy: Path, infra_env: dict[str, str]) -> None:
    # google_secret_manager_secret requires exactly one replication block.
    redis_tf = module_copy / "redis.tf"
    text = redis_tf.read_text()
    without = re.sub(r"\n  replication \{\n.*?\n  \}\n", "\n", text, count=1, flags=re.S)
    assert without != text
    redis_tf.write_text(without)
    assert "Insufficient replication blocks" in _errors(_validate(module_copy, infra_env))


def test_a_second_single_block_is_rejected(module_copy: Path, infra_env: dict[str, str]) -> None:
    # scaling is a list block with at most one item in the provider's schema.
    _edit(
        module_copy / "services.tf",
        "    scaling {\n",
        "    scaling {\n      min_instance_count = 0\n    }\n    scaling {\n",
    )
    assert "Too many scaling blocks" in _errors(_validate(module_copy, infra_env))


def test_a_reference_to_a_missing_attribute_is_rejected(
    module_copy: Path, infra_env: dict[str, str]
) -> None:
    _edit(
        module_copy / "outputs.tf",
        "google_redis_instance.cache[0].host ",
        "google_redis_instance.cache[0].hostname ",
    )
    assert (
        'This object has no argument, nested block, or exported attribute named "hostname"'
        in _errors(_validate(module_copy, infra_env))
    )


def test_a_wrong_type_is_rejected(module_copy: Path, infra_env: dict[str, str]) -> None:
    # auth_enabled is a bool in the schema; a list can never convert to one.
    _edit(
        module_copy / "redis.tf",
        "auth_enabled            = true",
        'auth_enabled            = ["yes"]',
    )
    assert "Incorrect attribute value type" in _errors(_validate(module_copy, infra_env))


def test_schema_has_the_real_providers_shape(schema: dict[str, Any]) -> None:
    """Facts from the provider's documentation, as the derived schema must state them."""
    run = schema["resource_schemas"]["google_cloud_run_v2_service"]["block"]
    assert run["attributes"]["name"] == {"type": "string", "required": True}
    assert run["attributes"]["uri"] == {"type": "string", "computed": True}
    assert run["attributes"]["labels"] == {"type": ["map", "string"], "optional": True}
    template = run["block_types"]["template"]
    assert (template["nesting_mode"], template["min_items"], template["max_items"]) == (
        "list",
        1,
        1,
    )
    containers = template["block"]["block_types"]["containers"]
    assert containers["nesting_mode"] == "list"
    assert "max_items" not in containers
    env = containers["block"]["block_types"]["env"]
    assert env["nesting_mode"] == "set"
    assert env["block"]["attributes"]["name"] == {"type": "string", "required": True}
    probe = containers["block"]["block_types"]["startup_probe"]
    assert probe["max_items"] == 1
    assert "http_get" in probe["block"]["block_types"]
    assert run["block_types"]["timeouts"]["nesting_mode"] == "single"

    redis = schema["resource_schemas"]["google_redis_instance"]["block"]["attributes"]
    assert redis["memory_size_gb"] == {"type": "number", "required": True}
    assert redis["auth_string"]["computed"] is True
    cert = redis["server_ca_certs"]
    assert cert["computed"] is True
    assert cert["type"][0] == "list"
    assert cert["type"][1][0] == "object"
    assert cert["type"][1][1]["cert"] == "string"

    trigger = schema["resource_schemas"]["google_eventarc_trigger"]["block"]["block_types"]
    assert trigger["matching_criteria"]["nesting_mode"] == "set"
    assert trigger["matching_criteria"]["min_items"] == 1
    assert trigger["destination"]["min_items"] == 1

    provider = schema["provider"]["block"]["attributes"]
    assert provider["project"] == {"type": "string", "optional": True}
    assert "alias" not in provider


def test_schema_covers_exactly_the_types_the_module_uses(schema: dict[str, Any]) -> None:
    used = set(
        re.findall(
            r'^resource "(google_\w+)"', "\n".join(p.read_text() for p in MODULE.glob("*.tf")), re.M
        )
    )
    assert used == set(schema["resource_schemas"])


def test_derivation_refuses_a_type_the_provider_does_not_have(
    tmp_path: Path, infra_env: dict[str, str]
) -> None:
    (tmp_path / "main.tf").write_text('resource "google_cloud_run_v3_service" "x" {}\n')
    wheels = sorted(CACHE.glob("cdktn_provider_google-*.whl"))
    assert wheels, "the bindings wheel is missing from .cache/infra"
    result = subprocess.run(
        [
            sys.executable,
            str(TOOLS / "provider_schema.py"),
            "--wheel",
            str(wheels[-1]),
            "--config",
            str(tmp_path),
            "--out",
            str(tmp_path / "schema.json"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert "not in hashicorp/google" in result.stderr
    assert "cloud-run-v3-service" in result.stderr
    assert not (tmp_path / "schema.json").exists()


def test_the_stand_in_lock_file_stays_out_of_the_repository() -> None:
    assert not (MODULE / ".terraform.lock.hcl").exists()
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", "infra/terraform/.terraform.lock.hcl"], cwd=REPO, check=False
    )
    assert ignored.returncode == 0, ".gitignore must cover infra/terraform/.terraform.lock.hcl"
