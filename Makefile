# The two commands a newcomer needs:  `make serve`  and  `make test`.
# Everything else here is what those two depend on, plus a few tools for contributors.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
# Extra pip arguments for torch, e.g. TORCH_INDEX='--index-url https://download.pytorch.org/whl/cpu'
# on machines where PyPI's default torch wheel is the multi-GB CUDA build.
TORCH_INDEX ?=

# Where each function's model comes from (docs/models.md, "Model sources") and where it is prepared.
SENTIMENT_MODEL_SOURCE ?= recipe:functions/sentiment/recipe.py
CLASSIFY_MODEL_SOURCE ?= recipe:functions/classify/recipe.py
MODELS := models
# What `make serve` serves; e.g. CLASSIFY_MODEL_DIR=models/classify-tuned after `make train`.
SENTIMENT_MODEL_DIR ?= $(MODELS)/sentiment
CLASSIFY_MODEL_DIR ?= $(MODELS)/classify
PORT ?= 8080
CLASSIFY_PORT ?= 8081
# `make train`: a labelled JSONL or CSV file (local or gs://), optional separate test file.
DATA ?=
EVAL_DATA ?=
DEST ?= $(MODELS)/classify-tuned
TRAIN_ARGS ?=
# `make batch`: a JSONL or CSV file (local or gs://) through one function's model.
FUNCTION ?= sentiment
INPUT ?=
OUTPUT ?=
BATCH_ARGS ?=

# The machine's cache, shared by every clone: prepared models by fingerprint (aifn.build.model_cache),
# downloads, the container test's Docker data root, infra-check's tools, mypy's cache.
AIFN_CACHE := $(or $(AIFN_CACHE_DIR),$(or $(XDG_CACHE_HOME),$(HOME)/.cache)/aifn)

RUNTIME_STAMP := $(VENV)/.runtime-installed
DEV_STAMP := $(VENV)/.dev-installed

.PHONY: help serve test test-fast lint fmt model train batch venv dev clean clean-cache bench bench-cache bench-cache-scope bench-work-limits bench-threads bench-load bench-batch-memory services infra-check

