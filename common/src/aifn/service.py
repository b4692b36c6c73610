"""The HTTP layer shared by every function: routing, errors, health, OpenAPI, request logs.

functions-framework hands every path and method to one entry point; :class:`Service` routes
them. A capability registers its endpoints with :meth:`Service.post`; the service supplies
``GET /v1/health`` and ``GET /openapi.json``. Handlers receive the decoded JSON body and return a
JSON-able dict; anything else they raise becomes a JSON error (see :mod:`aifn.errors`). This
layer never touches tensors.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import flask
from werkzeug.exceptions import HTTPException

from aifn import errors, logs, openapi
from aifn.batching import DynamicBatcher
from aifn.cache import PredictionCache
from aifn.model import TextClassifier, TextEncoder
from aifn.settings import Settings
from aifn.validation import read_json

log = logging.getLogger("aifn.request")

Handler = Callable[[Any], dict[str, Any]]

_POST_ERRORS: tuple[type[errors.ApiError], ...] = (
    errors.InvalidJson,
    errors.PayloadTooLarge,
    errors.UnsupportedMediaType,
    errors.InvalidRequest,
    errors.TooManyTexts,
    errors.Overloaded,
    errors.DeadlineExceeded,
    errors.InternalError,
    errors.NotReady,
)
# werkzeug's own HTTP errors (raised before our code runs) mapped onto our types.
_HTTP_STATUS_TO_ERROR: dict[int, type[errors.ApiError]] = {
    400: errors.InvalidJson,
    404: errors.NotFound,
    405: errors.MethodNotAllowed,
    413: errors.PayloadTooLarge,
    415: errors.UnsupportedMediaType,
}


@dataclass(frozen=True)
class _Route:
    operation: openapi.Operation
    handler: Handler


class Service:
    """One function's HTTP surface.

    Args:
        function: The capability's name, e.g. ``"sentiment"``.
        settings: The process's settings.
        model: The loaded model; health reports its identity.
        cache: The prediction cache handlers use; health reports its state and counters.
        batcher: The model's batching queue handlers send texts through.
        description: One paragraph for the OpenAPI document.
        version: The API document's version.
    """

    def __init__(
        self,
        *,
        function: str,
        settings: Settings,
        model: TextClassifier | TextEncoder,
        cache: PredictionCache,
        batcher: DynamicBatcher[Any],
        description: str,
        version: str = "1.0.0",
    ) -> None:
        self.function = function
        self.settings = settings
        self.model = model
        self.cache = cache
        self.batcher = batcher
        self._description = description
        self._version = version
        self._routes: dict[str, dict[str, _Route]] = {}
        self._openapi: dict[str, Any] | None = None
        self._add(
            openapi.Operation(
                method="GET",
                path="/v1/health",
                summary="Readiness: 200 once the model is loaded and warmed up.",
                response_schema=openapi.ref("Health"),
                errors=(errors.NotReady,),
            ),
            self._health,
        )
        self._add(
            openapi.Operation(
                method="GET",
                path="/openapi.json",
                summary="This document.",
                response_schema={"type": "object"},
            ),
            lambda _body: self.openapi(),
        )

    def post(
        self,
        path: str,
        *,
        summary: str,
        request_schema: dict[str, Any],
        response_schema: dict[str, Any],
        request_example: Any = None,
    ) -> Callable[[Handler], Handler]:
        """Register ``handler(body) -> dict`` for ``POST path``."""

        def register(handler: Handler) -> Handler:
            self._add(
                openapi.Operation(
                    method="POST",
                    path=path,
                    summary=summary,
                    request_schema=request_schema,
                    response_schema=response_schema,
                    request_example=request_example,
                    errors=_POST_ERRORS,
                ),
                handler,
            )
            return handler

        return register

    def _add(self, operation: openapi.Operation, handler: Handler) -> None:
        self._routes.setdefault(operation.path, {})[operation.method] = _Route(operation, handler)
        self._openapi = None

    def openapi(self) -> dict[str, Any]:
        if self._openapi is None:
            self._openapi = openapi.document(
                title=f"{self.function} function",
                version=self._version,
                description=self._description,
                operations=[r.operation for m in self._routes.values() for r in m.values()],
            )
        return self._openapi

    def _health(self, _body: Any) -> dict[str, Any]:
        if not self.model.ready:
            raise errors.NotReady("the model is still loading")
        return {
            "status": "ok",
            "function": self.function,
            "model": self.model.identity.to_json(),
            "kind": self.model.kind,
            "labels": self.model.labels,
            "cache": self.cache.describe(),
            "batching": {"queued": self.batcher.queued, **dataclasses.asdict(self.batcher.stats)},
        }

    def attach(self, app: flask.Flask) -> None:
        """Make the hosting Flask app answer its own errors in JSON.

        functions-framework creates the app and imports the function's module inside its app
        context, so start-up calls this with ``flask.current_app``. Without it, the errors the
        framework raises itself (404 on ``/robots.txt``) would be HTML.
        """
        app.register_error_handler(HTTPException, self._http_exception)

    def _http_exception(self, exc: HTTPException) -> flask.Response:
        kind = _HTTP_STATUS_TO_ERROR.get(exc.code or 500, errors.InternalError)
        message = exc.description or kind.description
        if kind is errors.PayloadTooLarge:
            message = (
                f"body is over the limit of {self.settings.max_body_bytes} bytes (MAX_BODY_BYTES)"
            )
        return self._error_response(kind(message))

    def __call__(self, request: flask.Request) -> flask.Response:
        """The functions-framework entry point's whole body: route, run, render, log."""
        started = time.perf_counter()
        token = logs.set_trace(
            logs.parse_trace(
                request.headers.get("traceparent"), request.headers.get("X-Cloud-Trace-Context")
            )
        )
        error: errors.ApiError | None = None
        try:
            try:
                response = self._dispatch(request)
            except errors.ApiError as exc:
                error = exc
                response = self._error_response(exc)
            except Exception:
                log.exception("unhandled error serving %s %s", request.method, request.path)
                error = errors.InternalError("internal error; the server log has the details")
                response = self._error_response(error)
            seconds = time.perf_counter() - started
            # Time spent in the function, for clients and benchmarks (W3C Server-Timing).
            response.headers["Server-Timing"] = f"app;dur={1000 * seconds:.3f}"
            self._log_request(request, response, seconds, error)
            return response
        finally:
            logs.reset_trace(token)

    def _dispatch(self, request: flask.Request) -> flask.Response:
        path = request.path.rstrip("/") or "/"
        methods = self._routes.get(path)
        if methods is None:
            raise errors.NotFound(f"no endpoint at {request.path}; see GET /openapi.json")
        method = "GET" if request.method == "HEAD" else request.method
        route = methods.get(method)
        if route is None:
            allowed = sorted(methods) + (["HEAD"] if "GET" in methods else [])
            raise errors.MethodNotAllowed(
                f"{request.method} is not allowed on {path}; use {', '.join(allowed)}",
                headers={"Allow": ", ".join(allowed)},
            )
        body = (
            read_json(request, max_bytes=self.settings.max_body_bytes) if method == "POST" else None
        )
        if method == "POST" and self.settings.log_request_text:
            log.debug("request body", extra={"fields": {"body": body}})
        return _json_response(route.handler(body), 200)

    def _error_response(self, exc: errors.ApiError) -> flask.Response:
        response = _json_response(exc.body(), exc.status)
        response.headers.update(exc.headers)
        return response

    def _log_request(
        self,
        request: flask.Request,
        response: flask.Response,
        seconds: float,
        error: errors.ApiError | None,
    ) -> None:
        fields: dict[str, Any] = {
            "httpRequest": {
                "requestMethod": request.method,
                "requestUrl": request.url,
                "status": response.status_code,
                "responseSize": str(response.calculate_content_length() or 0),
                "userAgent": request.user_agent.string,
                "remoteIp": request.remote_addr,
                "latency": f"{seconds:.6f}s",
            },
            "function": self.function,
        }
        if request.content_length is not None:
            fields["httpRequest"]["requestSize"] = str(request.content_length)
        if error is not None:
            fields["error_type"] = error.type
        level = logging.ERROR if response.status_code >= 500 else logging.INFO
        log.log(
            level,
            "%s %s %d",
            request.method,
            request.path,
            response.status_code,
            extra={"fields": fields},
        )


def _json_response(payload: dict[str, Any], status: int) -> flask.Response:
    return flask.Response(
        json.dumps(payload, ensure_ascii=False, separators=(",", ":")) + "\n",
        status=status,
        mimetype="application/json",
    )
