"""Unit tests: request decoding and the text/texts shape, without a model."""

from __future__ import annotations

import json

import flask
import pytest

from aifn import errors
from aifn.validation import parse_texts, read_json, require_object

app = flask.Flask(__name__)


def _read(data: bytes | str, content_type: str | None = "application/json", **kw: object):
    headers = {} if content_type is None else {"Content-Type": content_type}
    with app.test_request_context("/", method="POST", data=data, headers=headers, **kw):
        return read_json(flask.request, max_bytes=100)


def test_reads_a_json_object() -> None:
    assert _read('{"text": "hi"}') == {"text": "hi"}


@pytest.mark.parametrize(
    "content_type", ["application/json; charset=utf-8", "application/problem+json"]
)
def test_accepts_json_media_types(content_type: str) -> None:
    assert _read('{"a": 1}', content_type) == {"a": 1}


@pytest.mark.parametrize(
    ("data", "content_type", "error"),
    [
        ("{not json", "application/json", errors.InvalidJson),
        ("", "application/json", errors.InvalidJson),
        (b"\xff\xfe{}", "application/json", errors.InvalidJson),
        ("text=hello", "application/x-www-form-urlencoded", errors.UnsupportedMediaType),
        ('{"text": "hi"}', None, errors.UnsupportedMediaType),
        ('{"text": "hi"}', "text/plain", errors.UnsupportedMediaType),
        ('{"text": "hi"}', "application/json; charset=latin-1", errors.UnsupportedMediaType),
        ("[" * 100_000, "application/json", errors.PayloadTooLarge),
    ],
)
def test_rejects_bad_bodies(data: str | bytes, content_type: str | None, error: type) -> None:
    with pytest.raises(error):
        _read(data, content_type)


def test_deeply_nested_json_is_a_client_error() -> None:
    body = "[" * 50_000 + "]" * 50_000
    with (
        app.test_request_context(
            "/", method="POST", data=body, headers={"Content-Type": "application/json"}
        ),
        pytest.raises(errors.InvalidJson, match="nested too deeply"),
    ):
        read_json(flask.request, max_bytes=len(body))


def test_body_limit_is_checked_on_chunked_bodies_without_content_length() -> None:
    body = json.dumps({"text": "x" * 500}).encode()
    env = {"wsgi.input_terminated": True}
    with app.test_request_context(
        "/",
        method="POST",
        input_stream=__import__("io").BytesIO(body),
        headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"},
        environ_overrides=env,
    ):
        assert flask.request.content_length is None
        with pytest.raises(errors.PayloadTooLarge):
            read_json(flask.request, max_bytes=100)
        # The rest of the body is never buffered (functions-framework reads it after responding).
        assert flask.request.get_data() == b""


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([], "must be a JSON object, not an array"),
        ("text", "must be a JSON object, not a string"),
        (None, "not null"),
        ({"txt": "typo"}, "unknown field(s) 'txt'"),
    ],
)
def test_require_object(body: object, message: str) -> None:
    with pytest.raises(errors.InvalidRequest) as info:
        require_object(body, allowed={"text", "texts"})
    assert message in info.value.message


def test_single_text_is_a_list_of_one() -> None:
    parsed = parse_texts({"text": "good"}, max_texts=3)
    assert parsed.texts == ["good"]
    assert parsed.single


def test_texts_keep_their_order() -> None:
    parsed = parse_texts({"texts": ["b", "a", "c"]}, max_texts=3)
    assert parsed.texts == ["b", "a", "c"]
    assert not parsed.single


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "exactly one of 'text'"),
        ({"text": "a", "texts": ["b"]}, "not both"),
        ({"text": ""}, "'text' is empty"),
        ({"text": "   \n"}, "'text' is empty"),
        ({"text": 5}, "'text' must be a string, not a number"),
        ({"text": None}, "not null"),
        ({"text": ["a"]}, "not an array"),
        ({"texts": "a"}, "'texts' must be a list of strings, not a string"),
        ({"texts": []}, "'texts' is empty"),
        ({"texts": ["ok", 3]}, "'texts[1]' must be a string"),
        ({"texts": ["ok", ""]}, "'texts[1]' is empty"),
        ({"texts": [{"text": "a"}]}, "not an object"),
        ({"text": "a\x00b"}, "NUL"),
        ({"text": "bad \ud800 surrogate"}, "unpaired surrogate"),
    ],
)
def test_invalid_shapes(body: dict[str, object], message: str) -> None:
    with pytest.raises(errors.InvalidRequest) as info:
        parse_texts(body, max_texts=3)
    assert message in info.value.message
    assert info.value.status == 422


def test_too_many_texts() -> None:
    with pytest.raises(errors.TooManyTexts, match="4 texts in one request; the limit is 3"):
        parse_texts({"texts": ["a", "b", "c", "d"]}, max_texts=3)
