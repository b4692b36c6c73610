"""Turning decoded JSON (a request body, a line of a batch file) into validated values.

Every check raises :class:`~aifn.core.errors.InvalidJson`, :class:`~aifn.core.errors.InvalidRequest`
or :class:`~aifn.core.errors.TooManyTexts` with a precise message, never anything else. The HTTP
edge reads bodies with :func:`aifn.http.body.read_json`; the file path reads lines itself; both
then use the parsers here. Nothing in this module touches the model or a transport.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from aifn.core.errors import InvalidJson, InvalidRequest, TooManyTexts


def decode_json(text: str) -> Any:
    """Decode JSON as RFC 8259 defines it, or raise :class:`InvalidJson`; never anything else.

    Stricter than :func:`json.loads` where its leniency would let two parsers read one body
    differently: ``NaN`` and ``Infinity`` (not JSON) and duplicate keys (Python keeps the last,
    other parsers the first) are refused. Any input ends in a value or an :class:`InvalidJson`:
    a number too long for Python to convert (over ``sys.get_int_max_str_digits()`` digits, a
    ``ValueError``) and nesting deeper than the recursion limit are refused too.
    """
    try:
        return json.loads(text, parse_constant=_no_constant, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as exc:
        raise InvalidJson(
            f"body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except RecursionError:
        raise InvalidJson("body is not valid JSON: nested too deeply") from None
    except _NotJson as exc:
        raise InvalidJson(f"body is not valid JSON: {exc}") from None
    except ValueError as exc:
        # int("1" * 5000): Python refuses integers of more than 4,300 digits (CVE-2020-10735).
        raise InvalidJson(f"body is not valid JSON: a number is too long ({_clip(exc)})") from None


def _no_constant(name: str) -> Any:
    raise _NotJson(f"{name} is not a JSON value")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _NotJson(f"the key {quote(key)} appears twice in one object")
            seen.add(key)
    return obj


class _NotJson(Exception):
    """Raised inside the decoder's hooks; :func:`decode_json` turns it into InvalidJson."""


def _clip(exc: BaseException) -> str:
    return str(exc).split(";")[0][:120]


def quote(value: str, limit: int = 60) -> str:
    """``repr(value)`` cut to about ``limit`` characters: messages never echo a whole body."""
    if len(value) <= limit:
        return repr(value)
    return repr(value[:limit]) + f"... ({len(value)} characters)"


def require_object(body: Any, *, allowed: Collection[str]) -> Mapping[str, Any]:
    """The body must be a JSON object whose keys are all in ``allowed``."""
    if not isinstance(body, dict):
        raise InvalidRequest(f"the body must be a JSON object, not {json_type(body)}")
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        shown = ", ".join(quote(name) for name in unknown[:5])
        if len(unknown) > 5:
            shown += f" and {len(unknown) - 5} more"
        raise InvalidRequest(f"unknown field(s) {shown}; allowed: {', '.join(sorted(allowed))}")
    return body


@dataclass(frozen=True)
class Texts:
    """The texts of a request, and whether they came as a single ``text``."""

    texts: list[str]
    single: bool


def parse_texts(body: Mapping[str, Any], *, max_texts: int) -> Texts:
    """Exactly one of ``text`` (a string) or ``texts`` (a non-empty list of strings)."""
    has_text, has_texts = "text" in body, "texts" in body
    if has_text == has_texts:
        raise InvalidRequest(
            "send exactly one of 'text' (a string) or 'texts' (a list of strings)"
            if not has_text
            else "send 'text' or 'texts', not both"
        )
    if has_text:
        return Texts([check_string(body["text"], "text")], single=True)
    texts = body["texts"]
    if not isinstance(texts, list):
        raise InvalidRequest(f"'texts' must be a list of strings, not {json_type(texts)}")
    if not texts:
        raise InvalidRequest("'texts' is empty; send at least one text")
    if len(texts) > max_texts:
        raise TooManyTexts(
            f"{len(texts)} texts in one request; the limit is {max_texts} (MAX_BATCH_TEXTS)"
        )
    return Texts([check_string(t, f"texts[{i}]") for i, t in enumerate(texts)], single=False)


# What check_string accepts, as the OpenAPI document's `pattern` for texts and labels. The blank
# characters are Python's (str.isspace, which strip() removes) spelled out, because JSON Schema
# regexes (ECMA-262) give `\s` a different set. Unpaired surrogates cannot be written in a pattern.
_BLANK = r"\t\n\x0b\x0c\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
# Blanks, then the first character that is neither blank nor NUL, then anything but NUL. The
# three runs can split a text only one way, so a backtracking engine (Python's `re`, the ECMA-262
# engines of JSON Schema validators) stays linear; `[^\x00]*[^\x00 blanks][^\x00]*` said the
# same but backtracked quadratically on a long text with a NUL at its end.
TEXT_PATTERN = rf"^[{_BLANK}]*[^\x00{_BLANK}][^\x00]*$"


def check_string(value: Any, where: str, *, max_chars: int | None = None) -> str:
    """A non-blank string with no NUL or unpaired surrogate, at most ``max_chars`` long.

    ``TEXT_PATTERN`` is the same rule (bar surrogates) for the OpenAPI document.
    """
    if not isinstance(value, str):
        raise InvalidRequest(f"'{where}' must be a string, not {json_type(value)}")
    if not value.strip():
        raise InvalidRequest(f"'{where}' is empty or only whitespace")
    if "\x00" in value:
        raise InvalidRequest(f"'{where}' contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        # JSON can spell a lone surrogate ("\\ud800") that no UTF-8 text contains.
        raise InvalidRequest(f"'{where}' contains an unpaired surrogate escape") from None
    if max_chars is not None and len(value) > max_chars:
        raise InvalidRequest(f"'{where}' is {len(value)} characters; the limit is {max_chars}")
    return value


def fold(value: str) -> str:
    """The key under which two caller-supplied names are the same name (e.g. two labels).

    Surrounding spaces, case, Unicode normalisation (NFKC: "ﬁ" is "fi", a full-width "\uff21" is
    "A", "e" + combining acute is "é") and invisible format characters (soft hyphen, zero-width
    space, category Cf) do not make names different: Unicode's NFKC_Casefold, approximately.
    """
    nfkc = unicodedata.normalize("NFKC", value)
    visible = "".join(c for c in nfkc if unicodedata.category(c) != "Cf")
    return unicodedata.normalize("NFKC", visible.casefold()).strip()


def json_type(value: Any) -> str:
    """The JSON name of a decoded value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__
