"""Integration tests: the classify function (zero-shot) on the real prepared model, in process.

The model is loaded once for the module through functions-framework's own ``create_app``, the
same path ``functions-framework --target classify`` takes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import pytest
from openapi_spec_validator import validate as validate_openapi

from .helpers import CLASSIFY_MODEL, function_app, served_revision

pytestmark = pytest.mark.integration

ENDPOINT = "/v1/classify"
MAX_LABELS = 5
TICKETS = ["billing", "bug report", "feature request"]
CLEAR = [
    # (labels, text, expected top label)
    (TICKETS, "I was charged twice for my subscription this month", "billing"),
    (TICKETS, "The app crashes every time I open the settings page", "bug report"),
    (TICKETS, "It would be great if you added a dark mode", "feature request"),
    (TICKETS, "Please refund the extra payment on my credit card", "billing"),
    (TICKETS, "Clicking save shows an error and my changes are lost", "bug report"),
    (TICKETS, "Could you add support for exporting reports to PDF?", "feature request"),
]
TOPICS = ["sport", "politics", "technology"]
CLEAR_TOPICS = [
    ("The striker scored twice as the team won the championship final", "sport"),
    ("Parliament passed the new tax bill after a heated debate", "politics"),
    ("The new smartphone has a faster chip and better battery life", "technology"),
    ("The senator announced she will run for president", "politics"),
    ("The tennis player won the match in straight sets", "sport"),
]


@pytest.fixture(scope="session")
def classify_model_dir() -> Path:
    """The prepared zero-shot model (``make model``); a missing one fails, never skips."""
    if not (CLASSIFY_MODEL / "config.json").is_file():
        pytest.fail(f"{CLASSIFY_MODEL} is not prepared: run `make model` (make test does)")
    return CLASSIFY_MODEL


@pytest.fixture(scope="module")
def app_and_zero_shot(classify_model_dir: Path) -> tuple[Any, Any]:
    return _app_and_zero_shot(classify_model_dir)


def _app_and_zero_shot(classify_model_dir: Path, **env: str) -> tuple[Any, Any]:
    client, main = function_app(
        "classify",
        classify_model_dir,
        **{
            "MAX_BATCH_TEXTS": "16",
            "MAX_BODY_BYTES": "65536",
            "MAX_LABELS": str(MAX_LABELS),
            # The label cache is observed on its own: no prediction cache in front of it (the
            # prediction cache has its own tests).
            "CACHE_MAX_ENTRIES": "0",
            **env,
        },
    )
    # The module functions-framework just loaded; later apps may replace sys.modules["main"].
    zero_shot = main.zero_shot
    assert zero_shot is not None, "the packaged classify model should be an encoder"
    return client, zero_shot


@pytest.fixture(scope="module")
def client(app_and_zero_shot: tuple[Any, Any]) -> Any:
    return app_and_zero_shot[0]


@pytest.fixture(scope="module")
def cache(app_and_zero_shot: tuple[Any, Any]) -> Any:
    return app_and_zero_shot[1].label_cache


@pytest.fixture(scope="module")
def openapi(client: Any) -> dict[str, Any]:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    return response.get_json()


def _with_components(openapi: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "components": openapi["components"]}


def _response_schema(openapi: dict[str, Any], status: str) -> dict[str, Any]:
    content = openapi["paths"][ENDPOINT]["post"]["responses"][status]["content"]
    return _with_components(openapi, content["application/json"]["schema"])


def _request_schema(openapi: dict[str, Any]) -> dict[str, Any]:
    content = openapi["paths"][ENDPOINT]["post"]["requestBody"]["content"]
    return _with_components(openapi, content["application/json"]["schema"])


def classify(client: Any, body: dict[str, Any]) -> dict[str, Any]:
    response = client.post(ENDPOINT, json=body)
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()


def scores_of(result: dict[str, Any]) -> dict[str, float]:
    return {x["label"]: x["score"] for x in result["labels"]}


def test_clear_texts_get_their_label_in_input_order(client: Any, classify_model_dir: Path) -> None:
    body = classify(client, {"texts": [t for _, t, _ in CLEAR], "labels": TICKETS})
    assert body["model"] == {
        "name": "aifn-zero-shot-minilm",
        "revision": served_revision(classify_model_dir),
    }
    assert body["mode"] == "zero-shot"
    assert body["multi_label"] is False
    assert [r["label"] for r in body["results"]] == [want for _, _, want in CLEAR]
    for result in body["results"]:
        assert "matches" not in result
        assert result["truncated"] is False
        assert result["labels"][0]["label"] == result["label"]
        assert sorted(x["label"] for x in result["labels"]) == sorted(TICKETS)
        scores = [x["score"] for x in result["labels"]]
        assert scores == sorted(scores, reverse=True)
        assert result["score"] == scores[0] > 0.5
        assert sum(scores) == pytest.approx(1.0, abs=1e-3)


def test_clear_topics(client: Any) -> None:
    # Reversed label order: the answer must not depend on where a label sits in the list.
    body = classify(client, {"texts": [t for t, _ in CLEAR_TOPICS], "labels": TOPICS[::-1]})
    assert [r["label"] for r in body["results"]] == [want for _, want in CLEAR_TOPICS]


def test_descriptions_steer_the_outcome(client: Any) -> None:
    texts = [
        "The server room is on fire",
        "Production database is down and customers cannot log in",
        "Please update the office wiki sometime next month",
    ]
    labels = ["urgent", "not urgent"]
    bare = classify(client, {"texts": texts, "labels": labels})["results"]
    described = classify(
        client,
        {
            "texts": texts,
            "labels": labels,
            "descriptions": {
                "urgent": "an emergency that needs immediate attention",
                "not urgent": "a routine matter that can wait",
            },
        },
    )["results"]
    # Bare, "not urgent" embeds close to "urgent" and wins everything; described, it is right.
    assert [r["label"] for r in bare][:2] == ["not urgent", "not urgent"]
    assert [r["label"] for r in described] == ["urgent", "urgent", "not urgent"]

    # Describing one label raises its score on a text where the bare label loses (to
    # "technology", whose template embeds closer to "hit its highest level"), and makes it the
    # winner. (Each text and label prompt is embedded alone, so these scores do not depend on
    # what else the request or the label cache held.)
    text, topics = "Inflation hit its highest level in a decade", [*TOPICS, "business"]
    plain = classify(client, {"text": text, "labels": topics})["results"][0]
    assert plain["label"] != "business"
    hinted = classify(
        client,
        {
            "text": text,
            "labels": topics,
            "descriptions": {"business": "companies, markets, profits and the economy"},
        },
    )["results"][0]
    assert hinted["label"] == "business"
    assert scores_of(hinted)["business"] > scores_of(plain)["business"]


def test_single_text_equals_the_same_text_in_a_batch(client: Any) -> None:
    text = CLEAR[1][1]
    single = classify(client, {"text": text, "labels": TICKETS})
    batch = classify(client, {"texts": [CLEAR[0][1], text, CLEAR[2][1]], "labels": TICKETS})
    assert len(single["results"]) == 1
    assert single["results"][0]["label"] == batch["results"][1]["label"] == "bug report"
    # The same scores to the last digit shown: each text runs alone, whatever the int8 plan.
    assert scores_of(single["results"][0]) == scores_of(batch["results"][1])


def test_multi_label_scores_are_independent(client: Any) -> None:
    texts = ["I was billed twice and the app keeps crashing", CLEAR[0][1]]
    body = classify(client, {"texts": texts, "labels": [*TICKETS, "cooking"], "multi_label": True})
    assert body["multi_label"] is True
    both, billing = body["results"]
    assert sum(scores_of(both).values()) > 1.5  # not a distribution
    assert set(both["matches"]) == {"billing", "bug report"}
    assert "cooking" not in both["matches"]
    assert billing["matches"] == ["billing"]
    for result in body["results"]:
        # Exactly the labels at or over the default threshold (0.5), highest first.
        assert result["matches"] == [x["label"] for x in result["labels"] if x["score"] >= 0.5]
    # The same text, one distribution: only one label can win.
    single = classify(client, {"text": texts[0], "labels": TICKETS})["results"][0]
    assert "matches" not in single
    assert sum(scores_of(single).values()) == pytest.approx(1.0, abs=1e-3)


def test_label_embeddings_are_cached(client: Any, cache: Any) -> None:
    labels = ["gardening", "astronomy", "carpentry", "knitting"]
    body = {"texts": ["The telescope showed the rings of Saturn"], "labels": labels}
    hits, misses = cache.hits, cache.misses
    first = classify(client, body)
    assert (cache.hits - hits, cache.misses - misses) == (0, len(labels))
    second = classify(client, body)
    assert (cache.hits - hits, cache.misses - misses) == (len(labels), len(labels))
    assert second == first
    assert first["results"][0]["label"] == "astronomy"
    # A subset in another order: all hits, the same scores.
    third = classify(client, {**body, "labels": labels[:2][::-1]})
    assert (cache.hits - hits, cache.misses - misses) == (len(labels) + 2, len(labels))
    assert third["results"][0]["label"] == "astronomy"

    # Another template means other prompts: misses again, and other (unsaturated) scores.
    multi = {**body, "multi_label": True}
    templated = classify(client, {**multi, "template": "A hobby: {label}."})
    assert cache.misses - misses == 2 * len(labels)
    plain = classify(client, multi)
    assert cache.misses - misses == 2 * len(labels)
    assert scores_of(templated["results"][0]) != scores_of(plain["results"][0])
    # A description replaces the template: one new prompt, the others are cached.
    before = cache.misses
    classify(client, {**body, "descriptions": {"knitting": "making clothes from yarn"}})
    assert cache.misses - before == 1


def test_description_keys_match_labels_as_labels_do(client: Any) -> None:
    """A description's key matches its label ignoring case and spaces; labels come back as sent."""
    body = {"text": "Rain and wind all weekend.", "labels": [" Weather ", "Sport"]}
    plain = classify(client, {**body, "multi_label": True})
    described = classify(
        client,
        {**body, "multi_label": True, "descriptions": {"weather": "rain, wind, sun and storms"}},
    )
    assert {s["label"] for s in described["results"][0]["labels"]} == {" Weather ", "Sport"}
    assert (
        scores_of(described["results"][0])[" Weather "]
        != scores_of(plain["results"][0])[" Weather "]
    )


