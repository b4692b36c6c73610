"""What the tests share: paths, free ports, real service processes, the function app factory.

Fixtures live in ``tests/conftest.py``; everything a test module imports from elsewhere comes
from here. A test module never imports another test module (``tests/test_repo.py`` checks).
"""

from __future__ import annotations

from .apps import function_app, served_revision
from .batching import Recorder, hold
from .paths import CLASSIFY_MODEL, REPO, SENTIMENT_MODEL, VENV_BIN
from .processes import RedisServer, free_port, wait_for_port
from .server import Server, start_server

__all__ = [
    "CLASSIFY_MODEL",
    "REPO",
    "SENTIMENT_MODEL",
    "VENV_BIN",
    "Recorder",
    "RedisServer",
    "Server",
    "free_port",
    "function_app",
    "hold",
    "served_revision",
    "start_server",
    "wait_for_port",
]
