"""What the benchmarks share: free ports, and starting a function the way `make serve` does."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"process exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise SystemExit(f"nothing listening on {port} after {timeout} s")


def start_function(function: str, port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """functions-framework (gunicorn, one worker) serving ``function`` on ``port``.

    Threads and everything else are the function's defaults unless ``env`` sets them.
    """
    environ = {
        **{k: v for k, v in os.environ.items() if k != "THREADS"},
        "MODEL_DIR": str(REPO / "models" / function),
        "HF_HUB_OFFLINE": "1",
        "WORKERS": "1",
        **env,
    }
    return subprocess.Popen(
        [
            str(BIN / "functions-framework"),
            f"--target={function}",
            f"--source={REPO / 'functions' / function / 'main.py'}",
            f"--port={port}",
            "--host=127.0.0.1",
        ],
        env=environ,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
