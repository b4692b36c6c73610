# One image per function, with its model baked in (docs/containers.md):
#
#   make model   # prepares models/<function> (the default model source below)
#   DOCKER_BUILDKIT=1 docker build --build-arg FUNCTION=sentiment -t aifn-sentiment .
#   docker run --rm -p 8080:8080 aifn-sentiment
#
# Build arguments:
#   FUNCTION      sentiment | classify (required): what the image serves, and its model.
#   MODEL_SOURCE  the model-source step's spec (docs/models.md, "Model sources"), default
#                 models/<FUNCTION> from the build context (prepared by `make model`); or
#                 recipe:functions/<FUNCTION>/recipe.py to train inside the build, gs://bucket/prefix,
#                 hf://org/name@<commit sha>, or another directory in the context.
#   BASE_IMAGE    Python 3.11 on Debian bookworm; default the official slim image, pinned.
#   PIP_INDEX     package index for everything but torch (default PyPI) ...
#   TORCH_INDEX   ... and the index torch comes from, for the model stage only (export and
#                 training): the CPU-only builds (the CUDA wheel is gigabytes a build never uses).
#                 The image itself has neither torch nor transformers: it serves on ONNX Runtime.
#   WHEELHOUSE    an image holding wheels in /wheelhouse, for builds without an index (`make
#                 container-test` builds one with `pip download`); when set, nothing is fetched.
#
# Layers, least to most often changed: dependencies, model, shared code (common/), function code;
# editing function code rebuilds neither the dependency nor the model layer. The model stage has
# the build tools (torch, transformers, onnx) in its own venv; the image gets only its output. Needs BuildKit (cache and
# bind mounts): DOCKER_BUILDKIT=1 with docker 20.10+, the default since docker 23.

ARG BASE_IMAGE=python:3.11.14-slim-bookworm
ARG WHEELHOUSE=no-wheelhouse

# An empty wheelhouse: install from PIP_INDEX and TORCH_INDEX.
FROM scratch AS no-wheelhouse
WORKDIR /wheelhouse

FROM ${WHEELHOUSE} AS wheelhouse

# The pinned runtime dependencies (requirements/runtime.txt), in a venv: what serving imports.
FROM ${BASE_IMAGE} AS deps
SHELL ["/bin/bash", "-euo", "pipefail", "-c"]
ARG PIP_INDEX=https://pypi.org/simple
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore
RUN python3 -m venv /opt/venv \
    && echo /opt/aifn > "$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/aifn.pth"
COPY requirements/runtime.txt /tmp/requirements/runtime.txt
RUN --mount=type=bind,from=wheelhouse,source=/wheelhouse,target=/wheelhouse \
    if [ -n "$(ls -A /wheelhouse)" ]; then \
      export PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheelhouse; \
    else \
      export PIP_INDEX_URL="$PIP_INDEX"; \
    fi; \
    /opt/venv/bin/pip install --quiet --require-virtualenv -r /tmp/requirements/runtime.txt

# What the runtime copies: the venv without pip and setuptools (nothing installs at run time).
FROM deps AS venv
RUN /opt/venv/bin/pip uninstall --quiet --yes pip setuptools

# The shared package `aifn` (common/), installed into /opt/aifn (on the venv's path via aifn.pth).
# /opt/aifn-serve is what serving imports: the package without aifn.build (model sources,
# export, fine-tuning), which only the model stage runs.
FROM deps AS common
COPY common/ /src/common/
RUN --mount=type=bind,from=wheelhouse,source=/wheelhouse,target=/wheelhouse \
    if [ -n "$(ls -A /wheelhouse)" ]; then \
      export PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheelhouse; \
    else \
      export PIP_INDEX_URL="$PIP_INDEX"; \
    fi; \
    /opt/venv/bin/pip install --quiet --no-deps --target /opt/aifn /src/common \
    && cp -a /opt/aifn /opt/aifn-serve && rm -r /opt/aifn-serve/aifn/build

# The function's serving code: its folder without the build-time recipe (and the data loader
# only the recipe uses).
FROM deps AS function
ARG FUNCTION
COPY functions/${FUNCTION}/ /function/
RUN rm -f /function/recipe.py /function/bbc.py

