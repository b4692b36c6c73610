"""A small Python client for the deployed functions (one file, copy it into your project).

It calls a function's HTTP endpoints with the caller's Google ID token, as Cloud Run requires for
a private service, sends any number of texts in requests of at most the server's
``MAX_BATCH_TEXTS``, waits and retries when the function answers 429 (``overloaded``,
``rate_limited``) or 503 (``deadline_exceeded``, ``not_ready``) for the ``Retry-After`` it
names, a bounded number of times, and raises :class:`AifnError` with the function's JSON error
(``{"error": {"type", "message", "status"}}``) for everything else::

    from aifn_client import Client

    sentiment = Client("https://aifn-sentiment-abc123-ew.a.run.app")
    for result in sentiment.sentiment(["I love it", "Late again."]):
        print(result["label"], result["score"])

    classify = Client("https://aifn-classify-abc123-ew.a.run.app")
    classify.classify(["The match ended 2-1"], labels=["sport", "politics"])

Authentication: by default the ID token comes from google-auth's
``google.oauth2.id_token.fetch_id_token_credentials`` with the function URL as audience, which
works with a service account key (``GOOGLE_APPLICATION_CREDENTIALS``) or on Google Cloud (the
metadata server), and refreshes the token before it expires. A user account logged in with
``gcloud auth login`` cannot mint ID tokens through google-auth; use
``token_provider=gcloud_identity_token`` (``gcloud auth print-identity-token``) instead. Pass
``token_provider=None`` for a local ``make serve`` or a public service, and ``api_key=`` when the
function runs in API-key mode (header ``X-API-Key``).

Dependencies: the standard library, plus ``google-auth`` (with ``requests``) for the default
token provider only.
"""

from __future__ import annotations

import email.utils
import json
import random
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any, Literal

__all__ = [
    "AifnError",
    "Client",
    "GoogleIdTokens",
    "TokenProvider",
    "gcloud_identity_token",
]

#: Returns the bearer token for an audience (the function's URL), or ``None`` for no token.
TokenProvider = Callable[[str], "str | None"]

API_KEY_HEADER = "X-API-Key"
#: What the functions accept per request unless the server says otherwise (MAX_BATCH_TEXTS).
DEFAULT_MAX_BATCH_TEXTS = 64
RETRY_STATUSES = frozenset({429, 503})


class AifnError(Exception):
    """The function (or Cloud Run in front of it) refused a request.

    Attributes:
        status: The HTTP status.
        type: The function's error type (``invalid_request``, ``overloaded``...), or
            ``"http_error"`` when the body was not the function's JSON error (Cloud Run's own
            403 for a missing invoker role, for example).
        message: The error's message (or the start of a non-JSON body).
        retry_after: Seconds the server asked to wait, if it said.
        attempts: Requests made, retries included.
    """

    def __init__(
        self,
        status: int,
        type: str,
        message: str,
        *,
        retry_after: float | None = None,
        attempts: int = 1,
    ) -> None:
        super().__init__(f"{status} {type}: {message}")
        self.status = status
        self.type = type
        self.message = message
        self.retry_after = retry_after
        self.attempts = attempts


class GoogleIdTokens:
    """ID tokens from google-auth's environment lookup, one credential per audience, refreshed
    by google-auth when expired.

    Raises ``google.auth.exceptions.DefaultCredentialsError`` when the environment has neither a
    service account key nor a metadata server.
    """

    def __init__(self) -> None:
        self._credentials: dict[str, Any] = {}
        self._lock = threading.Lock()

    def __call__(self, audience: str) -> str:
        import google.auth.transport.requests
        import google.oauth2.id_token

        with self._lock:
            request = google.auth.transport.requests.Request()
            credentials = self._credentials.get(audience)
            if credentials is None:
                credentials = google.oauth2.id_token.fetch_id_token_credentials(  # type: ignore[no-untyped-call]
                    audience, request=request
                )
                self._credentials[audience] = credentials
            if not credentials.valid:
                credentials.refresh(request)
            return str(credentials.token)


def gcloud_identity_token(audience: str) -> str:
    """The logged-in gcloud account's ID token (``gcloud auth print-identity-token``).

    Cloud Run accepts it for a user account holding ``roles/run.invoker``. The token is not
    cached: each call runs gcloud (about a second).
    """
    gcloud = shutil.which("gcloud")
    if gcloud is None:
        raise RuntimeError("gcloud is not on PATH; install the Google Cloud CLI")
    out = subprocess.run(
        [gcloud, "auth", "print-identity-token"], check=True, capture_output=True, text=True
    )
    return out.stdout.strip()


