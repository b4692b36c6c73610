"""A stand-in model for the dynamic batcher that records every batch, and a way to hold it busy."""

from __future__ import annotations

import contextlib
import threading
from typing import TYPE_CHECKING

# aifn is imported where it is used: make infra-check runs tests/test_infra.py in a venv
# without it, and this package is imported by tests/conftest.py.
if TYPE_CHECKING:
    from aifn.core.batcher import DynamicBatcher


class Recorder:
    """Upper-cases texts; records batches; can be held busy; fails on texts containing 'poison'."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __call__(self, texts: list[str]) -> list[str]:
        self.batches.append(list(texts))
        self.entered.set()
        self.gate.wait(10)
        if any("poison" in t for t in texts):
            raise ValueError("cannot process poison")
        return [t.upper() for t in texts]


def hold(model: Recorder, b: DynamicBatcher[str]) -> threading.Thread:
    """Make the worker busy with one request until ``model.gate`` is set."""
    model.gate.clear()
    model.entered.clear()

    from aifn.core.errors import DeadlineExceeded

    def run() -> None:
        # A short-deadline test may time the holder out too.
        with contextlib.suppress(DeadlineExceeded):
            b(["holder"])

    thread = threading.Thread(target=run)
    thread.start()
    assert model.entered.wait(5)
    return thread
