"""Sentiment analysis: NEGATIVE, NEUTRAL or POSITIVE for short English texts.

Entry point ``sentiment`` (functions-framework HTTP target). Endpoints:
``POST /v1/analyze/sentiment``, ``GET /v1/health``, ``GET /openapi.json``. Entry point
``sentiment_batch`` (CloudEvent target): a Cloud Storage file of texts in, a predictions file
out (:mod:`aifn.batch`).
"""

from pathlib import Path
from typing import Any, cast

import flask
import functions_framework
from cloudevents.http import CloudEvent

from aifn import batch, runtime
from aifn.limits import mark_cut
from aifn.model import Prediction, TextClassifier, rank
from aifn.openapi import ref
from aifn.validation import parse_texts, require_object

REPO_ROOT = Path(__file__).resolve().parents[2]

service = runtime.start(
    "sentiment",
    default_model_dir=REPO_ROOT / "models" / "sentiment",
    description=(
        "Three-way sentiment (NEGATIVE / NEUTRAL / POSITIVE) of short English texts. Send one "
        "`text` or a list of `texts`; results come back in input order."
    ),
)

# start() loads only classifiers by default (kinds=(CLASSIFIER,)), never an encoder.
model = cast(TextClassifier, service.model)


@service.post(
    "/v1/analyze/sentiment",
    summary="Sentiment of one text or a batch of texts.",
    request_schema=ref("TextsRequest"),
    response_schema=ref("PredictionResponse"),
    request_example={"texts": ["I love this product!", "The delivery was late again."]},
)
def analyze(body: Any) -> dict[str, Any]:
    request = parse_texts(
        require_object(body, allowed={"text", "texts"}),
        max_texts=service.settings.max_batch_texts,
    )
    service.limits.check(request.texts)  # MAX_REQUEST_TOKENS, before any model work
    return {
        "model": model.identity.to_json(),
        "results": [p.to_json() for p in predict(request.texts)],
    }


def predict(texts: list[str], _options: object = None) -> list[Prediction]:
    """Through the prediction cache, then the batcher: the same path for HTTP and batch files.

    Each text is first cut to MAX_TEXT_CHARS (a cut text's result says ``truncated``).
    """
    texts, cut = service.limits.cut(texts)
    rows = service.cache.get_or_compute(
        texts, params=None, width=len(model.labels), compute=service.batcher
    )
    return mark_cut(
        [
            Prediction(rank(model.labels, s.values), s.truncated, cached=cached)
            for s, cached in rows
        ],
        cut,
    )


files = batch.Processor.start(service, predict=predict)


@functions_framework.http
def sentiment(request: flask.Request) -> flask.Response:
    return service(request)


@functions_framework.cloud_event
def sentiment_batch(event: CloudEvent) -> None:
    """A file finalized under ``BATCH_INPUT_PREFIX`` -> its predictions and errors files."""
    files.handle_event(event)
