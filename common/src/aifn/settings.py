"""One frozen settings object, read from the environment once at startup.

Every knob is declared once, here, with its variable name, default and purpose; the
configuration table in docs/configuration.md is generated from :data:`SETTINGS`
(docs/hooks.py), so the two cannot drift.
Cloud Run's own variables (``PORT``, ``K_SERVICE``, ``K_REVISION``) are read where they are used,
never renamed.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from aifn.core.errors import ConfigError
from aifn.core.model import parse_quantize

# RATE_LIMIT's values (applied by aifn.http.ratelimit).
_UNITS = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600, "hour": 3600}
_RATE = re.compile(r"^(\d+)\s*/\s*(\d*)\s*([a-z]+?)s?$")


@dataclass(frozen=True)
class Rate:
    """``requests`` per ``period`` seconds, which is also the largest burst."""

    requests: int
    period: float

    @property
    def per_second(self) -> float:
        return self.requests / self.period

    def __str__(self) -> str:
        return f"{self.requests}/{self.period:g}s"


def parse_rate(raw: str) -> Rate | None:
    """``"60/minute"``, ``"5/second"``, ``"1000/hour"``, ``"10/30s"``; ``"off"`` means no limit.

    Raises:
        ValueError: Not in that form, or zero requests.
    """
    value = raw.strip().lower()
    if value in {"", "off", "none"}:
        return None
    m = _RATE.match(value)
    unit = _UNITS.get(m.group(3)) if m else None
    if m is None or unit is None:
        raise ValueError("expected <requests>/<period>, e.g. 60/minute, 5/second, 10/30s")
    requests, count = int(m.group(1)), int(m.group(2) or 1)
    if requests < 1 or count < 1:
        raise ValueError("requests and period must be at least 1")
    return Rate(requests, float(count * unit))


def cpu_count() -> int:
    """The CPUs this process may use: its affinity, capped by a cgroup v2 CPU quota.

    In a container (Cloud Run, ``docker run --cpus``) the affinity still lists every host CPU;
    the quota in ``cpu.max`` is what the instance actually gets.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    return max(1, min(cpus, math.ceil(quota))) if quota else cpus


def machine_defaults() -> dict[str, int]:
    """Defaults that follow the instance's CPUs: the model workers."""
    return {"model_workers": cpu_count()}


def default_threads(max_queued_texts: int, model_workers: int, batch_size: int) -> int:
    """gunicorn request threads when THREADS is unset: one per request the model could hold.

    A request waiting for the model holds at least one queued or running text, so this many
    threads let every request the model could still take reach its queue, where backpressure
    answers the excess with 429 at once; with fewer, requests would wait unseen in gunicorn's
    own queue. Idle threads cost nothing: gunicorn starts them as requests arrive.
    """
    return max_queued_texts + model_workers * batch_size


def cgroup_cpu_quota(path: str = "/sys/fs/cgroup/cpu.max") -> float | None:
    """CPUs allowed by the cgroup v2 quota (``cpu.max`` is ``"<quota> <period>"`` or ``max``)."""
    try:
        with open(path, encoding="ascii") as f:
            quota, _, period = f.read().strip().partition(" ")
        if quota == "max":
            return None
        return int(quota) / int(period or "100000")
    except (OSError, ValueError, ZeroDivisionError):
        return None


def parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"expected true/false, got {raw!r}")


def positive_int(raw: str) -> int:
    value = int(raw.strip())
    if value < 1:
        raise ValueError("must be a positive integer")
    return value


def int_at_least(minimum: int, unit: str = "") -> Callable[[str], int]:
    """A parser for whole numbers no smaller than ``minimum`` (``unit`` names them in errors)."""

    def parse(raw: str) -> int:
        value = int(raw.strip())
        if value < minimum:
            raise ValueError(f"must be at least {minimum}{' ' + unit if unit else ''}")
        return value

    return parse


def _positive_float(raw: str) -> float:
    value = float(raw.strip())
    if not value > 0 or not math.isfinite(value):
        raise ValueError("must be a positive number")
    return value


def _non_negative_float(raw: str) -> float:
    value = float(raw.strip())
    if not value >= 0 or not math.isfinite(value):
        raise ValueError("must be a number >= 0")
    return value


