"""Unit tests: request decoding and the text/texts shape, without a model."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import flask
import pytest

from aifn.core.validation import (
    _BLANK,
    TEXT_PATTERN,
    decode_json,
    fold,
    parse_texts,
    require_object,
)
from aifn.http import errors
from aifn.http.body import read_json

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
    assert errors.status(info.value) == 422


def test_too_many_texts() -> None:
    with pytest.raises(errors.TooManyTexts, match="4 texts in one request; the limit is 3"):
        parse_texts({"texts": ["a", "b", "c", "d"]}, max_texts=3)


# --- decoding is total (issue 18) ----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ('{"n": ' + "1" * 4301 + "}", "number is too long"),
        ('{"n": NaN}', "NaN is not a JSON value"),
        ('{"n": -Infinity}', "-Infinity is not a JSON value"),
        ('{"a": {"b": 1, "b": 2}}', "'b' appears twice"),
        ("[" * 100_000, "nested too deeply"),
    ],
)
def test_decode_json_refuses_what_python_would_crash_on_or_read_leniently(
    text: str, says: str
) -> None:
    with pytest.raises(errors.InvalidJson, match=says):
        decode_json(text)


def test_decode_json_keeps_what_rfc_8259_allows() -> None:
    assert decode_json('{"n": ' + "1" * 4300 + ', "x": 1e999, "k": {"a": 1}, "l": {"a": 2}}')[
        "k"
    ] == {"a": 1}


def test_an_error_message_never_echoes_a_whole_key() -> None:
    with pytest.raises(errors.InvalidJson) as caught:
        decode_json('{"' + "k" * 10_000 + '": 1, "' + "k" * 10_000 + '": 2}')
    assert len(caught.value.message) < 200


def test_text_pattern_cannot_backtrack_quadratically() -> None:
    """Structural: the pattern is blanks, one first character, the rest, and the first two
    classes share no character, so there is one way to split any text (no backtracking search).

    The old `[^\\x00]*[^\\x00 blanks][^\\x00]*` tried every split: quadratic on a long text with a
    NUL at its end.
    """
    prefix = f"^[{_BLANK}]*"
    assert TEXT_PATTERN.startswith(prefix)
    first, rest = TEXT_PATTERN[len(prefix) :].split("]", 1)
    assert rest == "[^\\x00]*$"
    blank, first_char = re.compile(f"[{_BLANK}]"), re.compile(first + "]")
    overlap = [
        c for c in map(chr, range(0x10000)) if blank.fullmatch(c) and first_char.fullmatch(c)
    ]
    assert not overlap


def test_text_pattern_matches_a_pathological_text_in_a_bounded_number_of_steps() -> None:
    # 10^5 letters then a NUL: the old pattern made ~5 * 10^9 steps (hours); this one ~10^5.
    # A subprocess, so a regression ends in the timeout instead of hanging the suite.
    code = (
        "import re, sys; from aifn.core.validation import TEXT_PATTERN as P; "
        "sys.exit(0 if re.match(P, 'a' * 100_000 + '\\x00') is None "
        "and re.match(P, ' ' * 100_000 + 'a') else 1)"
    )
    done = subprocess.run([sys.executable, "-c", code], timeout=60, check=False)
    assert done.returncode == 0


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("café", "cafe\u0301"),  # NFC: precomposed vs combining accent
        ("billing", "\uff42\uff49\uff4c\uff4c\uff49\uff4e\uff47"),  # NFKC: full-width
        ("file", "\ufb01le"),  # NFKC: the fi ligature
        ("Straße", "STRASSE"),  # case folding
        ("billing", "bill\u00ading"),  # a soft hyphen (Cf)
        ("billing", "bil\u200bling"),  # a zero-width space (Cf)
        (" Billing ", "billing"),
    ],
)
def test_fold_makes_names_that_read_the_same_equal(a: str, b: str) -> None:
    assert fold(a) == fold(b)


def test_fold_keeps_different_names_apart() -> None:
    assert len({fold(x) for x in ("billing", "bill", "Billing report", "bílling", "1", "١")}) == 6
