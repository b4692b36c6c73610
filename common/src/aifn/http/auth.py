"""Who may call, and who is calling: the optional API-key check and the rate limit's identity.

:class:`Guard` runs on every prediction request before its body is read; health, the OpenAPI
document and any other ``GET`` route never pass through it.

API-key mode (``API_KEYS`` set): a request must carry one of the keys in ``X-API-Key`` (not
``Authorization``: with Cloud Run IAM that header carries the caller's ID token), else 401
``unauthorized``. The presented key's SHA-256 is compared with every configured key's, each
comparison constant-time and none skipped, so timing tells neither whether nor which key
matched. Keys are never logged; the request log names the key by its id (the first 12 hex
digits of its SHA-256), which is what to watch while rotating keys.

Who is calling, first that applies (:class:`Caller`): it names both the rate-limit budget
and the prediction cache's scope (``CACHE_SCOPE=caller``: a caller only hits entries it wrote).

1. API-key mode: the key's id. Clients sharing a key share a budget and a cache scope. A
   request without a current key is refused with 401, and charged one unit to its client
   address first, so guessing keys is rate limited like anything else.
2. ``IAM_REQUIRED=true``: the ``sub`` claim of the ID token, the principal's stable unique id
   (``email`` is optional in a token and may be present or not for the same principal, so
   counting by it would give one principal two budgets). Cloud Run checks that token's
   signature before the request reaches the container (and passes it on with the signature
   removed), so it is read here without checking again. It reads
   ``X-Serverless-Authorization`` when present, because Cloud Run then checks that header and
   passes ``Authorization`` through unchecked. If the service allows unauthenticated calls, the
   token is whatever the caller wrote: leave ``IAM_REQUIRED`` false there.
3. The client address: the entry ``FORWARDED_FOR_HOPS`` places from the right of
   ``X-Forwarded-For``. Cloud Run's front end puts the address it received the connection from
   at the right end; anything to its left was written by the client and could be forged (and
   with more than one hop, so can the counted entry, unless ingress admits only the load
   balancer that writes it). An entry that is not an IP address is never an identity: the
   nearest valid entry to its right counts instead. The rate limit counts IPv6 clients per
   ``RATE_LIMIT_IPV6_PREFIX`` block (a /56 by default: one delegated site, not one of its 256
   /64s); the cache scope is narrower, per IPv4 address or IPv6 /64 (one subscriber's LAN),
   since a scope shared by neighbours would let them see each other's texts.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import ipaddress
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NoReturn

import flask

from aifn.http import errors, ratelimit

if TYPE_CHECKING:
    from aifn.settings import Settings

API_KEY_HEADER = "X-API-Key"
# request.environ entry the request log reads: the id of the key that was accepted.
KEY_ID_ENVIRON = "aifn.api_key_id"


def key_id(key: str) -> str:
    """A key's public name: the first 12 hex digits of its SHA-256."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:12]


class ApiKeys:
    """The configured keys, held as SHA-256 digests."""

    def __init__(self, keys: Sequence[str]) -> None:
        self._digests = [hashlib.sha256(k.encode("utf-8")).digest() for k in keys]

    def match(self, presented: str | None) -> str | None:
        """The id of the key ``presented`` is, or ``None``; compares with every key."""
        if presented is None:
            return None
        digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        matched: bytes | None = None
        for candidate in self._digests:
            if hmac.compare_digest(digest, candidate):
                matched = candidate
        return matched.hex()[:12] if matched is not None else None


def iam_caller(request: flask.Request) -> str | None:
    """The ``sub`` of the bearer ID token Cloud Run checked, or ``None``.

    Only meaningful when the service requires IAM (see the module docstring).
    """
    header = request.headers.get("X-Serverless-Authorization") or request.headers.get(
        "Authorization", ""
    )
    scheme, _, token = header.strip().partition(" ")
    parts = token.strip().split(".")
    if scheme.lower() != "bearer" or len(parts) != 3:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (binascii.Error, ValueError, RecursionError):  # RecursionError: nested too deep
        return None
    if not isinstance(payload, dict):
        return None
    who = payload.get("sub")
    return who if isinstance(who, str) and who else None