help:  ## List the targets.
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(RUNTIME_STAMP): requirements/runtime.txt requirements/build.txt common/pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
		|| { echo "Python 3.11+ is required (PYTHON=$(PYTHON))"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -r requirements/runtime.txt
	@# The build tools (torch, transformers, onnx), every dependency pinned in build.txt: torch on
	@# its own first, from TORCH_INDEX (elsewhere PyPI's default torch can be the CUDA build).
	$(PIP) install --quiet --no-deps $(TORCH_INDEX) "$$(grep -E '^torch==' requirements/build.txt)"
	$(PIP) install --quiet --no-deps -r requirements/build.txt
	$(PIP) install --quiet --no-deps -e common
	touch $@

$(DEV_STAMP): $(RUNTIME_STAMP) requirements/dev.txt
	$(PIP) install --quiet -r requirements/dev.txt
	touch $@

venv: $(RUNTIME_STAMP)  ## Create .venv with the runtime (serving) and build (training, export) dependencies.

dev: $(DEV_STAMP)  ## Add the test and lint tools.

model: $(RUNTIME_STAMP)  ## Prepare models/sentiment and models/classify (cached until their inputs change).
	HF_HUB_OFFLINE=1 $(PY) -m aifn.build.model_source \
		--source "$(SENTIMENT_MODEL_SOURCE)" --dest $(MODELS)/sentiment
	HF_HUB_OFFLINE=1 $(PY) -m aifn.build.model_source \
		--source "$(CLASSIFY_MODEL_SOURCE)" --dest $(MODELS)/classify

train: $(RUNTIME_STAMP)  ## Fine-tune a classifier: make train DATA=tickets.jsonl [EVAL_DATA=..] [DEST=..]
	@test -n "$(DATA)" || { echo "usage: make train DATA=file.jsonl|file.csv|gs://.. [EVAL_DATA=..] [DEST=$(DEST)]"; exit 2; }
	HF_HUB_OFFLINE=1 $(PY) -m aifn.build.train --data "$(DATA)" --dest "$(DEST)" \
		$(if $(EVAL_DATA),--eval-data "$(EVAL_DATA)") $(TRAIN_ARGS)

batch: model  ## Predictions for a file: make batch FUNCTION=sentiment|classify INPUT=file.jsonl|.csv|gs://.. [OUTPUT=..]
	@test -n "$(INPUT)" || { echo "usage: make batch FUNCTION=sentiment|classify INPUT=file.jsonl|file.csv|gs://.. [OUTPUT=..] [BATCH_ARGS='--options {\"labels\": [..]}']"; exit 2; }
	MODEL_DIR=$(if $(filter classify,$(FUNCTION)),$(CLASSIFY_MODEL_DIR),$(SENTIMENT_MODEL_DIR)) \
	HF_HUB_OFFLINE=1 $(PY) -m aifn.files --function "$(FUNCTION)" "$(INPUT)" \
		$(if $(OUTPUT),--output "$(OUTPUT)") $(BATCH_ARGS)

# Both functions, each in its own functions-framework (gunicorn) process, as on Cloud Run; Ctrl-C
# or either process exiting stops both.
serve: model  ## Serve sentiment on :$(PORT) and classify on :$(CLASSIFY_PORT) (gunicorn via functions-framework).
	@echo "sentiment: http://localhost:$(PORT)/v1/analyze/sentiment"
	@echo "classify:  http://localhost:$(CLASSIFY_PORT)/v1/classify   (Ctrl-C stops both)"
	export HF_HUB_OFFLINE=1 WORKERS=1; \
	trap 'kill $$(jobs -p) 2>/dev/null; wait' EXIT; \
	MODEL_DIR=$(SENTIMENT_MODEL_DIR) $(VENV)/bin/functions-framework --target sentiment \
		--source functions/sentiment/main.py --port $(PORT) & \
	MODEL_DIR=$(CLASSIFY_MODEL_DIR) $(VENV)/bin/functions-framework --target classify \
		--source functions/classify/main.py --port $(CLASSIFY_PORT) & \
	wait -n

# The suite starts its own redis-server processes; install the binary if it is missing.
services:
	@command -v redis-server >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing redis-server (apt-get)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; \
	  else \
	    echo "the tests need redis-server: sudo apt-get install redis-server (or brew install redis)"; exit 1; \
	  fi; }

