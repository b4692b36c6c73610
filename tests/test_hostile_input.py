"""Hostile input: whatever a caller sends (body, headers, query, path), a JSON 4xx, never a 5xx.

Each class of input a code review found breaking a parser has its own test, against the real
functions (loaded in process through functions-framework's ``create_app``, the model real).
A property test (hypothesis) then mixes header and body shapes schemathesis never sends
(``tests/test_fuzz.py`` fuzzes from the OpenAPI document, which does not describe headers or
non-JSON bodies) and asserts the one error format on every answer. A real server checks what
only a socket can send: a chunked body that breaks off.
"""

from __future__ import annotations

import base64
import json
import socket
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .helpers import CLASSIFY_MODEL, SENTIMENT_MODEL, function_app

pytestmark = pytest.mark.integration

SENTIMENT = "/v1/analyze/sentiment"
CLASSIFY = "/v1/classify"
LABELS = ["billing", "bug report"]
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
KEY = "hostile-test-key-0123456789"


def _app(function: str, model: Path, **env: str) -> Any:
    return function_app(function, model, **{"MAX_BODY_BYTES": "65536", **env})


@pytest.fixture(scope="module")
def sentiment() -> Any:
    return _app("sentiment", SENTIMENT_MODEL)[0]


@pytest.fixture(scope="module")
def guarded() -> Any:
    """Sentiment with the guard reading every identity header: a rate limit (per client, in
    process), IAM identities and two forwarded hops."""
    return _app(
        "sentiment",
        SENTIMENT_MODEL,
        RATE_LIMIT="1000000/second",
        IAM_REQUIRED="true",
        FORWARDED_FOR_HOPS="2",
    )[0]


@pytest.fixture(scope="module")
def keyed() -> Any:
    """Sentiment in API-key mode with a rate limit: the key header is read on every request."""
    return _app(
        "sentiment",
        SENTIMENT_MODEL,
        API_KEYS=KEY,
        RATE_LIMIT="1000000/second",
    )[0]


@pytest.fixture(scope="module")
def classify_app() -> tuple[Any, Any]:
    return _app("classify", CLASSIFY_MODEL, CACHE_MAX_ENTRIES="0")


@pytest.fixture(scope="module")
def classify(classify_app: tuple[Any, Any]) -> Any:
    return classify_app[0]


def assert_json_error(response: Any, status: int | None = None, type_: str | None = None) -> dict:
    """The project's one error format, with a 4xx status (and ``status``/``type_`` if given)."""
    assert 400 <= response.status_code < 500, (response.status_code, response.get_data()[:300])
    assert response.mimetype == "application/json", response.get_data()[:300]
    body = json.loads(response.get_data())
    assert set(body) == {"error"}
    assert set(body["error"]) == {"type", "message", "status"}
    assert body["error"]["status"] == response.status_code
    if status is not None:
        assert response.status_code == status, body
    if type_ is not None:
        assert body["error"]["type"] == type_, body
    return body["error"]


def post(client: Any, path: str, data: bytes | str, **headers: str) -> Any:
    return client.post(path, data=data, headers={"Content-Type": "application/json", **headers})


# --- the body ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        '{"text": ' + "1" * 5000 + "}",  # past Python's 4,300-digit int limit: was a 500
        '{"text": "a", "texts": [' + "9" * 4301 + "]}",
        '{"text": "a", "x": -' + "1" * 10000 + "}",
    ],
    ids=["text", "in-a-list", "negative-unknown-field"],
)
def test_an_integer_too_long_for_python_is_invalid_json(sentiment: Any, body: str) -> None:
    error = assert_json_error(post(sentiment, SENTIMENT, body), 400, "invalid_json")
    assert "number is too long" in error["message"]


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_not_json(sentiment: Any, constant: str) -> None:
    body = '{"texts": ["a"], "x": ' + constant + "}"
    error = assert_json_error(post(sentiment, SENTIMENT, body), 400, "invalid_json")
    assert constant.lstrip("-") in error["message"]