def _redis_url(raw: str) -> str | None:
    value = raw.strip()
    if not value:
        return None
    if not value.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("must start with redis://, rediss:// or unix://")
    return value


def _log_level(raw: str) -> str:
    value = raw.strip().upper()
    if value not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ValueError("must be DEBUG, INFO, WARNING or ERROR")
    return value


def _path(raw: str) -> Path:
    return Path(raw).expanduser()


def _optional_str(raw: str) -> str | None:
    return raw.strip() or None


def _api_keys(raw: str) -> tuple[str, ...] | None:
    keys = tuple(k.strip() for k in raw.split(",") if k.strip())
    for n, key in enumerate(keys, 1):
        if len(key) < 16 or any(c.isspace() for c in key):
            # Never quote the key: this message ends up in logs.
            raise ValueError(f"key {n} of {len(keys)} is shorter than 16 characters or has spaces")
    return keys or None


def _cache_scope(raw: str) -> str:
    value = raw.strip().lower()
    if value not in {"caller", "shared"}:
        raise ValueError("must be caller or shared")
    return value


def _ipv6_prefix(raw: str) -> int:
    value = int(raw.strip())
    if not 16 <= value <= 128:
        raise ValueError("must be a prefix length from 16 to 128")
    return value


def unit_interval(raw: str) -> float:
    value = float(raw.strip())
    if not 0.0 <= value <= 1.0:
        raise ValueError("must be between 0 and 1")
    return value


def setting(
    env: str,
    doc: str,
    default: Any = None,
    *,
    parse: Callable[[str], Any],
    shown_default: str | None = None,
    secret: bool = False,
) -> Any:
    """Declare a settings field: its variable, its docs text, its default and its parser.

    ``parse`` turns the variable's raw text into the value, raising ``ValueError`` with a short
    reason when it cannot.
    """
    return field(
        default=default,
        repr=not secret,  # a secret never appears in a repr, an error or a log line
        metadata={
            "env": env,
            "doc": doc,
            "parse": parse,
            "shown_default": shown_default,
            "secret": secret,
        },
    )


