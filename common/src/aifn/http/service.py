"""The HTTP layer shared by every function: routing, errors, health, OpenAPI, request logs.

functions-framework hands every path and method to one entry point; :class:`Service` routes
them. A capability registers its endpoints with :meth:`Service.post`; the service supplies
``GET /v1/health``, ``GET /openapi.json`` and (unless ``METRICS=off``) ``GET /metrics``.
Handlers receive the decoded JSON body and return a JSON-able dict; anything else they raise
becomes a JSON error (see :mod:`aifn.http.errors`). This layer never touches tensors.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import flask
from werkzeug.exceptions import HTTPException

from aifn import logs
from aifn.core.cache import caller_scope
from aifn.core.limits import count_texts
from aifn.core.predictor import Predictor
from aifn.http import auth, errors, openapi
from aifn.http.body import read_json
from aifn.http.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from aifn.http.metrics import UNMATCHED, Metrics
from aifn.settings import Settings

log = logging.getLogger("aifn.request")

Handler = Callable[[Any], dict[str, Any]]
# The service's own routes may answer with a ready response (``/metrics`` is text, not JSON).
_AnyHandler = Callable[[Any], "dict[str, Any] | flask.Response"]

_POST_ERRORS: tuple[type[errors.Error], ...] = (
    errors.InvalidJson,
    errors.PayloadTooLarge,
    errors.UnsupportedMediaType,
    errors.InvalidRequest,
    errors.TooManyTexts,
    errors.TooManyTokens,
    errors.Overloaded,
    errors.DeadlineExceeded,
    errors.InternalError,
    errors.NotReady,
)
# werkzeug's own HTTP errors (raised before our code runs) mapped onto our types.
_HTTP_STATUS_TO_ERROR: dict[int, type[errors.Error]] = {
    400: errors.InvalidJson,
    404: errors.NotFound,
    405: errors.MethodNotAllowed,
    413: errors.PayloadTooLarge,
    415: errors.UnsupportedMediaType,
}


# A route's parser: the decoded body -> the validated request its handler and work counter get
# (raising the request's 4xx).
Parser = Callable[[Any], Any]
# Units of work a request asks for, from its parsed request (see Service.work_units).
WorkCounter = Callable[[Any], int]


@dataclass(frozen=True)
class _Route:
    operation: openapi.Operation
    handler: _AnyHandler
    work: WorkCounter | None = None
    parse: Parser | None = None


class Service:
    """One function's HTTP surface.

    Args:
        function: The capability's name, e.g. ``"sentiment"``.
        settings: The process's settings.
        predictor: The model behind its cache and batcher, which handlers predict with; health
            reports its identity, cache and queue.
        guard: API keys and rate limits for the ``post()`` routes; from the settings when omitted.
        metrics: Where requests are counted, served at ``GET /metrics``; ``None``: no metrics.
        description: One paragraph for the OpenAPI document.
        version: The API document's version.
    """

    def __init__(
        self,
        *,
        function: str,
        settings: Settings,
        predictor: Predictor,
        description: str,
        version: str = "1.0.0",
        guard: auth.Guard | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.function = function
        self.settings = settings
        self.predictor = predictor
        self.guard = guard or auth.Guard.from_settings(settings, function=function)
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
        self.metrics = metrics
        if metrics is not None:
            # A GET, so neither API keys nor rate limits apply (they guard the post() routes):
            # like health, it is protected by Cloud Run IAM and ingress.
            self._add(
                openapi.Operation(
                    method="GET",
                    path="/metrics",
                    summary="Prometheus metrics of this instance, in the text exposition format.",
                    response_schema={"type": "string"},
                    response_media_type="text/plain",
                ),
                lambda _body: flask.Response(
                    metrics.render(), status=200, content_type=METRICS_CONTENT_TYPE
                ),
            )

    def post(
        self,
        path: str,
        *,
        summary: str,
        request_schema: dict[str, Any],
        response_schema: dict[str, Any],
        request_example: Any = None,
        parse: Parser | None = None,
        work: WorkCounter | None = None,
    ) -> Callable[[Handler], Handler]:
        """Register ``handler(request) -> dict`` for ``POST path``.

        ``parse(body)`` validates the decoded body once; the handler and ``work`` get what it
        returns (by default the body itself). ``work(request)`` counts the units of work it asks
        for (:meth:`work_units`); by default its texts.
        """

        def register(handler: Handler) -> Handler:
            self._add(
                openapi.Operation(
                    method="POST",
                    path=path,
                    summary=summary,
                    request_schema=request_schema,
                    response_schema=response_schema,
                    request_example=request_example,
                    errors=_POST_ERRORS + self.guard.errors,
                ),
                handler,
                work,
                parse,
            )
            return handler

        return register

    def _add(
        self,
        operation: openapi.Operation,
        handler: _AnyHandler,
        work: WorkCounter | None = None,
        parse: Parser | None = None,
    ) -> None:
        self._routes.setdefault(operation.path, {})[operation.method] = _Route(
            operation, handler, work, parse
        )
        self._openapi = None

    def work_units(self, path: str, body: Any) -> int:
        """Units of work ``POST path`` with the decoded ``body`` asks of the model, at least 1.

        A text is a unit, and on zero-shot classify so is each label prompt not in the label
        cache (each is one more forward pass). What the rate limit charges. Never raises: a body
        its handler will refuse counts 1.
        """
        route = self._routes.get(path.rstrip("/") or "/", {}).get("POST")
        if route is None:
            return 1
        try:
            return self._units(route, route.parse(body) if route.parse is not None else body)
        except Exception:  # a malformed body: the route refuses it with a 4xx
            return 1

    def _units(self, route: _Route, request: Any) -> int:
        if route.work is not None:
            return max(1, route.work(request))
        return count_texts(request, self.settings.max_batch_texts)

    def openapi(self) -> dict[str, Any]:
        if self._openapi is None:
            self._openapi = openapi.document(
                title=f"{self.function} function",
                version=self._version,
                description=self._description,
                operations=[r.operation for m in self._routes.values() for r in m.values()],
                max_texts=self.settings.max_batch_texts,
            )
        return self._openapi

    def _health(self, _body: Any) -> dict[str, Any]:
        model, cache, batcher = self.predictor.model, self.predictor.cache, self.predictor.batcher
        if not model.ready:
            raise errors.NotReady("the model is still loading")
        health = {
            "status": "ok",
            "function": self.function,
            "model": model.identity.to_json(),
            "kind": model.kind,
            "labels": model.labels,
            "cache": cache.describe(),
            "batching": {"queued": batcher.queued, **dataclasses.asdict(batcher.stats)},
        }
        if self.guard.limiter is not None:
            health["rate_limit"] = self.guard.limiter.describe()
        return health

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
        # parse_trace is total: whatever a client writes in a trace header, the request is served.
        token = logs.set_trace(
            logs.parse_trace(
                request.headers.get("traceparent"), request.headers.get("X-Cloud-Trace-Context")
            )
        )
        error: errors.Error | None = None
        path = request.path.rstrip("/") or "/"
        try:
            try:
                response, error = self._dispatch(request, path)
            except errors.Error as exc:
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
            if self.metrics is not None:
                self.metrics.observe_request(
                    # The registered path, or a fixed label: metrics labels stay bounded.
                    route=path if path in self._routes else UNMATCHED,
                    method=request.method,
                    status=response.status_code,
                    seconds=seconds,
                    error_type=error.type if error is not None else None,
                )
            return response
        finally:
            logs.reset_trace(token)

    def _dispatch(
        self, request: flask.Request, path: str
    ) -> tuple[flask.Response, errors.Error | None]:
        """Route ``request`` (its ``path`` without a trailing slash) and run its handler.

        Returns the response, and the error it reports once the caller was admitted (with the
        caller's budget headers); errors before that are raised.
        """
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
        # API key and one unit of rate limit first: a refused request costs no body read. The
        # rest of its work (work_units) is charged once the body is read; both run in the
        # caller's cache scope (CACHE_SCOPE=caller: it only hits entries it wrote).
        caller = self.guard.admit(request) if method == "POST" else None
        limit_headers = dict(caller.headers) if caller is not None else {}
        try:
            body = None
            if method == "POST":
                body = read_json(request, max_bytes=self.settings.max_body_bytes)
                if self.settings.log_request_text:
                    log.debug("request body", extra={"fields": {"body": body}})
            with caller_scope(caller.scope) if caller is not None else nullcontext():
                # Parsed once: a body it refuses was charged its one unit at admission.
                parsed = route.parse(body) if route.parse is not None else body
                if caller is not None:
                    limit_headers = self.guard.charge(caller, self._units(route, parsed))
                result = route.handler(parsed)
            if not isinstance(result, flask.Response):
                _note_results(request, result)
                result = _json_response(result, 200)
            response = result
        except errors.Error as exc:
            # The caller's budget headers go on its errors too (the error's own win).
            return self._error_response(exc, limit_headers), exc
        response.headers.update(limit_headers)
        return response, None

    def _error_response(
        self, exc: errors.Error, extra_headers: dict[str, str] | None = None
    ) -> flask.Response:
        """The one place an error becomes HTTP: its status, JSON body and headers."""
        response = _json_response(errors.body(exc), errors.status(exc))
        response.headers.update({**(extra_headers or {}), **errors.headers(exc)})
        return response

    def _log_request(
        self,
        request: flask.Request,
        response: flask.Response,
        seconds: float,
        error: errors.Error | None,
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
        if auth.KEY_ID_ENVIRON in request.environ:  # the key's id, never the key
            fields["api_key_id"] = request.environ[auth.KEY_ID_ENVIRON]
        if _TEXTS_ENVIRON in request.environ:  # counts only, never the texts
            fields["texts"] = request.environ[_TEXTS_ENVIRON]
            fields["cached"] = request.environ[_CACHED_ENVIRON]
        level = logging.ERROR if response.status_code >= 500 else logging.INFO
        log.log(
            level,
            "%s %s %d",
            request.method,
            request.path,
            response.status_code,
            extra={"fields": fields},
        )


# A prediction's texts and how many the cache answered, for the request log line: what the
# deployment's dashboard charts as the prediction-cache hit ratio (infra/terraform/monitoring.tf).
_TEXTS_ENVIRON = "aifn.texts"
_CACHED_ENVIRON = "aifn.cached"


def _note_results(request: flask.Request, payload: dict[str, Any]) -> None:
    results = payload.get("results")
    if isinstance(results, list):
        request.environ[_TEXTS_ENVIRON] = len(results)
        request.environ[_CACHED_ENVIRON] = sum(
            1 for r in results if isinstance(r, dict) and r.get("cached") is True
        )


def _json_response(payload: dict[str, Any], status: int) -> flask.Response:
    return flask.Response(
        json.dumps(payload, ensure_ascii=False, separators=(",", ":")) + "\n",
        status=status,
        mimetype="application/json",
    )
