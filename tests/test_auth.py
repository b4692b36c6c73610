"""API-key mode and the identity rate limits count by: unit checks, then a real server."""

from __future__ import annotations

import base64
import ipaddress
import json
from collections.abc import Iterator
from pathlib import Path

import flask
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from werkzeug.test import EnvironBuilder

from aifn.core.errors import ConfigError
from aifn.http.auth import ApiKeys, Guard, client_address, iam_caller, key_id
from aifn.http.errors import RateLimited, Unauthorized, status
from aifn.http.ratelimit import RateLimiter
from aifn.settings import Rate, Settings

from .helpers import RedisServer, Server, start_server

ENDPOINT = "/v1/analyze/sentiment"
OLD_KEY = "old-key-5f1c2e9a7b3d4c6e8f0a1b2c"
NEW_KEY = "new-key-9d8c7b6a5f4e3d2c1b0a9f8e"
TEAM_KEY = "team-key-0123456789abcdef0123"
WRONG_KEY = "wrong-key-aaaaaaaaaaaaaaaaaaaa"


def request(headers: dict[str, str] | None = None, remote: str = "10.1.2.3") -> flask.Request:
    environ = EnvironBuilder(
        path=ENDPOINT, method="POST", headers=headers or {}, environ_base={"REMOTE_ADDR": remote}
    ).get_environ()
    return flask.Request(environ)


def id_token(claims: dict[str, str]) -> str:
    """An ID token as Cloud Run hands it to the container: its signature removed."""

    def part(obj: dict[str, str]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

    return f"{part({'alg': 'RS256'})}.{part(claims)}.SIGNATURE_REMOVED_BY_GOOGLE"


# --- keys -----------------------------------------------------------------------------------


def test_either_live_key_matches_by_its_id() -> None:
    keys = ApiKeys([OLD_KEY, NEW_KEY])
    assert keys.match(OLD_KEY) == key_id(OLD_KEY)
    assert keys.match(NEW_KEY) == key_id(NEW_KEY)
    assert key_id(OLD_KEY) != key_id(NEW_KEY)
    for bad in (None, "", WRONG_KEY, OLD_KEY[:-1], OLD_KEY + "x", OLD_KEY.upper()):
        assert keys.match(bad) is None


def test_api_keys_setting_is_secret_and_checked() -> None:
    s = Settings.from_env(
        default_model_dir=Path("/m"), environ={"API_KEYS": f" {OLD_KEY} , {NEW_KEY},"}
    )
    assert s.api_keys == (OLD_KEY, NEW_KEY)
    assert OLD_KEY not in repr(s)
    short = "tooshort"
    with pytest.raises(ConfigError) as raised:
        Settings.from_env(default_model_dir=Path("/m"), environ={"API_KEYS": f"{OLD_KEY},{short}"})
    assert "API_KEYS=(not shown)" in str(raised.value)
    assert short not in str(raised.value)
    assert OLD_KEY not in str(raised.value)


def test_guard_refuses_missing_and_wrong_keys() -> None:
    guard = Guard(api_keys=ApiKeys([OLD_KEY]))
    with pytest.raises(Unauthorized, match="missing") as missing:
        guard.admit(request())
    assert missing.value.headers["WWW-Authenticate"] == 'ApiKey header="X-API-Key"'
    with pytest.raises(Unauthorized, match="not a current key"):
        guard.admit(request({"X-API-Key": WRONG_KEY}))
    # An ID token in Authorization is not an API key.
    with pytest.raises(Unauthorized):
        guard.admit(request({"Authorization": f"Bearer {OLD_KEY}"}))
    assert guard.admit(request({"X-API-Key": OLD_KEY})).headers == {}


# --- identity -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("xff", "hops", "expected"),
    [
        ("203.0.113.5", 1, "203.0.113.5"),  # what Cloud Run sends
        ("6.6.6.6, 203.0.113.5", 1, "203.0.113.5"),  # a forged entry on the left is ignored
        ("6.6.6.6, 203.0.113.5, 130.211.0.1", 2, "203.0.113.5"),  # behind a load balancer
        ("203.0.113.5", 2, "203.0.113.5"),  # fewer entries than hops: the leftmost
        ("203.0.113.5", 0, "10.1.2.3"),  # 0: the TCP peer
        (None, 1, "10.1.2.3"),
        ("2001:db8:1:2:3:4:5:6", 1, "2001:db8:1::/56"),  # IPv6 per /56 (RATE_LIMIT_IPV6_PREFIX)
        ("::ffff:203.0.113.5", 1, "203.0.113.5"),
        # An entry that is not an address is never an identity a caller could vary at will:
        # the nearest valid entry to its right (written by a proxy we trust) counts instead.
        ("not-an-ip", 1, "10.1.2.3"),
        ("6.6.6.6, not-an-ip-1, 203.0.113.5", 2, "203.0.113.5"),
        ("garbage-7, 203.0.113.5, 130.211.0.1", 2, "203.0.113.5"),
    ],
)
def test_client_address(xff: str | None, hops: int, expected: str) -> None:
    headers = {"X-Forwarded-For": xff} if xff else {}
    assert client_address(request(headers), hops) == expected