@dataclass(frozen=True)
class Settings:
    """Settings shared by every function; build it with :meth:`from_env`."""

    model_dir: Path = setting(
        "MODEL_DIR",
        "Directory of the prepared model the function serves (its exported ONNX graphs, config and "
        "tokenizer: `make model`). Read once at startup; "
        "the process exits with an error if it is missing or malformed.",
        shown_default="`models/<function>/` at the repository root",
        parse=_path,
    )
    max_body_bytes: int = setting(
        "MAX_BODY_BYTES",
        "Largest request body accepted; larger bodies get 413 `payload_too_large` without being "
        "read.",
        1_048_576,
        parse=positive_int,
    )
    max_batch_texts: int = setting(
        "MAX_BATCH_TEXTS",
        "Most texts in one `texts` request; more get 422 `too_many_texts`. Send bigger jobs in "
        "several requests.",
        64,
        parse=positive_int,
    )
    max_tokens: int = setting(
        "MAX_TOKENS",
        "Texts longer than this many tokens are truncated (and the result says `truncated: true`). "
        "Capped by the model's own limit. Cost grows with it.",
        256,
        parse=int_at_least(8, "tokens"),
    )
    max_text_chars: int = setting(
        "MAX_TEXT_CHARS",
        "Characters of each text the model reads: a longer text is cut here before it is "
        "tokenized (and the result says `truncated: true`), so a 1 MiB text costs no more "
        "tokenizer time than a text of this length. Cut, not refused: the API already reads only "
        "a long text's start (`MAX_TOKENS`), and the default lies far past where prose reaches "
        "`MAX_TOKENS` tokens (~5 characters a token), so the cut never changes such a text's "
        "result. See docs/api.md, Limits.",
        shown_default="8 x `MAX_TOKENS` (2048)",
        parse=positive_int,
    )
    max_request_tokens: int = setting(
        "MAX_REQUEST_TOKENS",
        "Token budget of one request: the tokens the model would read for its texts (each at "
        "most `MAX_TOKENS`) plus, for zero-shot classify, its label prompts not in the label "
        "cache. A request over it gets 422 `too_many_tokens` before any model work. Like TEI's "
        "`max_batch_tokens`: it bounds how long one request can hold the instance (the default, "
        "TEI's, is 64 full-length texts; see docs/api.md, Limits, for its measured time).",
        16_384,
        parse=int_at_least(8, "tokens"),
    )
    inference_batch_size: int = setting(
        "INFERENCE_BATCH_SIZE",
        "Most texts a model worker takes from the queue at once. A request's texts are shared "
        "out among the workers, concurrent requests' texts merged into takes of up to this size; "
        "each text still runs alone, in its own forward pass, so its scores never depend on the "
        "texts beside it.",
        32,
        parse=positive_int,
    )
    batch_wait_ms: float = setting(
        "BATCH_WAIT_MS",
        "How long the model worker may wait after the oldest queued text for more texts before "
        "running a batch. `0`: never wait; under load, requests that arrive during a forward "
        "pass are merged anyway.",
        0.0,
        parse=_non_negative_float,
    )
    max_queued_texts: int = setting(
        "MAX_QUEUED_TEXTS",
        "Most texts waiting for the model per instance; a request that would exceed it gets 429 "
        "`overloaded` with `Retry-After` at once. Size it with Cloud Run's concurrency: "
        "concurrency x typical texts per request.",
        256,
        parse=positive_int,
    )
    request_timeout_seconds: float = setting(
        "REQUEST_TIMEOUT_SECONDS",
        "Longest a request waits for the model before it gets 503 `deadline_exceeded`; keep it "
        "below Cloud Run's request timeout.",
        30.0,
        parse=_positive_float,
    )
    model_workers: int = setting(
        "MODEL_WORKERS",
        "Threads running the model, each on its own text at a time. One per vCPU: on 2 vCPUs two "
        "workers with one intra-op thread each served more requests/s than one worker with two "
        "(see docs/performance.md).",
        shown_default="the CPUs this process may use (affinity, capped by the cgroup quota)",
        parse=positive_int,
    )
    intra_op_threads: int = setting(
        "INTRA_OP_THREADS",
        "ONNX Runtime intra-op threads of each forward pass (never spinning: idle threads cost "
        "no CPU). Keep `MODEL_WORKERS` x `INTRA_OP_THREADS` at the instance's vCPUs.",
        1,
        parse=positive_int,
    )
    threads: int = setting(
        "THREADS",
        "Request threads of the gunicorn worker (functions-framework's own variable; the function "
        "fills in this default before gunicorn starts). The default lets every request the model "
        "could take reach its queue, so overload is refused with 429 at once instead of waiting "
        "unseen in gunicorn's queue. On Cloud Run set it to the concurrency (Terraform does).",
        shown_default="`MAX_QUEUED_TEXTS` + `MODEL_WORKERS` x `INFERENCE_BATCH_SIZE`",
        parse=positive_int,
    )
    quantize: str = setting(
        "QUANTIZE",
        "int8 inference: `auto` runs the int8 graph the model's build measured within 0.5 point "
        "of float32 on its held-out data (recorded in its card and `aifn-model.json`; none "
        "recorded means float32); `off` always runs the float32 graph.",
        "auto",
        parse=parse_quantize,
    )
    log_level: str = setting(
        "LOG_LEVEL",
        "Lowest severity logged: DEBUG, INFO, WARNING or ERROR.",
        "INFO",
        parse=_log_level,
    )
    log_request_text: bool = setting(
        "LOG_REQUEST_TEXT",
        "Log the texts of each request at DEBUG. Off by default: texts are user data.",
        False,
        parse=parse_bool,
    )
    google_cloud_project: str | None = setting(
        "GOOGLE_CLOUD_PROJECT",
        "Project id used to link log lines to Cloud Trace (`logging.googleapis.com/trace`). "
        "Terraform sets it.",
        shown_default="unset (trace ids are logged bare)",
        parse=_optional_str,
    )
    metrics: bool = setting(
        "METRICS",
        "Serve Prometheus metrics at `GET /metrics` (requests, latency, batches, queue, cache, "
        "rejections; see docs/observability.md, Metrics). Like health, it needs no API key and is "
        "not rate limited: Cloud Run IAM and ingress protect it. `false`: no endpoint (404), "
        "nothing counted.",
        True,
        parse=parse_bool,
    )
    cache_max_entries: int = setting(
        "CACHE_MAX_ENTRIES",
        "Size of the in-process prediction cache (texts), used when no Redis is configured; "
        "about 100 bytes per text plus its key. `0` turns caching off.",
        20_000,
        parse=int_at_least(0),
    )
    cache_ttl_seconds: int = setting(
        "CACHE_TTL_SECONDS",
        "How long a cached prediction lives, in either backend. A new model never serves old "
        "answers regardless: the model's content hash is part of every key.",
        86_400,
        parse=positive_int,
    )
    cache_scope: str = setting(
        "CACHE_SCOPE",
        "Who shares prediction-cache entries. `caller`: each caller (API key, IAM principal, or "
        "client address) only ever hits entries its own requests wrote, so neither `cached` nor "
        "the response time tells it what anyone else sent; batch files share a scope of their "
        "own. `shared`: one namespace for every caller and batch file, more hits; only for a "
        "single-tenant deployment. See SECURITY.md.",
        "caller",
        parse=_cache_scope,
    )
    redis_url: str | None = setting(
        "REDIS_URL",
        "Cache predictions in Redis instead of in process: `redis://[:password@]host:port/db`, "
        "or `rediss://` for TLS. Takes precedence over `REDIS_HOST`.",
        shown_default="unset",
        parse=_redis_url,
        secret=True,  # may hold the password
    )
    redis_host: str | None = setting(
        "REDIS_HOST",
        "Memorystore's host (Terraform passes it); used with `REDIS_PORT`, `REDIS_AUTH` and "
        "`REDIS_CA_CERT` when `REDIS_URL` is unset.",
        shown_default="unset",
        parse=_optional_str,
    )
    redis_port: int = setting("REDIS_PORT", "Port for `REDIS_HOST`.", 6379, parse=positive_int)
    redis_auth: str | None = setting(
        "REDIS_AUTH",
        "Redis AUTH string (Memorystore's, from Secret Manager). Never logged.",
        shown_default="unset",
        parse=_optional_str,
        secret=True,
    )
    redis_ca_cert: str | None = setting(
        "REDIS_CA_CERT",
        "CA certificate for TLS (Memorystore in-transit encryption): the PEM text itself or a "
        "path to a PEM file. Setting it turns TLS on for `REDIS_HOST`: the server's certificate "
        "must chain to this CA; its host name is not checked (Memorystore is reached by IP).",
        shown_default="unset",
        parse=_optional_str,
    )
    redis_timeout_ms: int = setting(
        "REDIS_TIMEOUT_MS",
        "Connect and command timeout for Redis. A slow or unreachable Redis costs a request at "
        "most this (then the model answers); 3 failures in a row stop using Redis until a "
        "background probe succeeds.",
        250,
        parse=positive_int,
    )
    redis_probe_seconds: float = setting(
        "REDIS_PROBE_SECONDS",
        "While Redis is considered down, how often a background probe checks whether it is back.",
        10.0,
        parse=_positive_float,
    )
    rate_limit: Rate | None = setting(
        "RATE_LIMIT",
        "Units of work each client may ask of the prediction endpoints, e.g. `60/minute`, "
        "`5/second`, `10/30s`; a unit is a forward pass: a text, or on zero-shot classify a "
        "label prompt not in the label cache (see docs/security.md). A token bucket: a "
        "client may spend that many at once, then at that rate; past it, 429 `rate_limited` "
        "with `Retry-After`, for one unit before the body is read and for the rest once it is. "
        "A request bigger than the whole budget runs only on a full bucket and leaves it in "
        "debt. Wrong or missing API keys are charged to the client's address. "
        "Shared by every instance through Redis when Redis is set, else (and while Redis is "
        "down) per instance. Health, `/metrics` and `/openapi.json` are never limited. See "
        "docs/security.md.",
        shown_default="unset (no limit)",
        parse=parse_rate,
    )
    iam_required: bool = setting(
        "IAM_REQUIRED",
        "`true` only when Cloud Run requires IAM for the service (no `allUsers` invoker; "
        "Terraform sets it): rate limits and cache scope then count per caller, the `sub` "
        "(the principal's stable id) of the ID token Cloud Run verified. When `false` that "
        "token is ignored, since anyone could write one.",
        False,
        parse=parse_bool,
    )
    forwarded_for_hops: int = setting(
        "FORWARDED_FOR_HOPS",
        "Without API keys or IAM, rate limits count per client address: the entry this many "
        "places from the right of `X-Forwarded-For` (1 on Cloud Run, 2 behind an external "
        "Application Load Balancer, 0 for the TCP peer). Entries further left can be forged, "
        "and so can this one when a request can bypass the load balancer: above 1, restrict "
        "ingress to the load balancer (Terraform refuses otherwise). An entry that is not an "
        "IP address counts as the nearest valid one to its right.",
        1,
        parse=int_at_least(0),
    )
    rate_limit_ipv6_prefix: int = setting(
        "RATE_LIMIT_IPV6_PREFIX",
        "Without API keys or IAM, IPv6 clients share one rate-limit budget per block of this "
        "prefix length. 56: the block a residential line is usually delegated (RIPE-690), so one "
        "household is one client, while a /48 holder (65,536 /64s) gets 256 budgets, not "
        "65,536. 48 bounds that to one at the cost of grouping a provider's neighbours; 64 is "
        "one subnet.",
        56,
        parse=_ipv6_prefix,
    )
    api_keys: tuple[str, ...] | None = setting(
        "API_KEYS",
        "API-key mode, for deployments without Cloud Run IAM: comma-separated keys of 16+ "
        "characters (e.g. `openssl rand -hex 32`); prediction requests without one of them in "
        "`X-API-Key` get 401 `unauthorized`. Two keys can be live at once, for rotation. Never "
        "logged (the request log shows a key's id). Health, `/metrics` and `/openapi.json` need "
        "no key.",
        shown_default="unset (off)",
        parse=_api_keys,
        secret=True,
    )

    def __post_init__(self) -> None:
        if self.max_text_chars is None:  # unset: follows MAX_TOKENS (see its doc)
            object.__setattr__(self, "max_text_chars", 8 * self.max_tokens)
        if self.threads is None:  # unset: derived from the settings it must cover
            threads = default_threads(
                self.max_queued_texts, self.model_workers or 1, self.inference_batch_size
            )
            object.__setattr__(self, "threads", threads)

    @classmethod
    def from_env(
        cls, *, default_model_dir: Path, environ: Mapping[str, str] | None = None
    ) -> Settings:
        """Read every setting from the environment.

        Args:
            default_model_dir: ``MODEL_DIR`` when the variable is unset.
            environ: The environment to read; ``os.environ`` when omitted.

        Raises:
            ConfigError: A variable is set to a value that cannot be used; the message names it.
        """
        return read_env(
            cls,
            environ,
            defaults={"model_dir": default_model_dir, **machine_defaults()},
        )