class Client:
    """One deployed function.

    Args:
        url: The function's base URL (the Cloud Run service URL, or ``http://127.0.0.1:8080``).
        token_provider: Called with ``audience`` for the bearer token. ``"google"`` (the
            default): a :class:`GoogleIdTokens`. ``None``: send no ``Authorization`` header.
        audience: The ID token's audience; default ``url`` (what Cloud Run expects unless the
            service sets custom audiences).
        api_key: Sent as ``X-API-Key`` when the function is in API-key mode.
        timeout: Seconds per HTTP request.
        max_retries: Retries after a 429 or 503 (or a connection failure) before giving up;
            ``0``: never retry.
        backoff: First wait when the server names no ``Retry-After``; doubles per retry,
            with jitter.
        max_wait: The longest single wait, whatever ``Retry-After`` says.
        max_batch_texts: Texts per request; default: the server's ``MAX_BATCH_TEXTS``, read once
            from its ``/openapi.json`` (64 if that cannot be read).
        sleep: How to wait (tests and async wrappers may replace it).
    """

    def __init__(
        self,
        url: str,
        *,
        token_provider: TokenProvider | Literal["google"] | None = "google",  # noqa: S107
        audience: str | None = None,
        api_key: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 5,
        backoff: float = 0.5,
        max_wait: float = 30.0,
        max_batch_texts: int | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if max_batch_texts is not None and max_batch_texts < 1:
            raise ValueError("max_batch_texts must be >= 1")
        if not url.startswith(("https://", "http://")):
            raise ValueError(f"url must start with https:// or http://, not {url!r}")
        self.url = url.rstrip("/")
        self.audience = audience or self.url
        self.token_provider: TokenProvider | None = (
            GoogleIdTokens() if token_provider == "google" else token_provider  # noqa: S105
        )
        self.api_key = api_key
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_wait = max_wait
        self._max_batch_texts = max_batch_texts
        self._sleep = sleep
        #: Requests sent and retries made, for callers who want to see the backpressure.
        self.requests = 0
        self.retries = 0

    # endpoints

    def health(self) -> dict[str, Any]:
        """``GET /v1/health``: the model's identity, labels and counters (503 while loading)."""
        return self.request("GET", "/v1/health")

    def sentiment(self, texts: str | Sequence[str]) -> list[dict[str, Any]]:
        """``POST /v1/analyze/sentiment``: one result per text, in input order.

        A single string is sent as ``{"text": ...}``; a list as ``{"texts": [...]}`` in
        requests of at most ``max_batch_texts``.
        """
        return self._predict("/v1/analyze/sentiment", texts, {})

    def classify(
        self,
        texts: str | Sequence[str],
        labels: Sequence[str] | None = None,
        **options: Any,
    ) -> list[dict[str, Any]]:
        """``POST /v1/classify``: one result per text, in input order.

        Args:
            texts: One text or a list.
            labels: The labels to score (required by the zero-shot model).
            **options: Further request fields, sent with every chunk: ``descriptions``,
                ``multi_label``, ``template``.
        """
        fields = dict(options)
        if labels is not None:
            fields["labels"] = list(labels)
        return self._predict("/v1/classify", texts, fields)

    @property
    def max_batch_texts(self) -> int:
        """Texts per request: as given, else the server's ``MAX_BATCH_TEXTS`` (from its
        OpenAPI document's ``TextList.maxItems``)."""
        if self._max_batch_texts is None:
            limit = DEFAULT_MAX_BATCH_TEXTS
            try:
                doc = self.request("GET", "/openapi.json")
                found = doc["components"]["schemas"]["TextList"]["maxItems"]
                if isinstance(found, int) and found > 0:
                    limit = found
            except (AifnError, KeyError, TypeError):
                pass
            self._max_batch_texts = limit
        return self._max_batch_texts

    def _predict(
        self, path: str, texts: str | Sequence[str], fields: dict[str, Any]
    ) -> list[dict[str, Any]]:
        if isinstance(texts, str):
            return list(self.request("POST", path, {"text": texts, **fields})["results"])
        texts = list(texts)
        results: list[dict[str, Any]] = []
        size = self.max_batch_texts
        for start in range(0, len(texts), size):
            chunk = texts[start : start + size]
            results.extend(self.request("POST", path, {"texts": chunk, **fields})["results"])
        return results

    # transport

    def request(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        """One call, retried on 429/503 and connection failures; the decoded JSON answer.

        Raises:
            AifnError: Any other error status, or the last 429/503 once retries are spent.
        """
        data = None if body is None else json.dumps(body).encode("utf-8")
        attempt = 0
        while True:
            attempt += 1
            self.requests += 1
            try:
                return self._send(method, path, data)
            except AifnError as exc:
                exc.attempts = attempt
                retryable = exc.status in RETRY_STATUSES or exc.type == "connection_error"
                if not retryable or attempt > self.max_retries:
                    raise
                wait = self._wait(exc.retry_after, attempt)
            self.retries += 1
            self._sleep(wait)

    def _wait(self, retry_after: float | None, attempt: int) -> float:
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_wait)
        # Exponential backoff with full jitter when the server names no time.
        return random.uniform(0, min(self.backoff * 2 ** (attempt - 1), self.max_wait))

    def _send(self, method: str, path: str, data: bytes | None) -> dict[str, Any]:
        # The scheme is http(s), checked in __init__.
        request = urllib.request.Request(self.url + path, data=data, method=method)  # noqa: S310
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.token_provider is not None:
            token = self.token_provider(self.audience)
            if token:
                request.add_header("Authorization", f"Bearer {token}")
        if self.api_key is not None:
            request.add_header(API_KEY_HEADER, self.api_key)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310
                payload = json.loads(response.read())
        except urllib.error.HTTPError as err:
            raise _error(err.code, err.read(), err.headers.get("Retry-After")) from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
            reason = getattr(err, "reason", err)
            raise AifnError(0, "connection_error", f"{self.url}: {reason}") from err
        if not isinstance(payload, dict):
            raise AifnError(200, "http_error", "the answer is not a JSON object")
        return payload


def _error(status: int, raw: bytes, retry_after: str | None) -> AifnError:
    """The function's JSON error as an exception (or the start of whatever else came back)."""
    wait = _retry_after(retry_after)
    try:
        error = json.loads(raw)["error"]
        return AifnError(
            int(error.get("status", status)),
            str(error["type"]),
            str(error["message"]),
            retry_after=wait,
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        text = raw.decode("utf-8", "replace").strip()
        return AifnError(status, "http_error", text[:300] or "(empty body)", retry_after=wait)


def _retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds: delta-seconds or an HTTP date (RFC 9110, 10.2.3)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