def test_random_junk_at_the_counted_hop_is_one_budget_not_many() -> None:
    """With two hops a direct request writes the counted entry; junk there varied per request
    must not buy a fresh budget each time (the address Cloud Run wrote is charged)."""
    guard = Guard(limiter=RateLimiter(Rate(2, 60), function="t"), forwarded_hops=2)
    statuses = []
    for i in range(4):
        try:
            guard.admit(request({"X-Forwarded-For": f"junk-{i}, 203.0.113.5"}))
            statuses.append(200)
        except RateLimited:
            statuses.append(429)
    assert statuses == [200, 200, 429, 429]


def test_ipv6_clients_are_grouped_at_the_configured_prefix() -> None:
    """A /48 holder may use 65,536 /64s: each must not be a budget of its own."""
    guard = Guard(limiter=RateLimiter(Rate(3, 60), function="t"))
    in_one_56 = [f"2001:db8:1:{n:x}::1" for n in (0, 0x12, 0xFF)]  # three /64s of one /56
    for address in in_one_56:
        guard.admit(request({"X-Forwarded-For": address}))
    with pytest.raises(RateLimited):
        guard.admit(request({"X-Forwarded-For": "2001:db8:1:ab::9"}))
    # Another /56 of the same /48 is another site: its own budget at the default prefix...
    assert guard.admit(request({"X-Forwarded-For": "2001:db8:1:100::1"})).headers
    # ...and the same one at /48.
    wide = Guard(limiter=RateLimiter(Rate(1, 60), function="t"), ipv6_prefix=48)
    wide.admit(request({"X-Forwarded-For": "2001:db8:1:100::1"}))
    with pytest.raises(RateLimited):
        wide.admit(request({"X-Forwarded-For": "2001:db8:1:ff00::1"}))
    assert (
        client_address(request({"X-Forwarded-For": "2001:db8:1:ff00::1"}), 1, 48)
        == "2001:db8:1::/48"
    )


def test_ipv6_prefix_setting() -> None:
    env = {"RATE_LIMIT_IPV6_PREFIX": "48"}
    assert Settings.from_env(default_model_dir=Path("/m"), environ=env).rate_limit_ipv6_prefix == 48
    assert Settings.from_env(default_model_dir=Path("/m"), environ={}).rate_limit_ipv6_prefix == 56
    for bad in ("8", "129", "x"):
        with pytest.raises(ConfigError, match=r"^RATE_LIMIT_IPV6_PREFIX="):
            Settings.from_env(default_model_dir=Path("/m"), environ={"RATE_LIMIT_IPV6_PREFIX": bad})


def test_iam_caller_is_read_only_when_iam_is_required() -> None:
    token = id_token({"email": "backend@proj.iam.gserviceaccount.com", "sub": "1234"})
    req = request({"Authorization": f"Bearer {token}", "X-Forwarded-For": "203.0.113.5"})
    assert iam_caller(req) == "1234"
    assert Guard(iam_required=True).caller(req).limit == "iam:1234"
    # Without IAM in front, anyone can write that header: the address counts instead.
    assert Guard(iam_required=False).caller(req).limit == "addr:203.0.113.5"
    # An API key, when the mode is on, wins over both.
    assert Guard(iam_required=True).caller(req, key="abc").limit == "key:abc"