def client_ip(request: flask.Request, hops: int) -> str:
    """The client's address: ``hops`` entries from the right of ``X-Forwarded-For`` (0: the TCP
    peer), or the nearest valid address to its right when that entry is not an IP address."""
    peer = request.remote_addr or "unknown"
    if hops > 0:
        entries = [
            e.strip() for v in request.headers.getlist("X-Forwarded-For") for e in v.split(",")
        ]
        entries = [e for e in entries if e]
        if entries:
            # Fewer entries than hops: only trusted proxies wrote it; the leftmost is the client.
            start = len(entries) - hops if len(entries) >= hops else 0
            for entry in entries[start:]:
                if _parse_ip(entry) is not None:
                    return entry
    return peer


def _parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


@functools.lru_cache(maxsize=4096)
def _group(address: str, ipv6_prefix: int) -> str:
    """The budget and cache scope an address belongs to (an IPv6 address's network). Cached:
    parsing it with ipaddress, twice a request, cost about 30 us of the edge's ~400 us."""
    ip = _parse_ip(address)
    if ip is None:
        return address  # only the TCP peer can be that (e.g. a unix socket): not client-chosen
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, ipv6_prefix), strict=False))
    return str(ip)


def client_address(request: flask.Request, hops: int, ipv6_prefix: int = 56) -> str:
    """The rate limit's client address: :func:`client_ip`, IPv6 grouped per ``ipv6_prefix``."""
    return _group(client_ip(request, hops), ipv6_prefix)


@dataclass(frozen=True)
class Caller:
    """Who sent a request: the budget its work is charged to and the cache scope it reads.

    ``limit`` and ``scope`` are ``key:<key id>``, ``iam:<sub>`` or ``addr:<address>`` (the
    address grouped per ``RATE_LIMIT_IPV6_PREFIX`` for the limit, per /64 for the scope).
    ``headers`` are the rate-limit fields the response carries so far.
    """

    limit: str
    scope: str
    headers: dict[str, str] = field(default_factory=dict, compare=False)