LONG = "x" * 70_000
OK = {"text": "hello", "labels": ["a", "b"]}
BAD_INPUTS = [
    # (id, body, status, error type, the field the message names)
    ("missing labels", {"text": "hello"}, 422, "invalid_request", "labels"),
    ("empty labels", {**OK, "labels": []}, 422, "invalid_request", "labels"),
    ("one label", {**OK, "labels": ["a"]}, 422, "invalid_request", "labels"),
    ("duplicate labels", {**OK, "labels": ["a", "b", "a"]}, 422, "invalid_request", "labels[2]"),
    ("duplicate case", {**OK, "labels": ["Bug", "bug"]}, 422, "invalid_request", "labels[1]"),
    ("duplicate padded", {**OK, "labels": ["a", " a "]}, 422, "invalid_request", "labels[1]"),
    ("too many labels", {**OK, "labels": list("abcdef")}, 422, "invalid_request", "MAX_LABELS"),
    ("number label", {**OK, "labels": ["a", 3]}, 422, "invalid_request", "labels[1]"),
    ("null label", {**OK, "labels": [None, "a"]}, 422, "invalid_request", "labels[0]"),
    ("object label", {**OK, "labels": ["a", {}]}, 422, "invalid_request", "labels[1]"),
    ("blank label", {**OK, "labels": ["a", "  "]}, 422, "invalid_request", "labels[1]"),
    ("long label", {**OK, "labels": ["a", "x" * 101]}, 422, "invalid_request", "labels[1]"),
    ("labels a string", {**OK, "labels": "a,b"}, 422, "invalid_request", "labels"),
    ("labels an object", {**OK, "labels": {"a": 1}}, 422, "invalid_request", "labels"),
    ("descriptions a list", {**OK, "descriptions": ["x"]}, 422, "invalid_request", "descriptions"),
    ("unknown description", {**OK, "descriptions": {"c": "x"}}, 422, "invalid_request", "'c'"),
    ("number description", {**OK, "descriptions": {"a": 1}}, 422, "invalid_request", "a"),
    ("blank description", {**OK, "descriptions": {"a": " "}}, 422, "invalid_request", "a"),
    (
        "described twice",
        {**OK, "descriptions": {"a": "x", " A": "y"}},
        422,
        "invalid_request",
        "twice",
    ),
    ("multi_label string", {**OK, "multi_label": "yes"}, 422, "invalid_request", "multi_label"),
    ("multi_label number", {**OK, "multi_label": 1}, 422, "invalid_request", "multi_label"),
    ("template no label", {**OK, "template": "About it."}, 422, "invalid_request", "template"),
    ("template twice", {**OK, "template": "{label}/{label}"}, 422, "invalid_request", "template"),
    ("template number", {**OK, "template": 7}, 422, "invalid_request", "template"),
    ("unknown field", {**OK, "lang": "en"}, 422, "invalid_request", "lang"),
    ("text and texts", {**OK, "texts": ["x"]}, 422, "invalid_request", "texts"),
    ("no text", {"labels": ["a", "b"]}, 422, "invalid_request", "text"),
    ("texts empty", {"texts": [], "labels": ["a", "b"]}, 422, "invalid_request", "texts"),
    ("too many texts", {"texts": ["x"] * 17, "labels": ["a", "b"]}, 422, "too_many_texts", ""),
    ("array body", ["hello"], 422, "invalid_request", "object"),
    ("not JSON", "{oops", 400, "invalid_json", "JSON"),
    ("body too large", {**OK, "text": LONG}, 413, "payload_too_large", "MAX_BODY_BYTES"),
]


