"""Shared fixtures: environment isolation, the prepared model, real service processes.

Plain helpers (paths, ports, the function app factory, the server process) are in
``tests/helpers``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .helpers import SENTIMENT_MODEL, VENV_BIN, RedisServer, free_port, wait_for_port

# The user's own AIFN_MODEL_CACHE setting (None: unset), before the suite replaces it below.
_USER_MODEL_CACHE = os.environ.get("AIFN_MODEL_CACHE")


@pytest.fixture(scope="session", autouse=True)
def _private_model_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Models the tests build go to a cache of their own, never into the user's."""
    os.environ["AIFN_MODEL_CACHE"] = str(tmp_path_factory.mktemp("model-cache"))
    try:
        yield
    finally:
        if _USER_MODEL_CACHE is None:
            os.environ.pop("AIFN_MODEL_CACHE", None)
        else:
            os.environ["AIFN_MODEL_CACHE"] = _USER_MODEL_CACHE


@pytest.fixture
def machine_model_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """For a test that rebuilds a model from the same inputs on every run (the BBC fine-tune):
    the machine's prepared-model cache, as `make model` and `make train` use it."""
    if _USER_MODEL_CACHE is None:
        monkeypatch.delenv("AIFN_MODEL_CACHE")
    else:
        monkeypatch.setenv("AIFN_MODEL_CACHE", _USER_MODEL_CACHE)


@pytest.fixture(autouse=True)
def _isolated_environ() -> Iterator[None]:
    """Each test sees the environment as it was before it, whatever it sets."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="session")
def sentiment_model_dir() -> Path:
    """The prepared sentiment model (``make model``); a missing one fails, never skips."""
    if not (SENTIMENT_MODEL / "config.json").is_file():
        pytest.fail(f"{SENTIMENT_MODEL} is not prepared: run `make model` (make test does)")
    return SENTIMENT_MODEL


@pytest.fixture(scope="session")
def storage_emulator() -> Iterator[str]:
    """A real gcp-storage-emulator process; yields its URL for STORAGE_EMULATOR_HOST."""
    exe = shutil.which("gcp-storage-emulator", path=str(VENV_BIN)) or shutil.which(
        "gcp-storage-emulator"
    )
    if exe is None:
        pytest.fail("gcp-storage-emulator is not installed: run `make dev`")
    port = free_port()
    proc = subprocess.Popen(
        [exe, "start", "--host=127.0.0.1", f"--port={port}", "--in-memory"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, proc, timeout=30)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()
