"""Where the repository, its prepared models and the virtualenv's tools are."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SENTIMENT_MODEL = Path(os.environ.get("AIFN_TEST_SENTIMENT_MODEL", REPO / "models" / "sentiment"))
CLASSIFY_MODEL = Path(os.environ.get("AIFN_TEST_CLASSIFY_MODEL", REPO / "models" / "classify"))
VENV_BIN = Path(sys.executable).parent
