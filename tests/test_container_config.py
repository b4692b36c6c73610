"""The container build's configuration, offline: the Cloud Build pipeline's steps, the Dockerfile's
runtime stage, .dockerignore and docker-compose.yml. (`make container-test` builds and runs the
images for real; the Cloud Build schema check is in test_repo.py.)"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import yaml

from .helpers import REPO

FUNCTIONS = ("sentiment", "classify")


@pytest.fixture(scope="module")
def cloudbuild() -> dict[str, Any]:
    config = yaml.safe_load((REPO / "cloudbuild.yaml").read_text())
    assert isinstance(config, dict)
    return config


def steps(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["id"]: s for s in config["steps"]}


def image(function: str) -> str:
    return f"${{_REGION}}-docker.pkg.dev/$PROJECT_ID/${{_REPOSITORY}}/{function}:$COMMIT_SHA"


def test_the_tests_run_first_then_both_images_build_in_parallel(cloudbuild) -> None:
    by_id = steps(cloudbuild)
    assert cloudbuild["steps"][0]["id"] == "test"
    assert "make test" in " ".join(by_id["test"]["args"])
    for f in FUNCTIONS:
        build = by_id[f"build-{f}"]
        # Waiting only for the tests: the two builds run at the same time.
        assert build["waitFor"] == ["test"]
        assert build["args"][0] == "build"
        assert f"--build-arg=FUNCTION={f}" in build["args"]
        assert "--build-arg=TORCH_INDEX=${_TORCH_INDEX}" in build["args"]
        assert build["args"][-1] == "."


def test_images_are_tagged_with_the_commit_and_pushed_to_artifact_registry(cloudbuild) -> None:
    by_id = steps(cloudbuild)
    for f in FUNCTIONS:
        assert f"--tag={image(f)}" in by_id[f"build-{f}"]["args"]
        push = by_id[f"push-{f}"]
        assert push["waitFor"] == [f"build-{f}"]
        script = push["args"][-1]
        assert f"image={image(f)}\n" in script
        assert 'docker push "$$image"' in script
        # The digest the registry now holds, for the deploy step.
        assert f'{{{{index .RepoDigests 0}}}}\' "$$image" > /workspace/{f}.image' in script


def test_deploy_waits_for_both_pushes_and_deploys_by_digest(cloudbuild) -> None:
    deploy = steps(cloudbuild)["deploy"]
    assert sorted(deploy["waitFor"]) == ["push-classify", "push-sentiment"]
    script = deploy["args"][-1]
    assert "for f in sentiment classify; do" in script
    assert 'image=$$(cat "/workspace/$$f.image")' in script
    # Refuses anything but a digest reference, then deploys exactly that.
    assert '*@sha256:*) ;; *) echo "no digest' in script
    assert 'gcloud run deploy "${_SERVICE_PREFIX}-$$f" --image="$$image"' in script
    assert ":$COMMIT_SHA" not in script
    assert cloudbuild["steps"][-1]["id"] == "deploy"


def test_substitutions_are_defined_used_and_documented(cloudbuild) -> None:
    text = (REPO / "cloudbuild.yaml").read_text()
    header = text[: text.index("substitutions:")]
    body = text[text.index("steps:") :]
    defined = set(cloudbuild["substitutions"])
    used = set(re.findall(r"\$\{(_[A-Z0-9_]+)\}", body))
    assert used == defined
    for name in defined:
        assert re.search(rf"^#\s+{name}\s", header, re.M), f"{name} is not documented"
    assert "gcloud run deploy" in header
    assert "terraform" in header.lower()


def dockerfile_stages() -> dict[str, list[str]]:
    """Instructions (continuation lines joined) of each stage, by stage name."""
    text = re.sub(r"\\\n\s*", " ", (REPO / "Dockerfile").read_text())
    stages: dict[str, list[str]] = {"": []}
    current = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.I)
        if m:
            current = m.group(1)
            stages[current] = []
        stages[current].append(line)
    return stages


def test_the_runtime_stage_is_what_cloud_run_runs() -> None:
    stages = dockerfile_stages()
    assert list(stages)[-1] == "runtime"
    runtime = stages["runtime"]
    assert runtime[0] == "FROM ${BASE_IMAGE} AS runtime"
    user = next(i.split()[1] for i in runtime if i.startswith("USER "))
    assert not user.startswith(("0", "root"))
    cmd = next(i for i in runtime if i.startswith("CMD "))
    assert json.loads(cmd.removeprefix("CMD ")) == ["functions-framework"]  # exec form
    env = " ".join(i for i in runtime if i.startswith("ENV "))
    for setting in (
        "WORKERS=1",
        "FUNCTION_TARGET=${FUNCTION}",
        "FUNCTION_SIGNATURE_TYPE=http",
        "MODEL_DIR=/app/models/${FUNCTION}",
    ):
        assert setting in env.split()
    # The function sizes these from the instance's CPUs; the image must not pin them.
    assert not re.search(r"\b(THREADS|MODEL_WORKERS|INTRA_OP_THREADS)=", env)
    assert "PORT=" not in env  # Cloud Run's


def test_layers_go_from_least_to_most_often_changed() -> None:
    copies = [i for i in dockerfile_stages()["runtime"] if i.startswith("COPY ")]
    assert copies == [
        "COPY --from=venv /opt/venv /opt/venv",
        "COPY --from=model /model /app/models/${FUNCTION}",
        "COPY --from=common /opt/aifn-serve /opt/aifn",
        "COPY --from=function /function/ /app/functions/${FUNCTION}/",
    ]


def test_the_runtime_gets_no_build_time_code() -> None:
    """aifn.build (model sources, export, fine-tuning) and the function's recipe stay in the
    build: the runtime copies the package and the folder from stages that removed them."""
    common = " ".join(dockerfile_stages()["common"])
    assert "rm -r /opt/aifn-serve/aifn/build" in common
    function = " ".join(dockerfile_stages()["function"])
    assert "rm -f /function/recipe.py /function/bbc.py" in function


def test_base_image_and_torch_index_are_pinned_build_arguments() -> None:
    args = dict(i.split(None, 1)[1].split("=", 1) for i in dockerfile_stages()[""] if "=" in i)
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", args["BASE_IMAGE"])
    deps = " ".join(dockerfile_stages()["deps"])
    # What serving imports only: torch and its index belong to the model stage.
    assert "-r /tmp/requirements/runtime.txt" in deps
    assert "TORCH" not in deps
    assert "build.txt" not in deps
    model = " ".join(dockerfile_stages()["model"])
    assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in model
    assert "-r /tmp/requirements/build.txt" in model
    assert "ARG MODEL_SOURCE=models/${FUNCTION}" in model
    assert "-m aifn.build.model_source --source" in model
    # The image gets only what serving reads of the prepared model.
    assert "--serving-copy /model" in model


def test_the_requirements_split_serving_from_building() -> None:
    runtime = (REPO / "requirements" / "runtime.txt").read_text(encoding="utf-8")
    build = (REPO / "requirements" / "build.txt").read_text(encoding="utf-8")
    pinned = {
        line.split("==")[0].lower()
        for line in runtime.splitlines()
        if "==" in line and not line.startswith("#")
    }
    assert {"onnxruntime", "numpy", "tokenizers", "flask", "functions-framework"} <= pinned
    assert not {"torch", "transformers", "safetensors", "onnx", "huggingface-hub"} & pinned
    assert re.search(r"^torch==", build, re.M)
    assert re.search(r"^transformers==", build, re.M)


def test_dockerignore_keeps_the_models_and_drops_local_state() -> None:
    lines = [
        line
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    # Everything is excluded, then only what the images need comes back.
    assert lines[0] == "*"
    assert {"!common/", "!functions/", "!requirements/", "!models/"} <= set(lines)
    assert not any(
        line.startswith("!") and line.rstrip("/") in {"!.venv", "!.cache"} for line in lines
    )


def test_compose_runs_both_functions_against_redis() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert "redis" in services
    for f in FUNCTIONS:
        service = services[f]
        assert service["build"]["args"]["FUNCTION"] == f
        assert service["environment"]["REDIS_URL"] == "redis://redis:6379/0"
        assert service["environment"]["PORT"] == "8080"
        assert "redis" in service["depends_on"]
        assert service["read_only"] is True
