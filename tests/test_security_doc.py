"""SECURITY.md exists, says how to report a problem, and covers every setting guarding callers."""

from __future__ import annotations

from dataclasses import fields

from aifn.settings import Settings

from .helpers import REPO

SECURITY = (REPO / "SECURITY.md").read_text(encoding="utf-8")
README = (REPO / "README.md").read_text(encoding="utf-8")
SECURITY_PAGE = (REPO / "docs" / "security.md").read_text(encoding="utf-8")

# The settings that decide who may call, who a caller is, and what one caller may learn or use.
GUARDS = (
    "API_KEYS",
    "IAM_REQUIRED",
    "RATE_LIMIT",
    "RATE_LIMIT_IPV6_PREFIX",
    "FORWARDED_FOR_HOPS",
    "CACHE_SCOPE",
    "REDIS_CA_CERT",
    "MAX_BODY_BYTES",
    "MAX_BATCH_TEXTS",
)


def test_security_md_has_a_threat_model_and_a_way_to_report() -> None:
    for heading in ("## Reporting a problem", "## Who may call", "## What each setting protects"):
        assert heading in SECURITY
    assert "## Out of scope" in SECURITY


def test_every_guarding_setting_is_real_and_explained() -> None:
    declared = {f.metadata["env"] for f in fields(Settings)}
    for var in GUARDS:
        assert var in declared, f"{var} is not a setting any more: update SECURITY.md"
        assert f"`{var}`" in SECURITY, f"SECURITY.md does not explain {var}"


def test_readme_and_the_security_page_point_to_it() -> None:
    assert "(SECURITY.md)" in README
    assert "(../SECURITY.md)" in SECURITY_PAGE