@pytest.mark.parametrize(
    ("what", "body", "status", "kind", "names"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS]
)
def test_bad_inputs_get_a_json_4xx(
    client: Any,
    openapi: dict[str, Any],
    what: str,
    body: Any,
    status: int,
    kind: str,
    names: str,
) -> None:
    if isinstance(body, str):
        response = client.post(ENDPOINT, data=body, content_type="application/json")
    else:
        response = client.post(ENDPOINT, json=body)
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    error = response.get_json()
    jsonschema.validate(error, _response_schema(openapi, str(status)))
    assert set(error) == {"error"}
    assert set(error["error"]) == {"type", "message", "status"}
    assert error["error"]["type"] == kind
    assert error["error"]["status"] == status
    assert names in error["error"]["message"]
    assert "Traceback" not in error["error"]["message"]


def test_openapi_document_is_valid_and_describes_classify(openapi: dict[str, Any]) -> None:
    validate_openapi(openapi)
    assert set(openapi["paths"]) == {ENDPOINT, "/v1/health", "/openapi.json", "/metrics"}
    post_op = openapi["paths"][ENDPOINT]["post"]
    assert {"200", "400", "413", "415", "422", "500", "503"} <= set(post_op["responses"])
    request_schema = _request_schema(openapi)
    assert request_schema["properties"]["labels"]["maxItems"] == MAX_LABELS
    assert request_schema["properties"]["labels"]["minItems"] == 2
    example = post_op["requestBody"]["content"]["application/json"]["example"]
    jsonschema.validate(example, request_schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**example, "labels": list("abcdef")}, request_schema)


