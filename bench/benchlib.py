"""What the benchmarks (and the process tests) share: free ports, starting a function the way
`make serve` does, and finding a server's processes."""

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
        function_command(function, port),
        env=environ,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def function_command(function: str, port: int, target: str | None = None) -> list[str]:
    """The command line serving ``function`` on loopback ``port``: functions-framework's gunicorn,
    as ``make serve`` and the containers run it (``MODEL_DIR`` and the rest come from the
    environment). ``target``: another entry point of its ``main.py`` (e.g. ``sentiment_batch``)."""
    return [
        str(BIN / "functions-framework"),
        f"--target={target or function}",
        f"--source={REPO / 'functions' / function / 'main.py'}",
        f"--port={port}",
        "--host=127.0.0.1",
    ]


def process_tree(root: int) -> list[int]:
    """``root`` and its descendants' pids (from /proc), e.g. gunicorn's master and worker."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # exited meanwhile
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found