def test_a_duplicate_key_is_refused_not_silently_resolved(sentiment: Any) -> None:
    # Python keeps the last "text", other parsers (a proxy, a WAF) the first: one body, two
    # readings. Refused, at any depth.
    assert_json_error(post(sentiment, SENTIMENT, '{"text": "a", "text": "b"}'), 400, "invalid_json")


def test_a_duplicate_description_key_is_refused(classify: Any) -> None:
    body = '{"text": "a", "labels": ["x", "y"], "descriptions": {"x": "one", "x": "two"}}'
    error = assert_json_error(post(classify, CLASSIFY, body), 400, "invalid_json")
    assert "'x' appears twice" in error["message"]


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
        b'{"text": "a", "x": 1' + b"0" * 5000 + b".5e99999}",  # a float: inf, a number
        b'{"text": "a", "x": 1e-99999}',
        b"\xef\xbb\xbf" + b'{"text": "a"}',  # a UTF-8 byte order mark
        b'{"text": "\xe9t\xe9"}',  # Latin-1, not UTF-8
        b'{"text": "\xed\xa0\x80"}',  # a surrogate encoded in UTF-8 bytes
        b'{"text": "\\ud800"}',  # a lone surrogate escape
        b'{"\\udfff": "a"}',
        b'{"text": "a"} {"text": "b"}',
        b"\x00",
        b'"just a string"',
    ],
    ids=[
        "deep-arrays",
        "deep-objects",
        "huge-float",
        "tiny-float",
        "bom",
        "latin-1",
        "utf8-surrogate",
        "lone-surrogate",
        "surrogate-key",
        "two-documents",
        "nul",
        "not-an-object",
    ],
)
def test_malformed_bodies_get_a_json_4xx(sentiment: Any, classify: Any, body: bytes) -> None:
    assert_json_error(post(sentiment, SENTIMENT, body))
    assert_json_error(post(classify, CLASSIFY, body))


@pytest.mark.parametrize(
    "body",
    [
        {"text": "a", "k" * 60_000: 1},
        {"text": "a", **{f"field {i}": i for i in range(2000)}},
        {"text": "a", "labels": ["x", "y"], "descriptions": {"z" * 60_000: "d"}},
        # Folds to "x" (soft hyphens are invisible), so it describes a label, wrongly typed.
        {"text": "a", "labels": ["x", "y"], "descriptions": {"x" + "\u00ad" * 20_000: 5}},
    ],
    ids=["long-unknown-field", "many-unknown-fields", "long-description-key", "folded-key"],
)
def test_an_error_message_never_echoes_a_huge_input(classify: Any, body: dict) -> None:
    data = json.dumps(body, ensure_ascii=False).encode()
    response = classify.post(CLASSIFY, data=data, content_type="application/json")
    error = assert_json_error(response, 422, "invalid_request")
    assert len(error["message"]) < 400, len(error["message"])


# --- headers -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/health", "/openapi.json", "/nowhere", SENTIMENT])
def test_a_trace_header_with_a_huge_span_id_is_ignored_on_every_path(
    sentiment: Any, path: str
) -> None:
    header = {"X-Cloud-Trace-Context": f"{TRACE}/{'9' * 5000};o=1"}
    if path == SENTIMENT:
        response = post(sentiment, path, '{"text": "fine"}', **header)
        assert response.status_code == 200, response.get_data()
    else:
        response = sentiment.get(path, headers=header)
        assert response.status_code in (200, 404)
        assert response.mimetype == "application/json"


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Cloud-Trace-Context": f"{TRACE}/{'9' * 30}"},  # over 2**64
        {"X-Cloud-Trace-Context": f"{TRACE}/" + "\u0669" * 3},  # Arabic-Indic digits
        {"X-Cloud-Trace-Context": "a" * 100_000},
        {"traceparent": "ff-" + TRACE + "-00f067aa0ba902b7-01"},
        {"traceparent": f"00-{TRACE}-{'0' * 16}-01"},
        {"traceparent": "\xff" * 10_000},
    ],
)
def test_bad_trace_headers_leave_the_request_unlinked(sentiment: Any, headers: dict) -> None:
    assert sentiment.get("/v1/health", headers=headers).status_code == 200


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json; charset=utf-16",
        "application/json; charset=\xff\xfe",
        'application/json; charset="',
        "text/plain",
        "application/",
        "\xff/\xff+json",
        "application/json; " + ";" * 5000,
    ],
)
def test_odd_content_types_are_refused_or_read_never_a_5xx(
    sentiment: Any, content_type: str
) -> None:
    response = sentiment.post(
        SENTIMENT, data=b'{"text": "a"}', headers={"Content-Type": content_type}
    )
    if response.status_code != 200:
        assert_json_error(response, 415, "unsupported_media_type")


