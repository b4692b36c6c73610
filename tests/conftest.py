"""Shared fixtures: environment isolation, the prepared model, the app, real service processes."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SENTIMENT_MODEL = Path(os.environ.get("AIFN_TEST_SENTIMENT_MODEL", REPO / "models" / "sentiment"))
VENV_BIN = Path(sys.executable).parent


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes] | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {port} after {timeout} s")


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