# The model-source step. Its result is kept in a cache mount keyed by the source, so a rerun
# (any change in the context reruns it) finds the fingerprint unchanged and copies the same
# bytes: the runtime's model layer stays cached, and a recipe never retrains for a code edit.
# The prepared-model cache (AIFN_MODEL_CACHE) lives in the same mount: a recipe, gs:// or hf://
# source built once is restored, not rebuilt, whatever the destination (a local one is copied).
FROM deps AS model
SHELL ["/bin/bash", "-euo", "pipefail", "-c"]
ARG PIP_INDEX=https://pypi.org/simple
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
COPY requirements/build.txt /tmp/requirements/build.txt
# The build tools (torch, transformers, onnx; requirements/build.txt, pinned, every dependency
# listed), the base encoder's weights and the BBC data: this stage's venv only.
RUN --mount=type=bind,from=wheelhouse,source=/wheelhouse,target=/wheelhouse \
    if [ -n "$(ls -A /wheelhouse)" ]; then \
      export PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheelhouse; \
    else \
      export PIP_INDEX_URL="$PIP_INDEX" PIP_EXTRA_INDEX_URL="$TORCH_INDEX"; \
    fi; \
    /opt/venv/bin/pip install --quiet --no-deps -r /tmp/requirements/build.txt \
    && /opt/venv/bin/python -c 'import torch; assert not torch.version.cuda, torch.version.cuda'
COPY --from=common /opt/aifn /opt/aifn
ARG FUNCTION
ARG MODEL_SOURCE=models/${FUNCTION}
WORKDIR /src
# Prepared (exported and measured) in the cache mount; the image gets only what serving reads:
# config, tokenizer, build record, card and the one graph QUANTIZE=auto serves.
RUN --mount=type=bind,target=/src \
    --mount=type=cache,id=aifn-models,target=/cache \
    test -n "${FUNCTION}" || { echo "--build-arg FUNCTION=sentiment|classify is required" >&2; exit 2; }; \
    dest="/cache/${FUNCTION}-$(printf '%s' "$MODEL_SOURCE" | sha256sum | cut -c1-16)"; \
    AIFN_MODEL_CACHE=/cache/prepared \
    /opt/venv/bin/python -m aifn.build.model_source --source "$MODEL_SOURCE" --dest "$dest" \
      --serving-copy /model; \
    chmod -R a+rX,go-w /model

# The image: no compiler, no pip, not root.
FROM ${BASE_IMAGE} AS runtime
ARG FUNCTION
RUN useradd --system --uid 10001 --user-group --no-create-home --home-dir /nonexistent \
    --shell /usr/sbin/nologin aifn
WORKDIR /app
COPY --from=venv /opt/venv /opt/venv
COPY --from=model /model /app/models/${FUNCTION}
COPY --from=common /opt/aifn-serve /opt/aifn
COPY --from=function /function/ /app/functions/${FUNCTION}/
# functions-framework takes its target, source and signature type from these (FUNCTION_TARGET
# picks another target in the same file, e.g. a batch entry point), and PORT from Cloud Run.
# One gunicorn worker: one model copy per instance. THREADS and MODEL_WORKERS are left unset on
# purpose: the function sizes both from the instance's CPUs at startup. Nothing writes outside
# /tmp (gunicorn's control socket goes to XDG_RUNTIME_DIR), so the root filesystem can be
# read-only.
ENV PATH=/opt/venv/bin:$PATH \
    FUNCTION_TARGET=${FUNCTION} \
    FUNCTION_SOURCE=/app/functions/${FUNCTION}/main.py \
    FUNCTION_SIGNATURE_TYPE=http \
    MODEL_DIR=/app/models/${FUNCTION} \
    WORKERS=1 \
    XDG_RUNTIME_DIR=/tmp \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
EXPOSE 8080
# For docker and docker compose; Cloud Run ignores it and probes the port itself (Terraform).
HEALTHCHECK --interval=30s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/v1/health' % os.environ.get('PORT', '8080'), timeout=2)"]
CMD ["functions-framework"]