def test_a_query_string_and_odd_headers_change_nothing(sentiment: Any) -> None:
    response = sentiment.post(
        SENTIMENT + "?text=%ff%00&" + "a" * 5000,
        data=b'{"text": "fine"}',
        headers={
            "Content-Type": "application/json",
            "X-Forwarded-For": "\xff, ::::, " + "1" * 5000,
            "X-API-Key": "\xff" * 300,
            "Authorization": "Bearer " + "[" * 10_000,
            "Accept-Charset": "\xff",
        },
    )
    assert response.status_code == 200, response.get_data()


def _token(payload: str) -> str:
    encoded = base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")
    return f"Bearer e30.{encoded}.c2ln"


@pytest.mark.parametrize(
    "authorization",
    [
        _token('{"sub": ' + "1" * 5000 + "}"),
        _token("\xff"),
        "Bearer x.\xe9\xe9.y",
        "Bearer " + "." * 5000,
        _token('{"sub": {"sub": "x"}}'),
    ],
    ids=["bigint-sub", "latin-1", "not-base64", "dots", "sub-an-object"],
)
def test_odd_id_tokens_count_as_no_identity(guarded: Any, authorization: str) -> None:
    response = post(guarded, SENTIMENT, '{"text": "fine"}', Authorization=authorization)
    assert response.status_code == 200, response.get_data()


def test_a_deeply_nested_id_token_counts_as_no_identity(guarded: Any) -> None:
    response = post(guarded, SENTIMENT, '{"text": "fine"}', Authorization=_token("[" * 100_000))
    assert response.status_code == 200, response.get_data()


def test_a_body_cut_off_mid_chunk_is_a_400_not_a_500(tmp_path: Path) -> None:
    """Over a real socket (gunicorn): a chunked body whose client stops sending."""
    from .helpers import start_server

    server = start_server(SENTIMENT_MODEL, tmp_path)
    try:
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(
                b"POST /v1/analyze/sentiment HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"40\r\n" + b'{"text": "only part of'
            )
            sock.shutdown(socket.SHUT_WR)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400"), answer[:300]
        assert json.loads(body)["error"]["type"] == "invalid_json"
        # A client error: logged as one, with no stack trace.
        errors = [line for line in server.log_lines() if line.get("severity") == "ERROR"]
        assert not errors, errors
    finally:
        server.proc.kill()
        server.proc.wait()


# --- the property test ---------------------------------------------------------------------

