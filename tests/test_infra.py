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

from .helpers import REPO

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


# --- make deploy, make destroy and cloudbuild.yaml (issue 17) ------------------------------------
# Google Cloud cannot be reached here: the scripts run for real with gcloud, docker and terraform
# replaced by stubs on PATH that record their arguments and answer like the real tools would.

DEPLOY = REPO / "infra" / "deploy.sh"
DESTROY = REPO / "infra" / "destroy.sh"

_STUB = r"""#!/usr/bin/env bash
# Records each call, one line per call; answers read-only queries from STUB_* variables.
echo "$(basename "$0") $*" >> "$STUB_LOG"
args="$*"
case "$(basename "$0") $args" in
  "docker manifest inspect"*) [ "${STUB_IMAGE_EXISTS:-0}" = 1 ] || exit 1 ;;
  "gcloud run services describe "*)
    for s in ${STUB_SERVICES:-}; do [ "$s" = "$4" ] && exit 0; done; exit 1 ;;
  "gcloud run jobs describe "*)
    for s in ${STUB_JOBS:-}; do [ "$s" = "$4" ] && exit 0; done; exit 1 ;;
  "docker image inspect"*)
    echo "europe-west1-docker.pkg.dev/p/aifn/x@sha256:$(printf '%064d' 9)" ;;
  "terraform "*" output -raw image_tag") echo "0123456789ab" ;;
  "terraform "*" destroy "*) exit "${STUB_DESTROY_RC:-0}" ;;
  "terraform "*" state list") printf '%s\n' ${STUB_STATE:-} ;;
esac
exit 0
"""


@pytest.fixture
def stubs(tmp_path: Path) -> dict[str, str]:
    """PATH with stub gcloud, docker and terraform in front; the calls go to STUB_LOG."""
    bin_dir = tmp_path / "stub-bin"
    bin_dir.mkdir()
    for tool in ("gcloud", "docker", "terraform"):
        exe = bin_dir / tool
        exe.write_text(_STUB)
        exe.chmod(0o755)
    return {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "STUB_LOG": str(tmp_path / "calls.log"),
    }


def _calls(env: dict[str, str]) -> list[str]:
    log = Path(env["STUB_LOG"])
    return log.read_text().splitlines() if log.exists() else []


def _cloudbuild_step(step_id: str, workspace: Path, **subs: str) -> str:
    """The bash script of a cloudbuild.yaml step, with Cloud Build's substitutions applied."""
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((REPO / "cloudbuild.yaml").read_text())
    values = {
        **config["substitutions"],
        "PROJECT_ID": "example-project",
        "COMMIT_SHA": "abc123",
        **subs,
    }
    (step,) = [s for s in config["steps"] if s["id"] == step_id]
    assert step["args"][0] == "-c", step_id
    script = step["args"][1].replace("$$", "\0")
    script = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values[m.group(1) or m.group(2)], script)
    return script.replace("\0", "$").replace("/workspace", str(workspace))


def _run_step(
    step_id: str, env: dict[str, str], workspace: Path, **subs: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", _cloudbuild_step(step_id, workspace, **subs)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        cwd=workspace,
    )


