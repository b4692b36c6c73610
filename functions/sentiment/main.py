"""Sentiment analysis: NEGATIVE, NEUTRAL or POSITIVE for short English texts.

Entry point ``sentiment`` (functions-framework HTTP target). Endpoints:
``POST /v1/analyze/sentiment``, ``GET /v1/health``, ``GET /openapi.json``.
"""

from pathlib import Path
from typing import Any, cast

import flask
import functions_framework

from aifn import runtime
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
    rows = service.cache.get_or_compute(
        request.texts, params=None, width=len(model.labels), compute=service.batcher
    )
    return {
        "model": model.identity.to_json(),
        "results": [
            Prediction(rank(model.labels, s.values), s.truncated, cached=cached).to_json()
            for s, cached in rows
        ],
    }


@functions_framework.http
def sentiment(request: flask.Request) -> flask.Response:
    return service(request)
