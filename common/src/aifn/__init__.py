"""aifn: AI inference as Cloud Run functions.

What a function's ``main.py`` uses, in the order it uses it: :func:`start` (settings, logs, the
model behind its :class:`Predictor`, the HTTP :class:`Service`), ``service.post`` to declare an
endpoint with the request parsers of :mod:`aifn.core.validation`, ``service.predictor`` to
predict, and :class:`Processor` for batch files. The layers, each importing only those before
it:

- :mod:`aifn.core`: the model, the prediction cache, the dynamic batcher, work limits and the
  :class:`Predictor` that composes them; errors without a transport.
- :mod:`aifn.settings`, :mod:`aifn.logs`: every setting, declared once; structured logs.
- :mod:`aifn.http`: the edge (routing, bodies, API keys, rate limits, OpenAPI, metrics), the
  one place an error becomes a status code.
- :mod:`aifn.files`: batch files (local or ``gs://``), event-driven or as a job
  (``python -m aifn.files``).
- :mod:`aifn.build`: build time only (model sources, export, fine-tuning); not in serving images.
"""

from aifn.core.cache import current_scope
from aifn.core.errors import ConfigError, Error, InvalidRequest
from aifn.core.model import (
    CLASSIFIER,
    ENCODER,
    Prediction,
    Scores,
    TextClassifier,
    TextEncoder,
    rank,
)
from aifn.core.predictor import ClassifierHead, Head, Predictor
from aifn.files.processor import Processor
from aifn.http.app import read_settings, start
from aifn.http.openapi import ref
from aifn.http.service import Service

__all__ = [
    "CLASSIFIER",
    "ENCODER",
    "ClassifierHead",
    "ConfigError",
    "Error",
    "Head",
    "InvalidRequest",
    "Prediction",
    "Predictor",
    "Processor",
    "Scores",
    "Service",
    "TextClassifier",
    "TextEncoder",
    "current_scope",
    "rank",
    "read_settings",
    "ref",
    "start",
]
