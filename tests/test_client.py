"""The Python client (clients/python/aifn_client.py) against real function processes.

Each server is ``functions-framework`` serving the prepared sentiment model, started with the
settings that make the behaviour under test happen for real: a small ``MAX_BATCH_TEXTS`` (the
client must split), a rate limit per caller (a real 429 ``rate_limited`` with ``Retry-After``;
with ``IAM_REQUIRED=true`` the caller is the ID token's principal, which shows the token arrived),
and a queue of one text (real 429 ``overloaded`` under concurrent load). Google's token endpoint
cannot be reached here: the default google-auth path runs against a local stand-in token
endpoint named by a real service-account key file.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import pytest

from .helpers import REPO, Server, start_server

pytestmark = pytest.mark.integration

CLIENT_PATH = REPO / "clients" / "python" / "aifn_client.py"
API_KEY = "client-test-key-0123456789abcdef"
TEXTS = [
    "I love this product!",
    "The delivery was late again.",
    "It is a chair.",
    "Absolutely wonderful service, thank you.",
    "Terrible. Never again.",
    "The package arrived on Tuesday.",
    "Best purchase this year.",
]


@pytest.fixture(scope="module")
def aifn_client() -> ModuleType:
    """The client module as a user gets it: one file, loaded from its path."""
    spec = importlib.util.spec_from_file_location("aifn_client", CLIENT_PATH)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["aifn_client"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def functions(
    sentiment_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Server]]:
    """Three real functions, started together (each loads the model once)."""

    def start(name: str, **env: str) -> Server:
        tmp = tmp_path_factory.mktemp(f"client-{name}")
        return start_server(sentiment_model_dir, tmp, THREADS="16", **env)

    started: dict[str, Server] = {}
    try:
        started["small_batches"] = start("small", MAX_BATCH_TEXTS="3", API_KEYS=API_KEY)
        started["rate_limited"] = start("rate", RATE_LIMIT="1/2s", IAM_REQUIRED="true")
        started["tiny_queue"] = start(
            "queue",
            MAX_QUEUED_TEXTS="1",
            MODEL_WORKERS="1",
            INFERENCE_BATCH_SIZE="1",
            CACHE_MAX_ENTRIES="0",
        )
        yield started
    finally:
        for function in started.values():
            if function.proc.poll() is None:
                function.proc.kill()
                function.proc.wait()


def _jwt(claims: dict[str, Any]) -> str:
    """An unsigned token shaped like Google's ID tokens (Cloud Run verifies them, not the
    function, which only reads the principal)."""

    def part(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'RS256', 'typ': 'JWT'})}.{part(claims)}.c2ln"


def _claims(token: str) -> dict[str, Any]:
    body = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))))


class Sleeps:
    """Records each wait the client asks for, and really waits."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        time.sleep(seconds)


def test_batches_are_split_to_the_servers_limit_and_answered_in_order(
    aifn_client: ModuleType, functions: dict[str, Server]
) -> None:
    url = functions["small_batches"].url
    client = aifn_client.Client(url, token_provider=None, api_key=API_KEY)
    # Sent whole, 7 texts are over this server's MAX_BATCH_TEXTS=3.
    with pytest.raises(aifn_client.AifnError) as refused:
        client.request("POST", "/v1/analyze/sentiment", {"texts": TEXTS})
    assert (refused.value.status, refused.value.type) == (422, "too_many_texts")

    client = aifn_client.Client(url, token_provider=None, api_key=API_KEY)
    results = client.sentiment(TEXTS)
    assert client.max_batch_texts == 3  # learnt from the server's /openapi.json
    assert client.requests == 1 + 3  # the document, then 3 + 3 + 1 texts
    singles = [client.sentiment(text)[0] for text in TEXTS]
    assert [r["label"] for r in results] == [r["label"] for r in singles]
    assert [r["label"] for r in results][:2] == ["POSITIVE", "NEGATIVE"]