class Guard:
    """The API-key check and the rate limit, in that order; names the caller of every request.

    Args:
        api_keys: The configured keys, or ``None`` when API-key mode is off.
        limiter: The rate limiter, or ``None`` when ``RATE_LIMIT`` is unset.
        iam_required: The service requires Cloud Run IAM, so the ID token names the caller.
        forwarded_hops: ``FORWARDED_FOR_HOPS``.
        ipv6_prefix: ``RATE_LIMIT_IPV6_PREFIX``.
    """

    def __init__(
        self,
        *,
        api_keys: ApiKeys | None = None,
        limiter: ratelimit.RateLimiter | None = None,
        iam_required: bool = False,
        forwarded_hops: int = 1,
        ipv6_prefix: int = 56,
    ) -> None:
        self.api_keys = api_keys
        self.limiter = limiter
        self._iam_required = iam_required
        self._hops = forwarded_hops
        self._ipv6_prefix = ipv6_prefix

    @classmethod
    def from_settings(cls, settings: Settings, *, function: str) -> Guard:
        """Build from ``API_KEYS``, ``RATE_LIMIT``, ``IAM_REQUIRED``, ``FORWARDED_FOR_HOPS`` and
        ``RATE_LIMIT_IPV6_PREFIX``.

        Raises:
            ConfigError: The Redis settings the limiter shares with the cache are unusable.
        """
        return cls(
            api_keys=ApiKeys(settings.api_keys) if settings.api_keys else None,
            limiter=ratelimit.from_settings(settings, function=function),
            iam_required=settings.iam_required,
            forwarded_hops=settings.forwarded_for_hops,
            ipv6_prefix=settings.rate_limit_ipv6_prefix,
        )

    @property
    def errors(self) -> tuple[type[errors.HttpError], ...]:
        """The errors this guard can answer with, for the OpenAPI document."""
        out: list[type[errors.HttpError]] = []
        if self.api_keys is not None:
            out.append(errors.Unauthorized)
        if self.limiter is not None:
            out.append(errors.RateLimited)
        return tuple(out)

    def caller(self, request: flask.Request, key: str | None = None) -> Caller:
        """Who ``request`` comes from (see the module docstring); ``key``: the accepted key's id."""
        if key is not None:
            return Caller(f"key:{key}", f"key:{key}")
        if self._iam_required:
            sub = iam_caller(request)
            if sub is not None:
                return Caller(f"iam:{sub}", f"iam:{sub}")
        ip = client_ip(request, self._hops)
        return Caller(f"addr:{_group(ip, self._ipv6_prefix)}", f"addr:{_group(ip, 64)}")

    def admit(self, request: flask.Request) -> Caller:
        """Check the key and take the request's first unit of work, before its body is read.

        Returns:
            The caller, with the rate-limit headers its response must carry.

        Raises:
            errors.Unauthorized: API-key mode is on and no current key was sent (the attempt
                is charged to the client's address first).
            errors.RateLimited: The client's budget is spent (with ``Retry-After``), or, in
                API-key mode, its address has spent its budget on attempts without a key.
        """
        key: str | None = None
        if self.api_keys is not None:
            presented = request.headers.get(API_KEY_HEADER)
            key = self.api_keys.match(presented)
            if key is None:
                self._refuse_key(request, presented)
            request.environ[KEY_ID_ENVIRON] = key
        caller = self.caller(request, key)
        if self.limiter is None:
            return caller
        decision = self.limiter.check(caller.limit)
        if not decision.allowed:
            raise errors.RateLimited(
                f"rate limit of {self.limiter.rate} units of work per client exceeded; retry "
                f"after {decision.retry_after} s",
                headers=decision.headers(),
            )
        caller.headers.update(decision.headers())
        return caller

    def charge(self, caller: Caller, units: int) -> dict[str, str]:
        """Charge the rest of a request of ``units`` of work that :meth:`admit` let in.

        Returns:
            The rate-limit headers its response must carry.

        Raises:
            errors.RateLimited: The client's budget does not hold the request's work (with
                ``Retry-After``: when the whole request would pass).
        """
        if self.limiter is None or units <= 1:
            return dict(caller.headers)
        decision = self.limiter.charge(caller.limit, units)
        if not decision.allowed:
            raise errors.RateLimited(
                f"this request is {units} units of work (its texts, and new label prompts on "
                f"zero-shot classify) and the rate limit of "
                f"{self.limiter.rate} per client does not hold them now; retry after "
                f"{decision.retry_after} s, or send fewer texts per request",
                headers=decision.headers(),
            )
        return decision.headers()

    def _refuse_key(self, request: flask.Request, presented: str | None) -> NoReturn:
        headers = {"WWW-Authenticate": f'ApiKey header="{API_KEY_HEADER}"'}
        if self.limiter is not None:
            # Counted against the address: a key guesser gets 429 like any other client, and a
            # valid key's budget (its own bucket) is never spent by someone else's guesses.
            address = client_address(request, self._hops, self._ipv6_prefix)
            decision = self.limiter.check(f"addr:{address}")
            if not decision.allowed:
                raise errors.RateLimited(
                    f"too many requests without a current {API_KEY_HEADER} from this address; "
                    f"retry after {decision.retry_after} s",
                    headers={**headers, **decision.headers()},
                )
            headers.update(decision.headers())
        reason = "is missing" if presented is None else "is not a current key"
        raise errors.Unauthorized(f"the {API_KEY_HEADER} header {reason}", headers=headers)
