"""Integration tests: the sentiment function on the real prepared model, in process.

The model is loaded once for the module through functions-framework's own ``create_app``, the
same path ``functions-framework --target sentiment`` takes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from openapi_spec_validator import validate as validate_openapi

from .helpers import function_app, served_revision

pytestmark = pytest.mark.integration

ENDPOINT = "/v1/analyze/sentiment"
CLEAR = {
    "POSITIVE": [
        "I absolutely love this, it is wonderful and works perfectly.",
        "What a fantastic, heartwarming film. The best I have seen all year!",
        "Great service, friendly staff, I am so happy with my purchase.",
    ],
    "NEGATIVE": [
        "This is terrible. It broke after one day and support ignored me.",
        "A boring, stupid waste of two hours. Awful acting.",
        "I hate it, the worst purchase I have ever made.",
    ],
    "NEUTRAL": [
        "The meeting is scheduled for 3 pm on Tuesday in room 204.",
        "The package contains two cables and a manual.",
    ],
}


@pytest.fixture(scope="module")
def client(sentiment_model_dir: Path) -> Any:
    return function_app(
        "sentiment", sentiment_model_dir, MAX_BATCH_TEXTS="16", MAX_BODY_BYTES="65536"
    )[0]


@pytest.fixture(scope="module")
def openapi(client: Any) -> dict[str, Any]:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    return response.get_json()


def _schema(openapi: dict[str, Any], name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}", "components": openapi["components"]}


def post(client: Any, body: Any) -> Any:
    return client.post(ENDPOINT, json=body)


@pytest.mark.parametrize("label", list(CLEAR))
def test_clear_sentences_get_their_label(client: Any, label: str) -> None:
    response = post(client, {"texts": CLEAR[label]})
    assert response.status_code == 200
    got = [r["label"] for r in response.get_json()["results"]]
    assert got == [label] * len(CLEAR[label])


def test_single_text_response(
    client: Any, openapi: dict[str, Any], sentiment_model_dir: Path
) -> None:
    response = post(client, {"text": "I love this product!"})
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    body = response.get_json()
    jsonschema.validate(body, _schema(openapi, "PredictionResponse"))
    assert body["model"]["revision"] == served_revision(sentiment_model_dir)
    assert body["model"]["name"] == "aifn-sentiment-minilm-vader"
    (result,) = body["results"]
    assert result["label"] == "POSITIVE"
    assert result["score"] > 0.5
    assert result["labels"][0]["label"] == "POSITIVE"
    assert {x["label"] for x in result["labels"]} == {"NEGATIVE", "NEUTRAL", "POSITIVE"}
    assert sum(x["score"] for x in result["labels"]) == pytest.approx(1.0, abs=1e-4)
    scores = [x["score"] for x in result["labels"]]
    assert scores == sorted(scores, reverse=True)
    assert result["truncated"] is False


def test_batch_is_aligned_with_input_and_agrees_with_single(client: Any) -> None:
    # Mixed lengths, so the model's length-sorted chunks must be put back in input order.
    texts = [
        CLEAR["NEGATIVE"][0] + " " + "It was all a mess from start to end. " * 5,
        CLEAR["POSITIVE"][2],
        "ok",
        CLEAR["NEUTRAL"][0],
        CLEAR["NEGATIVE"][2],
    ]
    batch = post(client, {"texts": texts}).get_json()["results"]
    assert len(batch) == len(texts)
    for text, result in zip(texts, batch, strict=True):
        single = post(client, {"text": text}).get_json()["results"][0]
        assert single["label"] == result["label"]
        assert single["score"] == pytest.approx(result["score"], abs=1e-4)


def test_long_text_is_truncated_and_says_so(client: Any) -> None:
    # ~1,500 tokens, far over MAX_TOKENS; clearly positive from its first sentence.
    long_text = " ".join(
        [
            "I loved every minute of this film.",
            "The acting is superb, the story is moving and the music is wonderful.",
            "It is the best thing I have seen in years and I would happily watch it again.",
        ]
        * 40
    )
    results = post(client, {"texts": [long_text, "Short and sweet, I liked it."]}).get_json()[
        "results"
    ]
    assert results[0]["truncated"] is True
    assert results[0]["label"] == "POSITIVE"
    assert results[1]["truncated"] is False


def test_health_reports_the_model(client: Any, openapi: dict[str, Any]) -> None:
    response = client.get("/v1/health")
    assert response.status_code == 200
    body = response.get_json()
    jsonschema.validate(body, _schema(openapi, "Health"))
    assert body["status"] == "ok"
    assert body["function"] == "sentiment"
    assert body["labels"] == ["NEGATIVE", "NEUTRAL", "POSITIVE"]
    assert client.head("/v1/health").status_code == 200


def test_openapi_document_is_valid_and_lists_the_endpoints(openapi: dict[str, Any]) -> None:
    validate_openapi(openapi)
    assert set(openapi["paths"]) == {ENDPOINT, "/v1/health", "/openapi.json", "/metrics"}
    post_op = openapi["paths"][ENDPOINT]["post"]
    assert {"400", "413", "415", "422", "500", "503"} <= set(post_op["responses"])
    example = post_op["requestBody"]["content"]["application/json"]["example"]
    jsonschema.validate(example, _schema(openapi, "TextsRequest"))


LONG = "x" * 70_000
BAD_INPUTS = [
    # (description, kwargs for client.post, status, error type)
    ("not JSON", {"data": "{oops", "content_type": "application/json"}, 400, "invalid_json"),
    ("empty body", {"data": "", "content_type": "application/json"}, 400, "invalid_json"),
    (
        "invalid UTF-8",
        {"data": b'{"text": "\xc3\x28"}', "content_type": "application/json"},
        400,
        "invalid_json",
    ),
    ("form post", {"data": {"text": "hi"}}, 415, "unsupported_media_type"),
    ("text/plain", {"data": "hi", "content_type": "text/plain"}, 415, "unsupported_media_type"),
    ("no content type", {"data": '{"text": "hi"}'}, 415, "unsupported_media_type"),
    ("array body", {"json": ["hi"]}, 422, "invalid_request"),
    ("string body", {"json": "hi"}, 422, "invalid_request"),
    ("null body", {"data": "null", "content_type": "application/json"}, 422, "invalid_request"),
    ("neither field", {"json": {}}, 422, "invalid_request"),
    ("both fields", {"json": {"text": "a", "texts": ["b"]}}, 422, "invalid_request"),
    ("unknown field", {"json": {"text": "a", "lang": "en"}}, 422, "invalid_request"),
    ("number text", {"json": {"text": 42}}, 422, "invalid_request"),
    ("empty text", {"json": {"text": ""}}, 422, "invalid_request"),
    ("blank text", {"json": {"text": " \t "}}, 422, "invalid_request"),
    ("texts not a list", {"json": {"texts": "abc"}}, 422, "invalid_request"),
    ("empty list", {"json": {"texts": []}}, 422, "invalid_request"),
    ("null in list", {"json": {"texts": ["a", None]}}, 422, "invalid_request"),
    ("nested list", {"json": {"texts": [["a"]]}}, 422, "invalid_request"),
    (
        "lone surrogate",
        {"data": '{"text": "\\udc00"}', "content_type": "application/json"},
        422,
        "invalid_request",
    ),
    ("too many texts", {"json": {"texts": ["a"] * 17}}, 422, "too_many_texts"),
    ("body too large", {"json": {"text": LONG}}, 413, "payload_too_large"),
]


@pytest.mark.parametrize(
    ("what", "kwargs", "status", "kind"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS]
)
def test_bad_inputs_get_a_json_4xx(
    client: Any, openapi: dict[str, Any], what: str, kwargs: dict[str, Any], status: int, kind: str
) -> None:
    response = client.post(ENDPOINT, **kwargs)
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.get_json()
    jsonschema.validate(body, _schema(openapi, "Error"))
    assert body["error"]["type"] == kind
    assert body["error"]["status"] == status
    assert "Traceback" not in body["error"]["message"]
    # The OpenAPI document declares this status for the endpoint.
    assert str(status) in openapi["paths"][ENDPOINT]["post"]["responses"]


@pytest.mark.parametrize(
    ("method", "path", "status", "kind"),
    [
        ("get", "/nope", 404, "not_found"),
        ("post", "/v1/analyze/toxicity", 404, "not_found"),
        ("get", "/robots.txt", 404, "not_found"),
        ("get", "/favicon.ico", 404, "not_found"),
        ("get", ENDPOINT, 405, "method_not_allowed"),
        ("put", ENDPOINT, 405, "method_not_allowed"),
        ("delete", "/v1/health", 405, "method_not_allowed"),
        ("post", "/v1/health", 405, "method_not_allowed"),
    ],
)
def test_unknown_paths_and_methods(
    client: Any, method: str, path: str, status: int, kind: str
) -> None:
    response = getattr(client, method)(path)
    assert response.status_code == status
    assert response.get_json()["error"]["type"] == kind
    if status == 405:
        assert "Allow" in response.headers


def test_trailing_slash_is_the_same_endpoint(client: Any) -> None:
    assert client.post(ENDPOINT + "/", json={"text": "great"}).status_code == 200


def test_error_body_is_compact_json(client: Any) -> None:
    raw = client.post(ENDPOINT, json={}).get_data(as_text=True)
    assert json.loads(raw)["error"]["message"]
