"""Free ports, waiting for a port to listen, and a real redis-server process."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest


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