test: $(DEV_STAMP) model services  ## Run the whole test suite (unit, integration, HTTP, Redis, storage emulator).
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(DEV_STAMP) model services  ## The inner loop: every test not marked slow (acceptance figures, fine-tunes, faults, fuzzing).
	HF_HUB_OFFLINE=1 $(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: $(DEV_STAMP)  ## ruff (lint + format check) and mypy (strict) on common/, each function and the Python client.
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	@# mypy's cache is checked file by file (hashes), so every clone on the machine can share it.
	MYPY_CACHE_DIR=$(AIFN_CACHE)/mypy $(VENV)/bin/mypy
	@# One run per function: each folder is its own top-level import root (main, recipe, ...).
	for f in functions/*/; do MYPY_CACHE_DIR=$(AIFN_CACHE)/mypy MYPYPATH=$$f $(VENV)/bin/mypy $$f || exit 1; done
	MYPY_CACHE_DIR=$(AIFN_CACHE)/mypy $(VENV)/bin/mypy clients/python

# Its own Docker engine (installs docker.io, debootstrap, docker-compose when missing, as root),
# its own base image and wheelhouse (its data root is in ~/.cache/aifn/container, shared by the
# clones on this machine); needs the models (make model).
.PHONY: container-test
container-test: $(RUNTIME_STAMP)  ## Lint the Dockerfile, build both images, run them like Cloud Run, and docker compose.
	$(PY) scripts/container_test.py

# Needs only terraform (preinstalled) and python3: installs its own tools into ~/.cache/aifn/infra.
infra-check:  ## Terraform, offline: fmt, validate and terraform test against hashicorp/google's schema, checkov, trivy.
	PYTHON=$(PYTHON) bash infra/tools/check.sh

# Google Cloud, for real (infra/terraform/README.md): gcloud and terraform >= 1.11 on PATH,
# `gcloud auth login` done. DEPLOY_ARGS / DESTROY_ARGS pass further options (e.g. --dry-run,
# --builder docker, --local-state; --delete-data, --wait).
.PHONY: deploy destroy
deploy:  ## Deploy both functions to Google Cloud: make deploy PROJECT=my-project REGION=europe-west1.
	bash infra/deploy.sh --project "$(PROJECT)" --region "$(REGION)" $(DEPLOY_ARGS)

destroy:  ## Tear the deployment down (the VPC subnet may need a second run 1-2 h later).
	bash infra/destroy.sh --project "$(PROJECT)" --region "$(REGION)" $(DESTROY_ARGS)

fmt: $(DEV_STAMP)  ## Format the code with ruff.
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# The documentation site (mkdocs.yml, docs/), built strictly as CI does: a broken link or a
# generated table that no longer matches the code fails it. The site goes to build/ (git-ignored).
.PHONY: docs docs-tables
docs: $(DEV_STAMP)  ## Build the documentation site (docs/, mkdocs --strict) into build/site.
	$(VENV)/bin/mkdocs build --strict --site-dir build/site

docs-tables: $(RUNTIME_STAMP)  ## Rewrite the settings and error tables in docs/ from the code.
	$(PY) docs/hooks.py --write

clean:  ## Remove the virtualenv and prepared models (the machine's cache, ~/.cache/aifn, stays).
	rm -rf $(VENV) $(MODELS) .cache .pytest_cache .mypy_cache .ruff_cache

# Run it while no build or test is running on the machine.
clean-cache:  ## Empty the machine's cache of prepared models, downloads and tools (~/.cache/aifn).
	@if [ -d "$(AIFN_CACHE)" ]; then du -sh "$(AIFN_CACHE)"; rm -rf "$(AIFN_CACHE)"; \
	echo "removed $(AIFN_CACHE)"; else echo "nothing cached in $(AIFN_CACHE)"; fi

bench: model  ## Cold start and single-request latency over HTTP (bench/latency.py), both functions.
	HF_HUB_OFFLINE=1 $(PY) bench/latency.py --function sentiment --json bench/results/latency-sentiment.json
	HF_HUB_OFFLINE=1 $(PY) bench/latency.py --function classify --json bench/results/latency-classify.json

bench-threads: $(DEV_STAMP) model  ## Model workers x intra-op threads x spinning, in process (bench/threads.py).
	$(PY) bench/threads.py --json bench/results/threads.json

bench-load: $(DEV_STAMP) model  ## Throughput under load vs the seed's naive pattern, table + plot (bench/load.py).
	HF_HUB_OFFLINE=1 $(PY) bench/load.py --json bench/figures/load.json --plot bench/figures/load.png $(BENCH_ARGS)

bench-cache: model services  ## Prediction cache: hit vs miss, in-process vs Redis vs none (bench/cache.py).
	HF_HUB_OFFLINE=1 $(PY) bench/cache.py --json bench/results/cache.json

bench-cache-scope: $(DEV_STAMP)  ## Hit ratio of a per-caller cache against a shared one on a Zipf mix of callers (bench/cache_scope.py).
	$(PY) bench/cache_scope.py --json bench/results/cache-scope.json

bench-work-limits: $(DEV_STAMP) model  ## How long the largest allowed request holds a classify instance (bench/work_limits.py).
	HF_HUB_OFFLINE=1 $(PY) bench/work_limits.py --repeat 5 $(BENCH_ARGS)

bench-batch-memory: $(RUNTIME_STAMP)  ## Batch files: peak RSS on a 1 GB single-line file and a 1M-line file vs a small one (bench/batch_memory.py).
	$(PY) bench/batch_memory.py --json bench/results/batch-memory.json $(BENCH_ARGS)
