"""A real ``functions-framework`` process (gunicorn) serving a function, spoken to over HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from benchlib import function_command

from .processes import free_port, wait_for_port


class Server:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
        self.proc = proc
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path

    def request(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        for key, value in (headers or {}).items():
            req.add_header(key, value)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, json.loads(resp.read()), dict(resp.headers)
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read()), dict(err.headers)

    def log_lines(self) -> list[dict[str, Any]]:
        lines = []
        for raw in self.log_path.read_text(encoding="utf-8").splitlines():
            if raw.startswith("{"):
                lines.append(json.loads(raw))
        return lines


def start_server(
    model_dir: Path,
    tmp: Path,
    *,
    function: str = "sentiment",
    target: str | None = None,
    **env: str,
) -> Server:
    """``functions-framework --target <function>`` (or another ``target`` of its ``main.py``)
    serving ``model_dir``, once it listens; its log in ``tmp/server.log``."""
    port = free_port()
    log_path = tmp / "server.log"
    environ = {
        **os.environ,
        "MODEL_DIR": str(model_dir),
        "GOOGLE_CLOUD_PROJECT": "test-project",
        "HF_HUB_OFFLINE": "1",
        "WORKERS": "1",
        "THREADS": "8",
        **env,
    }
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            function_command(function, port, target),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=environ,
        )
    try:
        wait_for_port(port, proc, timeout=120)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return Server(proc, port, log_path)