def test_one_iam_principal_is_one_budget_with_or_without_email() -> None:
    """A token carries `email` only with the email scope: the same principal (same `sub`)
    must not get a second budget, nor a second cache scope, by leaving it out."""
    sub = "107523418765432109876"
    with_email = id_token({"email": "backend@proj.iam.gserviceaccount.com", "sub": sub})
    without = id_token({"sub": sub})
    guard = Guard(iam_required=True, limiter=RateLimiter(Rate(2, 60), function="t"))
    for token in (with_email, without):
        guard.admit(request({"Authorization": f"Bearer {token}"}))
    with pytest.raises(RateLimited):
        guard.admit(request({"Authorization": f"Bearer {with_email}"}))
    callers = {
        guard.caller(request({"Authorization": f"Bearer {t}"})).limit for t in (with_email, without)
    }
    assert callers == {guard.caller(request({"Authorization": f"Bearer {without}"})).limit}
    # A token without `sub` names nobody: the address counts.
    no_sub = id_token({"email": "backend@proj.iam.gserviceaccount.com"})
    req = request({"Authorization": f"Bearer {no_sub}", "X-Forwarded-For": "203.0.113.5"})
    assert guard.caller(req).limit == "addr:203.0.113.5"


def test_iam_caller_prefers_the_header_cloud_run_checked() -> None:
    checked = id_token({"sub": "107"})
    unchecked = id_token({"email": "someone-else@example.com"})
    req = request(
        {"X-Serverless-Authorization": f"Bearer {checked}", "Authorization": f"Bearer {unchecked}"}
    )
    assert iam_caller(req) == "107"


@pytest.mark.parametrize(
    "header", ["Bearer not-a-jwt", "Basic dXNlcjpwdw==", "Bearer a.!!!.c", "Bearer a.bnVsbA.c", ""]
)
def test_a_malformed_token_falls_back_to_the_address(header: str) -> None:
    req = request({"Authorization": header, "X-Forwarded-For": "203.0.113.5"})
    assert iam_caller(req) is None
    assert Guard(iam_required=True).caller(req).limit == "addr:203.0.113.5"


def test_wrong_keys_are_rate_limited_per_address_without_touching_a_keys_budget() -> None:
    guard = Guard(api_keys=ApiKeys([OLD_KEY]), limiter=RateLimiter(Rate(2, 60), function="t"))
    guesser = {"X-Forwarded-For": "198.51.100.66"}
    outcomes = []
    for n in range(4):
        headers = {**guesser, "X-API-Key": f"guess-{n:020d}"} if n % 2 else guesser
        try:
            guard.admit(request(headers))
        except (Unauthorized, RateLimited) as exc:
            outcomes.append((status(exc), exc.headers.get("RateLimit-Remaining")))
    # Missing and wrong keys alike: 401 while the address has budget, then 429.
    assert outcomes == [(401, "1"), (401, "0"), (429, "0"), (429, "0")]
    # The key's own budget, from the same address, is untouched; another address is too.
    assert (
        guard.admit(request({**guesser, "X-API-Key": OLD_KEY})).headers["RateLimit-Remaining"]
        == "1"
    )
    with pytest.raises(Unauthorized):
        guard.admit(request({"X-Forwarded-For": "198.51.100.67", "X-API-Key": WRONG_KEY}))


def test_key_guesses_share_one_budget_across_instances_in_redis(redis_server: RedisServer) -> None:
    """Two instances on one real Redis: guesses from one address are counted once, together."""
    settings = Settings.from_env(
        default_model_dir=Path("/m"),
        environ={"API_KEYS": OLD_KEY, "RATE_LIMIT": "3/minute", "REDIS_URL": redis_server.url},
    )
    a, b = (Guard.from_settings(settings, function="sentiment") for _ in range(2))
    guesser = {"X-Forwarded-For": "198.51.100.88", "X-API-Key": WRONG_KEY}
    outcomes = []
    for guard in (a, b, a, b):
        try:
            guard.admit(request(guesser))
        except (Unauthorized, RateLimited) as exc:
            outcomes.append(status(exc))
    assert outcomes == [401, 401, 401, 429]
    assert b.limiter is not None
    assert b.limiter.describe()["fallback"] == 0  # decided in Redis, not per instance
    assert a.admit(request({**guesser, "X-API-Key": OLD_KEY})).headers["RateLimit-Remaining"] == "2"


