"""A real ``functions-framework`` process (gunicorn) serving a function, spoken to over HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from benchlib import function_command

from .processes import free_port, wait_for_port

# The user agent of the requests that mark how far the log is written (left out of log_lines).
_SYNC = "aifn-tests-log-sync/"


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

    def log_text(self) -> str:
        """Everything the server logged up to this call (stdout and stderr)."""
        self._sync_log()
        return self.log_path.read_text(encoding="utf-8")

    def log_lines(self) -> list[dict[str, Any]]:
        """The JSON lines the server logged up to this call."""
        lines = []
        for raw in self.log_text().splitlines():
            if raw.startswith("{"):
                line = json.loads(raw)
                if not line.get("httpRequest", {}).get("userAgent", "").startswith(_SYNC):
                    lines.append(line)
        return lines

    def _sync_log(self, timeout: float = 30.0) -> None:
        """Wait until every line logged before now is in the file.

        A thread of the server's own writes its log, in order (``aifn.logs``), so a line may
        reach the file a moment after its response: once a marker request's line is there,
        every line logged before it is too. A server that has exited has written everything.
        """
        if self.proc.poll() is not None:
            return
        marker = f"{_SYNC}{uuid.uuid4().hex}"
        self.request("GET", "/v1/health", headers={"User-Agent": marker})
        deadline = time.monotonic() + timeout
        while marker not in self.log_path.read_text(encoding="utf-8"):
            if time.monotonic() > deadline:
                raise AssertionError(f"the server did not log its answer within {timeout} s")
            time.sleep(0.01)


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
