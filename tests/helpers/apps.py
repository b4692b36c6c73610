"""A function loaded in process the way ``functions-framework --target …`` loads it."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from .paths import REPO


def function_app(
    function: str,
    model_dir: Path,
    *,
    target: str | None = None,
    signature_type: str | None = None,
    **env: str,
) -> tuple[Any, ModuleType]:
    """(test client, loaded ``main`` module) of ``functions/<function>/main.py``.

    functions-framework's own ``create_app`` with ``--target`` ``target`` (default: the function's
    name) and ``MODEL_DIR=model_dir`` plus ``env`` set only while the function starts: the
    environment is restored afterwards, so a module-scoped app leaves nothing behind. The module
    is returned as loaded: a later app may replace ``sys.modules["main"]``. A model directory
    without ``config.json`` fails the test, never skips it.
    """
    # Imported here: make infra-check loads this package (via conftest) without functions-framework.
    import functions_framework

    if not (model_dir / "config.json").is_file():
        pytest.fail(f"{model_dir} is not prepared: run `make model` (make test does)")
    saved = dict(os.environ)
    os.environ.update({"MODEL_DIR": str(model_dir), **env})
    try:
        app = functions_framework.create_app(
            target=target or function,
            source=str(REPO / "functions" / function / "main.py"),
            signature_type=signature_type,
        )
        module = sys.modules["main"]
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return app.test_client(), module


def served_revision(model_dir: Path) -> str:
    """The revision a function reports for ``model_dir`` with the default ``QUANTIZE=auto``."""
    from aifn.core.model import content_hash, served_graph

    graph, _ = served_graph(model_dir, "auto")
    return content_hash(model_dir, graph)