def test_an_invalid_request_raises_the_functions_error_at_once(
    aifn_client: ModuleType, functions: dict[str, Server]
) -> None:
    client = aifn_client.Client(
        functions["small_batches"].url, token_provider=None, api_key=API_KEY
    )
    with pytest.raises(aifn_client.AifnError) as caught:
        client.sentiment(["fine", "   "])
    err = caught.value
    assert (err.status, err.type, err.attempts) == (422, "invalid_request", 1)
    assert "texts[1]" in err.message
    assert client.retries == 0
    with pytest.raises(aifn_client.AifnError) as missing:
        client.request("GET", "/v1/nothing-here")
    assert (missing.value.status, missing.value.type) == (404, "not_found")


def test_the_api_key_goes_in_its_header(
    aifn_client: ModuleType, functions: dict[str, Server]
) -> None:
    url = functions["small_batches"].url
    for key in (None, "not-the-key-but-long-enough"):
        client = aifn_client.Client(url, token_provider=None, api_key=key)
        with pytest.raises(aifn_client.AifnError) as caught:
            client.sentiment("hello")
        assert (caught.value.status, caught.value.type, caught.value.attempts) == (
            401,
            "unauthorized",
            1,
        )
    client = aifn_client.Client(url, token_provider=None, api_key=API_KEY)
    assert client.sentiment("hello")[0]["label"] in {"POSITIVE", "NEUTRAL", "NEGATIVE"}


def test_a_rate_limited_call_waits_for_retry_after_and_succeeds(
    aifn_client: ModuleType, functions: dict[str, Server]
) -> None:
    url = functions["rate_limited"].url
    sleeps = Sleeps()
    token = _jwt({"sub": "1001", "email": "retry@example.com", "aud": url})
    client = aifn_client.Client(url, token_provider=lambda _aud: token, sleep=sleeps)
    first = client.sentiment("I love this product!")
    started = time.monotonic()
    second = client.sentiment("I love this product!")  # the bucket (1 per 2 s) is empty
    assert first[0]["label"] == second[0]["label"] == "POSITIVE"
    assert client.retries >= 1
    assert sleeps.waits
    assert all(w == pytest.approx(2, abs=1) for w in sleeps.waits)
    assert time.monotonic() - started >= 1


def test_retries_are_bounded_and_end_in_the_servers_429(
    aifn_client: ModuleType, functions: dict[str, Server]
) -> None:
    url = functions["rate_limited"].url
    token = _jwt({"sub": "1002", "email": "bounded@example.com", "aud": url})
    sleeps = Sleeps()
    client = aifn_client.Client(
        url, token_provider=lambda _aud: token, max_retries=1, max_wait=0.05, sleep=sleeps
    )
    client.sentiment("one")
    with pytest.raises(aifn_client.AifnError) as caught:
        client.sentiment("two")  # waits at most 0.05 s, once: the bucket is still empty
    err = caught.value
    assert (err.status, err.type, err.attempts) == (429, "rate_limited", 2)
    assert err.retry_after is not None
    assert err.retry_after >= 1
    assert sleeps.waits == [0.05]


def test_the_token_providers_token_reaches_the_function_per_caller(
    aifn_client: ModuleType, functions: dict[str, Server]
) -> None:
    url = functions["rate_limited"].url
    audiences: list[str] = []

    def provider(sub: str) -> Any:
        def token(audience: str) -> str:
            audiences.append(audience)
            return _jwt({"sub": sub, "aud": audience})

        return token

    alice = aifn_client.Client(url, token_provider=provider("2001"), max_retries=0)
    bob = aifn_client.Client(url, token_provider=provider("2002"), max_retries=0)
    alice.sentiment("hello")
    # The function counts the budget per ID-token principal: Bob's is untouched by Alice's.
    bob.sentiment("hello")
    with pytest.raises(aifn_client.AifnError) as caught:
        alice.sentiment("hello again")
    assert caught.value.type == "rate_limited"
    assert set(audiences) == {url}


