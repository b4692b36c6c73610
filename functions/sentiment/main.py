"""Sentiment analysis: NEGATIVE, NEUTRAL or POSITIVE for short English texts.

Entry point ``sentiment`` (functions-framework HTTP target). Endpoints:
``POST /v1/analyze/sentiment``, ``GET /v1/health``, ``GET /openapi.json``. Entry point
``sentiment_batch`` (CloudEvent target): a Cloud Storage file of texts in, a predictions file
out (:mod:`aifn.files`).
"""

from pathlib import Path
from typing import Any

import flask
import functions_framework
from cloudevents.http import CloudEvent

import aifn
from aifn.core.validation import parse_texts, require_object

REPO_ROOT = Path(__file__).resolve().parents[2]

service = aifn.start(
    "sentiment",
    default_model_dir=REPO_ROOT / "models" / "sentiment",
    description=(
        "Three-way sentiment (NEGATIVE / NEUTRAL / POSITIVE) of short English texts. Send one "
        "`text` or a list of `texts`; results come back in input order."
    ),
)
# start() loads only classifiers by default (kinds=(CLASSIFIER,)), never an encoder.
predictor = service.predictor


@service.post(
    "/v1/analyze/sentiment",
    summary="Sentiment of one text or a batch of texts.",
    request_schema=aifn.ref("TextsRequest"),
    response_schema=aifn.ref("PredictionResponse"),
    request_example={"texts": ["I love this product!", "The delivery was late again."]},
)
def analyze(body: Any) -> dict[str, Any]:
    request = parse_texts(
        require_object(body, allowed={"text", "texts"}),
        max_texts=service.settings.max_batch_texts,
    )
    predictor.check(request.texts)  # MAX_REQUEST_TOKENS, before any model work
    return {
        "model": predictor.model.identity.to_json(),
        "results": [p.to_json() for p in predictor.predict(request.texts)],
    }


files = aifn.Processor.start(
    "sentiment", predictor, predict=lambda texts, _options: predictor.predict(texts), http=service
)


@functions_framework.http
def sentiment(request: flask.Request) -> flask.Response:
    return service(request)


@functions_framework.cloud_event
def sentiment_batch(event: CloudEvent) -> None:
    """A file finalized under ``BATCH_INPUT_PREFIX`` -> its predictions and errors files."""
    files.handle_event(event)
