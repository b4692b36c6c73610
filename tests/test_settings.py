"""Unit tests: settings from the environment, and the docs' tables kept in sync with the code."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from aifn.core.errors import ConfigError
from aifn.http.errors import ERROR_TYPES, STATUS, errors_table
from aifn.settings import Rate, Settings, documented_settings, read_env, settings_table

from .helpers import REPO

DEFAULT_DIR = Path("/models/x")


def test_defaults_with_an_empty_environment() -> None:
    s = Settings.from_env(default_model_dir=DEFAULT_DIR, environ={})
    assert s.model_dir == DEFAULT_DIR
    assert s.max_body_bytes == 1_048_576
    assert s.max_batch_texts == 64
    assert s.max_tokens == 256
    assert s.intra_op_threads == 1
    assert s.quantize == "auto"
    assert s.model_workers >= 1
    assert s.log_request_text is False
    assert s.google_cloud_project is None


def test_every_variable_is_read() -> None:
    env = {
        "MODEL_DIR": "/srv/model",
        "MAX_BODY_BYTES": "2048",
        "MAX_BATCH_TEXTS": "8",
        "MAX_TOKENS": "64",
        "INFERENCE_BATCH_SIZE": "4",
        "BATCH_WAIT_MS": "2.5",
        "MAX_TEXT_CHARS": "300",
        "MAX_REQUEST_TOKENS": "512",
        "MAX_QUEUED_TEXTS": "40",
        "REQUEST_TIMEOUT_SECONDS": "12",
        "INTRA_OP_THREADS": "3",
        "MODEL_WORKERS": "2",
        "THREADS": "24",
        "QUANTIZE": "OFF",
        "LOG_LEVEL": "debug",
        "LOG_REQUEST_TEXT": "true",
        "GOOGLE_CLOUD_PROJECT": "my-proj",
        "METRICS": "off",
        "CACHE_MAX_ENTRIES": "500",
        "CACHE_TTL_SECONDS": "60",
        "CACHE_SCOPE": "shared",
        "REDIS_URL": "rediss://:pw@10.0.0.3:6378/0",
        "REDIS_HOST": "10.0.0.3",
        "REDIS_PORT": "6378",
        "REDIS_AUTH": "auth-string",
        "REDIS_CA_CERT": "/secrets/ca.pem",
        "REDIS_TIMEOUT_MS": "100",
        "REDIS_PROBE_SECONDS": "2.5",
        "RATE_LIMIT": "60/minute",
        "IAM_REQUIRED": "true",
        "FORWARDED_FOR_HOPS": "2",
        "RATE_LIMIT_IPV6_PREFIX": "48",
        "API_KEYS": "key-one-0123456789abcdef,key-two-0123456789abcdef",
    }
    s = Settings.from_env(default_model_dir=DEFAULT_DIR, environ=env)
    assert s == Settings(
        model_dir=Path("/srv/model"),
        max_body_bytes=2048,
        max_batch_texts=8,
        max_tokens=64,
        inference_batch_size=4,
        batch_wait_ms=2.5,
        max_text_chars=300,
        max_request_tokens=512,
        max_queued_texts=40,
        request_timeout_seconds=12.0,
        intra_op_threads=3,
        model_workers=2,
        threads=24,
        quantize="off",
        log_level="DEBUG",
        log_request_text=True,
        google_cloud_project="my-proj",
        metrics=False,
        cache_max_entries=500,
        cache_ttl_seconds=60,
        cache_scope="shared",
        redis_url="rediss://:pw@10.0.0.3:6378/0",
        redis_host="10.0.0.3",
        redis_port=6378,
        redis_auth="auth-string",
        redis_ca_cert="/secrets/ca.pem",
        redis_timeout_ms=100,
        redis_probe_seconds=2.5,
        rate_limit=Rate(60, 60.0),
        iam_required=True,
        forwarded_for_hops=2,
        rate_limit_ipv6_prefix=48,
        api_keys=("key-one-0123456789abcdef", "key-two-0123456789abcdef"),
    )
    # Every documented variable appears in this test, so a new knob cannot go untested.
    assert {var for var, _, _ in documented_settings()} == set(env)


def test_max_text_chars_follows_max_tokens_unless_set() -> None:
    assert Settings.from_env(default_model_dir=DEFAULT_DIR, environ={}).max_text_chars == 2048
    env = {"MAX_TOKENS": "128"}
    assert Settings.from_env(default_model_dir=DEFAULT_DIR, environ=env).max_text_chars == 1024


def test_empty_values_mean_default() -> None:
    s = Settings.from_env(default_model_dir=DEFAULT_DIR, environ={"MAX_BATCH_TEXTS": ""})
    assert s.max_batch_texts == 64


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("MAX_BATCH_TEXTS", "0"),
        ("MAX_BATCH_TEXTS", "many"),
        ("MAX_BODY_BYTES", "-1"),
        ("MAX_TOKENS", "4"),
        ("LOG_LEVEL", "LOUD"),
        ("LOG_REQUEST_TEXT", "maybe"),
        ("INTRA_OP_THREADS", "1.5"),
        ("MODEL_WORKERS", "0"),
        ("THREADS", "0"),
        ("QUANTIZE", "int4"),
        ("QUANTIZE", "int8"),
    ],
)
def test_invalid_values_name_the_variable(var: str, value: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{var}={value!r} is invalid"):
        Settings.from_env(default_model_dir=DEFAULT_DIR, environ={var: value})


def test_settings_are_frozen() -> None:
    s = Settings.from_env(default_model_dir=DEFAULT_DIR, environ={})
    with pytest.raises(AttributeError):
        s.max_tokens = 3  # type: ignore[misc]


# The reference tables live in the docs site; `make docs-tables` refreshes them (docs/hooks.py).
CONFIGURATION_DOC = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
API_DOC = (REPO / "docs" / "api.md").read_text(encoding="utf-8")


def test_docs_configuration_table_matches_the_code() -> None:
    assert settings_table() in CONFIGURATION_DOC, (
        "docs/configuration.md's settings table is stale: run `make docs-tables`"
    )


def test_docs_classify_settings_table_matches_the_code() -> None:
    sys.path.insert(0, str(REPO / "functions" / "classify"))
    from classify_settings import ClassifySettings

    assert settings_table(ClassifySettings) in CONFIGURATION_DOC, (
        "docs/configuration.md's classify settings table is stale: run `make docs-tables`"
    )


def test_classify_settings_are_validated() -> None:
    sys.path.insert(0, str(REPO / "functions" / "classify"))
    from classify_settings import ClassifySettings

    s = read_env(ClassifySettings, {"MAX_LABELS": "7", "ZERO_SHOT_TEMPLATE": "Topic: {label}"})
    assert (s.max_labels, s.zero_shot_template) == (7, "Topic: {label}")
    assert read_env(ClassifySettings, {}).multi_label_threshold == 0.5
    for var, value in [
        ("MAX_LABELS", "1"),
        ("ZERO_SHOT_TEMPLATE", "no placeholder"),
        ("MULTI_LABEL_THRESHOLD", "1.5"),
        ("LABEL_CACHE_SIZE", "0"),
    ]:
        with pytest.raises(ConfigError, match=var):
            read_env(ClassifySettings, {var: value})


def test_docs_error_table_matches_the_code() -> None:
    assert errors_table() in API_DOC, "docs/api.md's error table is stale: run `make docs-tables`"


def test_error_types_are_unique_and_client_errors_are_4xx() -> None:
    types = [e.type for e in ERROR_TYPES]
    assert len(types) == len(set(types))
    for e in ERROR_TYPES:
        assert re.fullmatch(r"[a-z_]+", e.type)
        assert 400 <= STATUS[e] < 600
