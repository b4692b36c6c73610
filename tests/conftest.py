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
CLASSIFY_MODEL = Path(os.environ.get("AIFN_TEST_CLASSIFY_MODEL", REPO / "models" / "classify"))
VENV_BIN = Path(sys.executable).parent


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


class RedisServer:
    """A real redis-server process on a free port; can be killed and started again."""

    def __init__(self, workdir: Path, *extra: str) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail("redis-server is not installed: run `make test` (it installs it)")
        self.exe = exe
        self.port = free_port()
        self.extra = extra
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                self.exe,
                *("--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", "--dir", str(self.workdir)),
                # DEBUG SLEEP makes a real slow Redis for the timeout tests.
                *("--enable-debug-command", "local"),
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # With TLS only, the plain port is 0; wait on whichever port is served.
        port = self.port
        if "--tls-port" in self.extra:
            port = int(self.extra[self.extra.index("--tls-port") + 1])
        wait_for_port(port, self.proc, timeout=10)

    def kill(self) -> None:
        """SIGKILL: the way a crashed or preempted Redis disappears."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()


def served_revision(model_dir: Path) -> str:
    """The revision a function reports for ``model_dir`` with the default ``QUANTIZE=auto``."""
    from aifn.model import content_hash, served_graph

    graph, _ = served_graph(model_dir, "auto")
    return content_hash(model_dir, graph)