def test_real_responses_match_the_document(client: Any, openapi: dict[str, Any]) -> None:
    example = openapi["paths"][ENDPOINT]["post"]["requestBody"]["content"]["application/json"][
        "example"
    ]
    ok = client.post(ENDPOINT, json=example)
    assert ok.status_code == 200
    jsonschema.validate(ok.get_json(), _response_schema(openapi, "200"))
    multi = client.post(ENDPOINT, json={**example, "multi_label": True})
    jsonschema.validate(multi.get_json(), _response_schema(openapi, "200"))
    bad = client.post(ENDPOINT, json={**example, "labels": ["billing"]})
    assert bad.status_code == 422
    jsonschema.validate(bad.get_json(), _response_schema(openapi, "422"))


def test_health_reports_the_encoder(
    client: Any, openapi: dict[str, Any], classify_model_dir: Path
) -> None:
    response = client.get("/v1/health")
    assert response.status_code == 200
    body = response.get_json()
    jsonschema.validate(body, _with_components(openapi, {"$ref": "#/components/schemas/Health"}))
    assert body["status"] == "ok"
    assert body["function"] == "classify"
    assert body["kind"] == "encoder"
    assert body["labels"] == []
    assert body["model"] == {
        "name": "aifn-zero-shot-minilm",
        "revision": served_revision(classify_model_dir),
    }
