"""Who may call, and who is calling: the optional API-key check and the rate limit's identity.

:class:`Guard` runs on every prediction request before its body is read; health, the OpenAPI
document and any other ``GET`` route never pass through it.

API-key mode (``API_KEYS`` set): a request must carry one of the keys in ``X-API-Key`` (not
``Authorization``: with Cloud Run IAM that header carries the caller's ID token), else 401
``unauthorized``. The presented key's SHA-256 is compared with every configured key's, each
comparison constant-time and none skipped, so timing tells neither whether nor which key
matched. Keys are never logged; the request log names the key by its id (the first 12 hex
digits of its SHA-256), which is what to watch while rotating keys.

The identity a rate limit counts by, first that applies:

1. API-key mode: the key's id. Clients sharing a key share a budget.
2. ``IAM_REQUIRED=true``: the caller's ``email`` (else ``sub``) from the ID token. Cloud Run
   checks that token's signature before the request reaches the container (and passes it on
   with the signature removed), so it is read here without checking again. It reads
   ``X-Serverless-Authorization`` when present, because Cloud Run then checks that header and
   passes ``Authorization`` through unchecked. If the service allows unauthenticated calls, the
   token is whatever the caller wrote: leave ``IAM_REQUIRED`` false there.
3. The client address: the entry ``FORWARDED_FOR_HOPS`` places from the right of
   ``X-Forwarded-For``. Cloud Run's front end puts the address it received the connection from
   at the right end; anything to its left was written by the client and could be forged. IPv6
   addresses count per /64, the block one subscriber usually holds.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING

import flask

from aifn import errors, ratelimit

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
    """``email`` or ``sub`` of the bearer ID token Cloud Run checked, or ``None``.

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
    except (binascii.Error, ValueError):
        return None
    if not isinstance(payload, dict):
        return None
    who = payload.get("email") or payload.get("sub")
    return who if isinstance(who, str) and who else None


def client_address(request: flask.Request, hops: int) -> str:
    """The address ``hops`` entries from the right of ``X-Forwarded-For`` (0: the TCP peer)."""
    address = request.remote_addr or "unknown"
    if hops > 0:
        entries = [
            e.strip() for v in request.headers.getlist("X-Forwarded-For") for e in v.split(",")
        ]
        entries = [e for e in entries if e]
        if entries:
            # Fewer entries than hops: only trusted proxies wrote it; the leftmost is the client.
            address = entries[-hops] if len(entries) >= hops else entries[0]
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class Guard:
    """The API-key check and the rate limit, in that order; inactive when neither is set.

    Args:
        api_keys: The configured keys, or ``None`` when API-key mode is off.
        limiter: The rate limiter, or ``None`` when ``RATE_LIMIT`` is unset.
        iam_required: The service requires Cloud Run IAM, so the ID token names the caller.
        forwarded_hops: ``FORWARDED_FOR_HOPS``.
    """

    def __init__(
        self,
        *,
        api_keys: ApiKeys | None = None,
        limiter: ratelimit.RateLimiter | None = None,
        iam_required: bool = False,
        forwarded_hops: int = 1,
    ) -> None:
        self.api_keys = api_keys
        self.limiter = limiter
        self._iam_required = iam_required
        self._hops = forwarded_hops

    @classmethod
    def from_settings(cls, settings: Settings, *, function: str) -> Guard:
        """Build from ``API_KEYS``, ``RATE_LIMIT``, ``IAM_REQUIRED`` and ``FORWARDED_FOR_HOPS``.

        Raises:
            ConfigError: The Redis settings the limiter shares with the cache are unusable.
        """
        return cls(
            api_keys=ApiKeys(settings.api_keys) if settings.api_keys else None,
            limiter=ratelimit.from_settings(settings, function=function),
            iam_required=settings.iam_required,
            forwarded_hops=settings.forwarded_for_hops,
        )

    @property
    def errors(self) -> tuple[type[errors.ApiError], ...]:
        """The errors this guard can answer with, for the OpenAPI document."""
        out: list[type[errors.ApiError]] = []
        if self.api_keys is not None:
            out.append(errors.Unauthorized)
        if self.limiter is not None:
            out.append(errors.RateLimited)
        return tuple(out)

    def identity(self, request: flask.Request, key: str | None = None) -> str:
        """Who the rate limit counts this request against (see the module docstring)."""
        if key is not None:
            return f"key:{key}"
        if self._iam_required:
            caller = iam_caller(request)
            if caller is not None:
                return f"iam:{caller}"
        return f"addr:{client_address(request, self._hops)}"

    def check(self, request: flask.Request) -> dict[str, str]:
        """Admit ``request`` or raise; returns the headers its response must carry.

        Raises:
            errors.Unauthorized: API-key mode is on and no current key was sent.
            errors.RateLimited: The client's budget is spent (with ``Retry-After``).
        """
        key: str | None = None
        if self.api_keys is not None:
            presented = request.headers.get(API_KEY_HEADER)
            key = self.api_keys.match(presented)
            if key is None:
                reason = "is missing" if presented is None else "is not a current key"
                raise errors.Unauthorized(
                    f"the {API_KEY_HEADER} header {reason}",
                    headers={"WWW-Authenticate": f'ApiKey header="{API_KEY_HEADER}"'},
                )
            request.environ[KEY_ID_ENVIRON] = key
        if self.limiter is None:
            return {}
        decision = self.limiter.check(self.identity(request, key))
        if not decision.allowed:
            raise errors.RateLimited(
                f"rate limit of {self.limiter.rate} per client exceeded; retry after "
                f"{decision.retry_after} s",
                headers=decision.headers(),
            )
        return decision.headers()