_HEADER_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=80)
_ADDRESSISH = st.one_of(
    _HEADER_TEXT,
    st.ip_addresses().map(str),
    st.ip_addresses(v=6).map(lambda ip: f"{ip}%{'eth0'}"),
    st.lists(st.one_of(_HEADER_TEXT, st.ip_addresses().map(str)), max_size=5).map(", ".join),
)


@settings(max_examples=300, deadline=None)
@given(
    xff=_ADDRESSISH,
    auth=_HEADER_TEXT,
    serverless=st.one_of(st.none(), _HEADER_TEXT),
    key=st.one_of(st.none(), _HEADER_TEXT),
    hops=st.integers(0, 3),
    keys_on=st.booleans(),
    iam=st.booleans(),
)
def test_any_identity_headers_give_a_caller_or_a_clean_refusal(
    xff: str,
    auth: str,
    serverless: str | None,
    key: str | None,
    hops: int,
    keys_on: bool,
    iam: bool,
) -> None:
    """Whatever a client writes in the headers identity is read from: a caller whose address
    identity is an address (never the client's text), or 401/429, never another exception."""
    guard = Guard(
        api_keys=ApiKeys([OLD_KEY]) if keys_on else None,
        limiter=RateLimiter(Rate(1000, 60), function="t"),
        iam_required=iam,
        forwarded_hops=hops,
    )
    headers = {"X-Forwarded-For": xff, "Authorization": auth}
    if serverless is not None:
        headers["X-Serverless-Authorization"] = serverless
    if key is not None:
        headers["X-API-Key"] = key
    try:
        caller = guard.admit(request(headers))
    except (Unauthorized, RateLimited):
        return
    for identity in (caller.limit, caller.scope):
        kind, _, value = identity.partition(":")
        assert kind in {"key", "iam", "addr"}
        if kind == "addr":
            ipaddress.ip_network(value)  # an address or a block, never free text


def test_the_caller_names_the_cache_scope_never_the_raw_key() -> None:
    keyed = Guard(api_keys=ApiKeys([OLD_KEY, NEW_KEY]))
    old = keyed.admit(request({"X-API-Key": OLD_KEY}))
    new = keyed.admit(request({"X-API-Key": NEW_KEY}))
    assert old.scope == f"key:{key_id(OLD_KEY)}"
    assert OLD_KEY not in old.scope
    assert old.scope != new.scope
    token = id_token({"sub": "42", "email": "a@b.c"})
    iam = Guard(iam_required=True).admit(request({"Authorization": f"Bearer {token}"}))
    assert (iam.limit, iam.scope) == ("iam:42", "iam:42")
    # Anonymous: the address; the scope is narrower than the budget for IPv6 (one /64 each).
    anon = Guard()
    a = anon.admit(request({"X-Forwarded-For": "2001:db8:1:2::1"}))
    b = anon.admit(request({"X-Forwarded-For": "2001:db8:1:3::1"}))
    assert a.limit == b.limit == "addr:2001:db8:1::/56"
    assert (a.scope, b.scope) == ("addr:2001:db8:1:2::/64", "addr:2001:db8:1:3::/64")
    assert anon.admit(request({"X-Forwarded-For": "203.0.113.5"})).scope == "addr:203.0.113.5"


def test_limited_by_key_not_by_address() -> None:
    guard = Guard(api_keys=ApiKeys([OLD_KEY]), limiter=RateLimiter(Rate(2, 60), function="t"))
    headers = [{"X-API-Key": OLD_KEY, "X-Forwarded-For": f"203.0.113.{i}"} for i in range(3)]
    assert guard.admit(request(headers[0])).headers["RateLimit-Remaining"] == "1"
    assert guard.admit(request(headers[1])).headers["RateLimit-Remaining"] == "0"
    with pytest.raises(RateLimited) as refused:
        guard.admit(request(headers[2]))
    assert refused.value.headers["Retry-After"] == "30"


# --- a real server in API-key mode ------------------------------------------------------------