# Headers the code reads (and some it should not care about); values are latin-1 text, as WSGI
# hands header values to the application, with long digit and bracket runs that broke parsers.
_HEADER_NAMES = st.sampled_from(
    [
        "Content-Type",
        "Content-Encoding",
        "X-Cloud-Trace-Context",
        "traceparent",
        "X-Forwarded-For",
        "X-API-Key",
        "X-API-Key",
        "Authorization",
        "X-Serverless-Authorization",
        "Accept",
        "User-Agent",
        "X-Anything",
    ]
)
_LATIN1 = st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f")
_RUNS = st.sampled_from(["9" * 5000, "[" * 3000, "{", "/", ";o=1", ",", "=", TRACE, "\xff", KEY])
_HEADER_VALUES = st.one_of(
    st.lists(st.one_of(st.text(_LATIN1, max_size=40), _RUNS), max_size=4).map("".join),
    # Well-formed up to one field, then hostile there.
    st.builds(
        "{}/{}{}".format,
        st.just(TRACE),
        st.sampled_from(["9" * 5000, str(2**64), "1", "\u0669", ""]),
        st.sampled_from(["", ";o=1", ";o=9"]),
    ),
)
_CONTENT_TYPES = st.sampled_from(
    [
        "application/json",
        "application/json; charset=utf-8",
        "application/json; charset=latin-1",
        "application/problem+json",
        "application/json; charset",
        "text/json",
        "",
    ]
)
# JSON-ish fragments: whatever they join to, valid JSON or not, deep or flat.
_FRAGMENTS = st.sampled_from(
    [
        "{",
        "}",
        "[",
        "]",
        ",",
        ":",
        '"text"',
        '"texts"',
        '"labels"',
        '"descriptions"',
        '"template"',
        '"multi_label"',
        '"billing"',
        '"bug"',
        '"{label}"',
        '"\\ud800"',
        '"\\u0000"',
        '"   "',
        "NaN",
        "-Infinity",
        "1e999",
        "9" * 4400,
        "true",
        "null",
        "0",
        "[" * 200,
        '"ｂｉｌｌｉｎｇ"',
        '"cafe\u0301"',
        '"café"',
    ]
)
# Valid JSON around one hostile value: a number Python cannot convert, a constant JSON lacks,
# a repeated key, deep nesting.
_HOSTILE_VALUES = st.sampled_from(
    ["1" * 4301, "-" + "9" * 6000, "NaN", "Infinity", "1e999", "[" * 5000 + "]" * 5000, '"x"']
)
_TEMPLATES = st.sampled_from(
    [
        '{{"text": {}}}',
        '{{"texts": ["a", {}]}}',
        '{{"text": "a", "labels": ["x", "y"], "multi_label": {}}}',
        '{{"text": "a", "labels": ["x", "y"], "descriptions": {{"x": {}}}}}',
        '{{"text": "a", "text": {}}}',
        '{{"text": "a", "labels": ["x", "y"], "labels": [{}, "z"]}}',
    ]
)
_BODIES = st.one_of(
    st.builds(lambda template, value: template.format(value), _TEMPLATES, _HOSTILE_VALUES),
    st.lists(_FRAGMENTS, max_size=30).map("".join),
    st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
    st.builds(
        lambda texts, labels, extra: json.dumps(
            {"texts": texts, "labels": labels, **extra}, ensure_ascii=False
        ),
        st.lists(st.text(max_size=30), max_size=4),
        st.lists(st.text(max_size=12), max_size=4),
        st.dictionaries(
            st.sampled_from(["descriptions", "template", "multi_label", "text", "zzz"]),
            st.one_of(st.text(max_size=20), st.booleans(), st.dictionaries(st.text(), st.text())),
            max_size=2,
        ),
    ),
)


@given(
    function=st.sampled_from(["sentiment", "classify", "guarded", "keyed"]),
    method=st.sampled_from(["POST", "POST", "POST", "GET", "PUT", "HEAD"]),
    path=st.sampled_from(["endpoint", "/v1/health", "/openapi.json", "/x%ff", "/v1/health/"]),
    query=st.one_of(st.just(""), st.text(_LATIN1, max_size=30)),
    content_type=_CONTENT_TYPES,
    headers=st.dictionaries(_HEADER_NAMES, _HEADER_VALUES, max_size=4),
    body=_BODIES,
)
@settings(
    max_examples=400,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_any_headers_and_body_get_json_and_never_a_5xx(
    sentiment: Any,
    classify: Any,
    guarded: Any,
    keyed: Any,
    function: str,
    method: str,
    path: str,
    query: str,
    content_type: str,
    headers: dict[str, str],
    body: str,
) -> None:
    clients = {"sentiment": sentiment, "classify": classify, "guarded": guarded, "keyed": keyed}
    client = clients[function]
    if path == "endpoint":
        path = CLASSIFY if function == "classify" else SENTIMENT
    sent = {"Content-Type": content_type, **headers}
    response = client.open(
        path,
        method=method,
        query_string=query,
        data=body.encode("utf-8", "surrogatepass"),
        headers=sent,
    )
    assert response.status_code < 500, (response.status_code, response.get_data()[:300])
    if method == "HEAD":
        return
    assert response.mimetype == "application/json", response.get_data()[:300]
    if response.status_code >= 400:
        assert_json_error(response)