_S = TypeVar("_S")


def read_env(
    cls: type[_S],
    environ: Mapping[str, str] | None = None,
    *,
    defaults: Mapping[str, Any] | None = None,
) -> _S:
    """Build the settings dataclass ``cls`` from the environment (``os.environ`` by default).

    Unset or empty variables take ``defaults[name]`` if given, else the field's default.

    Raises:
        ConfigError: A variable is set to a value that cannot be used; the message names it.
    """
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        var = f.metadata["env"]
        raw = env.get(var)
        if raw is None or raw == "":
            values[f.name] = (defaults or {}).get(f.name, f.default)
            continue
        try:
            values[f.name] = f.metadata["parse"](raw)
        except ValueError as exc:
            shown = "(not shown)" if f.metadata.get("secret") else repr(raw)
            raise ConfigError(f"{var}={shown} is invalid: {exc}") from None
    return cls(**values)


def documented_settings(cls: type[Any] | None = None) -> list[tuple[str, str, str]]:
    """(variable, default as shown in the docs, description) for every setting, in order."""
    rows = []
    for f in fields(cls or Settings):
        shown = f.metadata["shown_default"]
        if shown is None:
            shown = f"`{str(f.default).lower() if isinstance(f.default, bool) else f.default}`"
        rows.append((f.metadata["env"], shown, f.metadata["doc"]))
    return rows


def settings_table(cls: type[Any] | None = None) -> str:
    """A table of docs/configuration.md (of :class:`Settings` by default), as Markdown."""
    lines = ["| Variable | Default | What it does |", "|---|---|---|"]
    lines += [f"| `{var}` | {default} | {doc} |" for var, default, doc in documented_settings(cls)]
    return "\n".join(lines)