@pytest.fixture(scope="module")
def server(sentiment_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(
        sentiment_model_dir,
        tmp_path_factory.mktemp("auth"),
        API_KEYS=f"{OLD_KEY},{NEW_KEY},{TEAM_KEY}",
        RATE_LIMIT="3/minute",
        LOG_LEVEL="DEBUG",  # log as much as the service ever does
        LOG_REQUEST_TEXT="true",
    )
    yield srv
    if srv.proc.poll() is None:
        srv.proc.terminate()
        srv.proc.wait(timeout=15)


@pytest.mark.integration
def test_without_a_current_key_401_before_the_body_is_read(server: Server) -> None:
    for headers in ({}, {"X-API-Key": WRONG_KEY}):
        status, body, response_headers = server.request(
            "POST", ENDPOINT, "not an object", headers=headers
        )
        assert status == 401
        assert body["error"] == {
            "type": "unauthorized",
            "message": body["error"]["message"],
            "status": 401,
        }
        assert response_headers["WWW-Authenticate"] == 'ApiKey header="X-API-Key"'


@pytest.mark.integration
def test_key_guessing_is_rate_limited_per_address(server: Server) -> None:
    guesser = "198.51.100.77"
    statuses = [
        server.request(
            "POST",
            ENDPOINT,
            {"text": "Fine."},
            headers={"X-API-Key": f"guess-{n:020d}", "X-Forwarded-For": guesser},
        )[0]
        for n in range(5)
    ]
    assert statuses == [401, 401, 401, 429, 429]  # was 401 forever: guesses were free
    # A real key from that address has its own budget.
    status = server.request(
        "POST",
        ENDPOINT,
        {"text": "Fine."},
        headers={"X-API-Key": NEW_KEY, "X-Forwarded-For": guesser},
    )[0]
    assert status == 200


@pytest.mark.integration
def test_both_live_keys_work_during_a_rotation(server: Server) -> None:
    for key in (OLD_KEY, NEW_KEY):
        status, body, headers = server.request(
            "POST", ENDPOINT, {"text": "Works well."}, headers={"X-API-Key": key}
        )
        assert status == 200
        assert body["results"][0]["label"] in {"NEGATIVE", "NEUTRAL", "POSITIVE"}
        assert headers["RateLimit-Limit"] == "3"


@pytest.mark.integration
def test_one_key_is_one_budget_whatever_the_address(server: Server) -> None:
    statuses = [
        server.request(
            "POST",
            ENDPOINT,
            {"text": "Fine."},
            headers={"X-API-Key": TEAM_KEY, "X-Forwarded-For": f"203.0.113.{i}"},
        )[0]
        for i in range(4)
    ]
    assert statuses == [200, 200, 200, 429]


@pytest.mark.integration
def test_health_and_openapi_need_no_key_and_the_document_lists_401(server: Server) -> None:
    for _ in range(5):
        assert server.request("GET", "/v1/health")[0] == 200
    status, doc, _ = server.request("GET", "/openapi.json")
    assert status == 200
    responses = doc["paths"][ENDPOINT]["post"]["responses"]
    assert "`unauthorized`" in responses["401"]["description"]
    assert "`rate_limited`" in responses["429"]["description"]
    assert "401" not in doc["paths"]["/v1/health"]["get"]["responses"]


@pytest.mark.integration
def test_keys_never_reach_the_log(server: Server) -> None:
    server.request("POST", ENDPOINT, {"text": "Logged?"}, headers={"X-API-Key": OLD_KEY})
    server.request("POST", ENDPOINT, {"text": "Logged?"}, headers={"X-API-Key": WRONG_KEY})
    log = server.log_text()
    for secret in (OLD_KEY, NEW_KEY, TEAM_KEY, WRONG_KEY):
        assert secret not in log
    assert "X-API-Key" not in log  # nor the header itself
    # The request log names the accepted key by its id, which is what rotation needs.
    lines = server.log_lines()
    ids = {line.get("api_key_id") for line in lines if line.get("httpRequest")}
    assert key_id(OLD_KEY) in ids
    requests = [line for line in lines if line.get("httpRequest")]
    assert any(line["httpRequest"]["status"] == 401 for line in requests)
    assert "Logged?" in log  # LOG_REQUEST_TEXT is on, so this log is as full as it gets