def test_a_rebuild_of_the_same_commit_pushes_nothing(stubs: dict[str, str], tmp_path: Path) -> None:
    # Tags are immutable in the repository: pushing <f>:<commit> a second time fails the build.
    stubs["STUB_IMAGE_EXISTS"] = "1"
    result = _run_step("push-sentiment", stubs, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    image = "europe-west1-docker.pkg.dev/example-project/aifn/sentiment:abc123"
    assert f"docker pull --quiet {image}" in _calls(stubs)
    assert not [c for c in _calls(stubs) if c.startswith("docker push")]
    assert "@sha256:" in (tmp_path / "sentiment.image").read_text()


def test_a_new_commit_is_pushed_and_recorded_by_digest(
    stubs: dict[str, str], tmp_path: Path
) -> None:
    result = _run_step("push-classify", stubs, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "docker push europe-west1-docker.pkg.dev/example-project/aifn/classify:abc123" in _calls(
        stubs
    )
    assert "@sha256:" in (tmp_path / "classify.image").read_text()


def _digests(workspace: Path) -> None:
    for f in ("sentiment", "classify"):
        (workspace / f"{f}.image").write_text(
            f"europe-west1-docker.pkg.dev/example-project/aifn/{f}@sha256:{'1' * 64}\n"
        )


def test_the_build_updates_existing_services_by_digest(
    stubs: dict[str, str], tmp_path: Path
) -> None:
    _digests(tmp_path)
    stubs["STUB_SERVICES"] = "aifn-sentiment aifn-classify aifn-classify-batch"
    stubs["STUB_JOBS"] = "aifn-classify-job"
    result = _run_step("deploy", stubs, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    updates = [c for c in _calls(stubs) if " update " in c or c.startswith("gcloud run deploy")]
    image = "--image=europe-west1-docker.pkg.dev/example-project/aifn/{}@sha256:" + "1" * 64
    tail = " --region=europe-west1 --quiet"
    assert updates == [
        "gcloud run deploy aifn-sentiment " + image.format("sentiment") + tail,
        "gcloud run deploy aifn-classify " + image.format("classify") + tail,
        "gcloud run services update aifn-classify-batch " + image.format("classify") + tail,
        "gcloud run jobs update aifn-classify-job " + image.format("classify") + tail,
    ]
    # Each service is looked up before it is deployed to (the deploy only ever updates).
    calls = _calls(stubs)
    for f in ("sentiment", "classify"):
        looked_up = _index(calls, f"gcloud run services describe aifn-{f} ")
        assert looked_up < _index(calls, f"gcloud run deploy aifn-{f} ")


def test_the_build_never_creates_a_service(stubs: dict[str, str], tmp_path: Path) -> None:
    # `gcloud run deploy` before Terraform created aifn-sentiment outside Terraform (default
    # compute account, no VPC), after which terraform apply failed on "already exists".
    _digests(tmp_path)
    result = _run_step("deploy", stubs, tmp_path)
    assert result.returncode == 1
    assert "aifn-sentiment is missing" in result.stderr
    assert "make deploy PROJECT=example-project REGION=europe-west1" in result.stderr
    assert not [c for c in _calls(stubs) if " update " in c or c.startswith("gcloud run deploy")]


def test_the_build_for_make_deploy_rolls_nothing_out(stubs: dict[str, str], tmp_path: Path) -> None:
    _digests(tmp_path)
    result = _run_step("deploy", stubs, tmp_path, _DEPLOY="false")
    assert result.returncode == 0, result.stderr
    assert _calls(stubs) == []


def _deploy(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(DEPLOY), *args],
        capture_output=True,
        text=True,
        check=False,
        env=env if env is not None else {**os.environ, "PROJECT": "", "REGION": ""},
    )


def _index(lines: list[str], needle: str) -> int:
    found = [i for i, line in enumerate(lines) if needle in line]
    assert found, f"{needle!r} not in:\n" + "\n".join(lines)
    return found[0]


def test_deploy_runs_the_stages_in_order() -> None:
    result = _deploy(
        "--dry-run", "--project", "example-project", "--region", "europe-west1", "--tag", "v1"
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    order = [
        "+ gcloud services enable serviceusage.googleapis.com",
        "+ gcloud beta services identity create --service eventarc.googleapis.com",
        "+ gcloud storage buckets create gs://example-project-tfstate --project example-project"
        " --location europe-west1 --uniform-bucket-level-access --public-access-prevention",
        "+ gcloud storage buckets update gs://example-project-tfstate --versioning",
        "init -input=false -backend-config=bucket=example-project-tfstate"
        " -backend-config=prefix=aifn/aifn",
        "-var image_tag=v1 -target=google_project_service.enabled",
        "+ gcloud builds submit",
        "apply -input=false -auto-approve -var project_id=example-project"
        " -var region=europe-west1 -var name_prefix=aifn -var image_tag=v1\n",
        "batch_dead_letter",
        "gcloud auth print-identity-token",
    ]
    text = result.stdout
    positions = [text.find(needle) for needle in order]
    assert all(p >= 0 for p in positions), [
        n for n, p in zip(order, positions, strict=True) if p < 0
    ]
    assert positions == sorted(positions), "the stages must run in this order"
    build = lines[_index(lines, "+ gcloud builds submit")]
    assert "_DEPLOY=false" in build
    assert "COMMIT_SHA=v1" in build
    assert "--service-account projects/example-project/serviceAccounts/" in build
    assert "/v1/analyze/sentiment" in text
    assert "/v1/classify" in text


def test_local_state_is_an_explicit_opt_in() -> None:
    remote = _deploy(
        "--dry-run", "--project", "example-project", "--region", "europe-west1", "--tag", "v1"
    )
    local = _deploy(
        "--dry-run",
        "--project",
        "example-project",
        "--region",
        "europe-west1",
        "--tag",
        "v1",
        "--local-state",
    )
    assert "-backend-config=bucket=" in remote.stdout
    assert "local_backend_override.tf" not in remote.stdout
    assert "gcloud storage buckets create" not in local.stdout
    assert "local_backend_override.tf" in local.stdout
    assert "-backend-config" not in local.stdout
    assert "hold secrets" in local.stdout


def test_deploy_needs_a_project_and_a_region() -> None:
    result = _deploy("--dry-run", "--region", "europe-west1")
    assert result.returncode == 1
    assert "--project (or PROJECT=) is required" in result.stderr
    assert (
        "zone"
        in _deploy("--dry-run", "--project", "example-project", "--region", "europe-west1-b").stderr
    )


def test_deploy_stage_one_is_what_the_tftest_applies() -> None:
    script = DEPLOY.read_text()
    targets = re.search(r"^STAGE1_TARGETS=\(\n(.*?)\n\)", script, re.S | re.M)
    assert targets
    tftest = (MODULE / "tests" / "deploy_steps.tftest.hcl").read_text()
    tested = re.search(r"target = \[\n(.*?)\n\s*\]", tftest, re.S)
    assert tested
    assert targets.group(1).split() == [t.strip().rstrip(",") for t in tested.group(1).splitlines()]


def test_destroy_explains_the_subnet_it_cannot_delete_yet(stubs: dict[str, str]) -> None:
    stubs.update(
        STUB_DESTROY_RC="1",
        STUB_STATE="google_compute_network.vpc google_compute_subnetwork.run"
        ' google_project_service.enabled["run.googleapis.com"]',
        PROJECT="example-project",
        REGION="europe-west1",
    )
    result = subprocess.run(
        ["bash", str(DESTROY)], env=stubs, capture_output=True, text=True, check=False
    )
    assert result.returncode == 3, result.stdout + result.stderr
    assert "releases them 1-2 hours" in result.stderr
    assert "Run make destroy again" in result.stderr
    calls = _calls(stubs)
    unlock = _index(calls, "apply -input=false -auto-approve")
    assert "-var image_tag=0123456789ab -var deletion_protection=false" in calls[unlock]
    assert unlock < _index(calls, " destroy ")


def test_destroy_reports_any_other_failure(stubs: dict[str, str]) -> None:
    stubs.update(
        STUB_DESTROY_RC="1",
        STUB_STATE='google_storage_bucket.this["models"] google_compute_subnetwork.run',
    )
    result = subprocess.run(
        ["bash", str(DESTROY), "--project", "example-project", "--region", "europe-west1"],
        env=stubs,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert "google_storage_bucket.this" in result.stderr
    assert "1-2 hours" not in result.stderr


def _resource_block(text: str, rtype: str, name: str) -> str:
    start = text.index(f'resource "{rtype}" "{name}" {{')
    return text[start : text.index("\n}\n", start) + 3]


@pytest.mark.parametrize(
    ("path", "rtype", "name"),
    [
        ("services.tf", "google_cloud_run_v2_service", "function"),
        ("batch.tf", "google_cloud_run_v2_service", "batch"),
        ("batch.tf", "google_cloud_run_v2_job", "batch"),
    ],
)
def test_the_ci_owned_variant_differs_only_in_owning_the_image(
    path: str, rtype: str, name: str
) -> None:
    # ignore_changes cannot depend on a variable, so image_owner picks one of two resources:
    # they must stay the same resource but for for_each and the CI variant's lifecycle.
    text = (MODULE / path).read_text()
    terraform_owned = _resource_block(text, rtype, name)
    ci_owned = _resource_block(text, rtype, f"{name}_ci")
    lifecycle = re.search(r"\n  lifecycle \{\n    ignore_changes = \[(.*?)\]\n  \}\n", ci_owned)
    assert lifecycle, "the CI variant must ignore the image"
    assert "containers[0].image" in lifecycle.group(1)
    assert "lifecycle" not in terraform_owned

    def body(block: str) -> str:
        block = block.replace(lifecycle.group(0), "\n") if lifecycle else block
        block = re.sub(r"#.*\n", "\n", block)
        block = re.sub(
            r'^resource "\w+" "\w+" \{\n  for_each = var\.image_owner == "\w+" \? ', "", block
        )
        return re.sub(r"\s+", " ", block)

    assert body(terraform_owned) == body(ci_owned)
