"""The OpenAPI 3.1 document each function serves at ``GET /openapi.json``.

Shared pieces (the error body, model identity, a ranked result, the text/texts request) are
components here; a capability adds its own request and response schemas when it registers an
endpoint. The document is built from the registered endpoints, so it cannot list a route the
function does not serve.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from aifn.core.errors import Error
from aifn.core.validation import TEXT_PATTERN
from aifn.http.errors import ERROR_TYPES, status

OPENAPI_VERSION = "3.1.0"


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


COMPONENTS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["type", "message", "status"],
                "properties": {
                    "type": {"type": "string", "enum": sorted({e.type for e in ERROR_TYPES})},
                    "message": {"type": "string"},
                    "status": {"type": "integer"},
                },
            }
        },
    },
    "ModelIdentity": {
        "type": "object",
        "required": ["name", "revision"],
        "properties": {
            "name": {"type": "string"},
            "revision": {
                "type": "string",
                "description": "SHA-256 of the model's files (first 16 hex digits).",
            },
        },
    },
    "LabelScore": {
        "type": "object",
        "required": ["label", "score"],
        "properties": {
            "label": {"type": "string"},
            "score": {"type": "number", "minimum": 0, "maximum": 1},
        },
    },
    "Result": {
        "type": "object",
        "required": ["label", "score", "labels", "truncated"],
        "properties": {
            "label": {"type": "string", "description": "The top label."},
            "score": {"type": "number", "minimum": 0, "maximum": 1},
            "labels": {
                "type": "array",
                "items": ref("LabelScore"),
                "description": "Every label with its score, highest first.",
            },
            "truncated": {
                "type": "boolean",
                "description": "The text was longer than MAX_TOKENS tokens or MAX_TEXT_CHARS "
                "characters and only its start was read.",
            },
            "cached": {
                "type": "boolean",
                "description": "The prediction cache answered; the model did not run for it.",
            },
        },
    },
    "Text": {
        "type": "string",
        "minLength": 1,
        "pattern": TEXT_PATTERN,
        "description": "One text: not blank, no NUL character. Only its first MAX_TEXT_CHARS "
        "characters and MAX_TOKENS tokens are read (the result then says `truncated`).",
    },
    "TextList": {
        "type": "array",
        "minItems": 1,
        "items": ref("Text"),
        "description": "Texts to process together (at most MAX_BATCH_TEXTS); results keep "
        "this order.",
    },
    "TextsRequest": {
        "type": "object",
        "description": "Exactly one of `text` or `texts`.",
        "oneOf": [
            {
                "type": "object",
                "required": ["text"],
                "additionalProperties": False,
                "properties": {"text": ref("Text")},
            },
            {
                "type": "object",
                "required": ["texts"],
                "additionalProperties": False,
                "properties": {"texts": ref("TextList")},
            },
        ],
    },
    "PredictionResponse": {
        "type": "object",
        "required": ["model", "results"],
        "properties": {
            "model": ref("ModelIdentity"),
            "results": {
                "type": "array",
                "items": ref("Result"),
                "description": "One result per input text, in input order.",
            },
        },
    },
    "Health": {
        "type": "object",
        "required": ["status", "function", "model"],
        "properties": {
            "status": {"type": "string", "enum": ["ok"]},
            "function": {"type": "string"},
            "model": ref("ModelIdentity"),
            "kind": {
                "type": "string",
                "enum": ["classifier", "encoder"],
                "description": "A classifier has fixed labels; an encoder scores any labels "
                "(zero-shot).",
            },
            "labels": {
                "type": "array",
                "items": {"type": "string"},
                "description": "A classifier's labels; empty for an encoder.",
            },
            "cache": {
                "type": "object",
                "description": "Prediction cache: backend, circuit-breaker state, and counters "
                "since start (per text).",
                "properties": {
                    "backend": {"type": "string", "enum": ["memory", "redis", "off"]},
                    "state": {"type": "string", "enum": ["closed", "open"]},
                    "hits": {"type": "integer"},
                    "misses": {"type": "integer"},
                    "coalesced": {"type": "integer"},
                    "errors": {"type": "object", "additionalProperties": {"type": "integer"}},
                },
            },
            "batching": {
                "type": "object",
                "description": "The model's batching queue: texts waiting now, and counters since "
                "start (batches run, texts in them, the largest batch, requests refused with 429 "
                "or timed out, failed batches retried request by request).",
                "additionalProperties": {"type": "integer"},
            },
            "rate_limit": {
                "type": "object",
                "description": "Only when RATE_LIMIT is set: the limit, where the buckets live "
                "(redis or memory), the circuit-breaker state, and requests allowed, limited, "
                "and decided in process because Redis failed, since start.",
                "required": ["limit", "backend", "state", "allowed", "limited", "fallback"],
                "properties": {
                    "limit": {"type": "string"},
                    "backend": {"type": "string", "enum": ["memory", "redis"]},
                    "state": {"type": "string", "enum": ["closed", "open"]},
                    "allowed": {"type": "integer"},
                    "limited": {"type": "integer"},
                    "fallback": {"type": "integer"},
                },
            },
        },
    },
}


@dataclass(frozen=True)
class Operation:
    """What the document says about one method on one path."""

    method: str
    path: str
    summary: str
    response_schema: dict[str, Any]
    request_schema: dict[str, Any] | None = None
    request_example: Any = None
    errors: tuple[type[Error], ...] = field(default_factory=tuple)
    response_media_type: str = "application/json"


def document(
    *,
    title: str,
    version: str,
    description: str,
    operations: Iterable[Operation],
    max_texts: int | None = None,
) -> dict[str, Any]:
    """The whole document; ``max_texts`` (MAX_BATCH_TEXTS) becomes ``TextList.maxItems``."""
    components = dict(COMPONENTS)
    if max_texts is not None:
        components["TextList"] = {**COMPONENTS["TextList"], "maxItems": max_texts}
    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        responses: dict[str, Any] = {
            "200": {
                "description": "Success.",
                "content": {op.response_media_type: {"schema": op.response_schema}},
            }
        }
        for code in sorted({status(e) for e in op.errors}):
            types = ", ".join(f"`{e.type}`" for e in op.errors if status(e) == code)
            responses[str(code)] = {
                "description": f"Error: {types}.",
                "content": {"application/json": {"schema": ref("Error")}},
            }
        entry: dict[str, Any] = {
            "summary": op.summary,
            "operationId": f"{op.method.lower()}_{op.path.strip('/').replace('/', '_')}",
            "responses": responses,
        }
        if op.request_schema is not None:
            media: dict[str, Any] = {"schema": op.request_schema}
            if op.request_example is not None:
                media["example"] = op.request_example
            entry["requestBody"] = {"required": True, "content": {"application/json": media}}
        paths.setdefault(op.path, {})[op.method.lower()] = entry
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": title, "version": version, "description": description},
        "paths": paths,
        "components": {"schemas": components},
    }