class _TokenEndpoint(BaseHTTPRequestHandler):
    """Google's OAuth token endpoint as google-auth's service-account ID-token flow uses it:
    a JWT-bearer grant in, ``{"id_token": ...}`` out."""

    grants: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        form = urllib.parse.parse_qs(self.rfile.read(int(self.headers["Content-Length"])).decode())
        assertion = _claims(form["assertion"][0])
        type(self).grants.append({"grant_type": form["grant_type"][0], **assertion})
        token = _jwt(
            {
                "aud": assertion["target_audience"],
                "sub": "3001",
                "email": assertion["iss"],
                "iat": int(time.time()),
                "exp": int(time.time()) + 3600,
            }
        )
        body = json.dumps({"id_token": token}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_the_default_provider_gets_an_id_token_for_the_url_through_google_auth(
    aifn_client: ModuleType, functions: dict[str, Server], tmp_path: Path
) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    endpoint = ThreadingHTTPServer(("127.0.0.1", 0), _TokenEndpoint)
    threading.Thread(target=endpoint.serve_forever, daemon=True).start()
    try:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        account = "caller@test-project.iam.gserviceaccount.com"
        key_file = tmp_path / "key.json"
        key_file.write_text(
            json.dumps(
                {
                    "type": "service_account",
                    "project_id": "test-project",
                    "private_key_id": "k1",
                    "private_key": pem,
                    "client_email": account,
                    "client_id": "1",
                    "token_uri": f"http://127.0.0.1:{endpoint.server_port}/token",
                }
            )
        )
        os.environ["GOOGLE_APPLICATION_CREDENTIALS"] = str(key_file)
        url = functions["rate_limited"].url
        client = aifn_client.Client(url, max_retries=0)  # the default: google-auth
        assert client.sentiment("Works with a real key.")[0]["label"] in {
            "POSITIVE",
            "NEUTRAL",
            "NEGATIVE",
        }
        with pytest.raises(aifn_client.AifnError) as caught:
            client.sentiment("again")  # the function saw the service account as the caller
        assert caught.value.type == "rate_limited"
        # One grant, for the function's URL, signed by the key; the token was reused.
        assert len(_TokenEndpoint.grants) == 1
        grant = _TokenEndpoint.grants[0]
        assert grant["grant_type"] == "urn:ietf:params:oauth:grant-type:jwt-bearer"
        assert grant["target_audience"] == url
        assert grant["iss"] == account
    finally:
        endpoint.shutdown()
        endpoint.server_close()


def test_without_credentials_the_default_provider_says_so_before_sending(
    aifn_client: ModuleType, tmp_path: Path
) -> None:
    import google.auth.exceptions

    os.environ["GOOGLE_APPLICATION_CREDENTIALS"] = str(tmp_path / "missing.json")
    client = aifn_client.Client("https://aifn-sentiment-abc-ew.a.run.app")
    with pytest.raises(google.auth.exceptions.DefaultCredentialsError):
        client.sentiment("never sent")
    assert client.requests == 1
    assert client.retries == 0


def test_overloaded_answers_are_retried_until_every_text_is_answered(
    aifn_client: ModuleType, functions: dict[str, Server]
) -> None:
    url = functions["tiny_queue"].url
    long_text = "The service was fine but the delivery took far too long this time. " * 12
    batches = [[f"{i}: {long_text}", f"{i}: {TEXTS[i % 7]}"] for i in range(12)]

    # Sent raw and at once, most requests find the one-text queue busy: a real 429.
    raw = aifn_client.Client(url, token_provider=None, max_retries=0, max_batch_texts=2)

    def once(batch: list[str]) -> str:
        try:
            raw.sentiment(batch)
            return "ok"
        except aifn_client.AifnError as exc:
            return f"{exc.status} {exc.type}"

    with ThreadPoolExecutor(len(batches)) as pool:
        outcomes = list(pool.map(once, batches))
    assert "429 overloaded" in outcomes

    client = aifn_client.Client(url, token_provider=None, max_retries=20, max_batch_texts=2)
    with ThreadPoolExecutor(len(batches)) as pool:
        answers = list(pool.map(client.sentiment, batches))
    assert [len(a) for a in answers] == [2] * len(batches)
    assert client.retries > 0


def test_retry_after_is_read_as_seconds_or_an_http_date(aifn_client: ModuleType) -> None:
    soon = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert aifn_client._retry_after("7") == 7
    assert aifn_client._retry_after(soon) == pytest.approx(30, abs=2)
    assert aifn_client._retry_after("soon") is None
    with pytest.raises(ValueError, match="https://"):
        aifn_client.Client("aifn-sentiment.a.run.app")
