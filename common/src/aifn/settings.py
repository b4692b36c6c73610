"""One frozen settings object, read from the environment once at startup.

Every knob is declared once, here, with its variable name, default and purpose; the README's
configuration table is checked against :data:`SETTINGS` by the test suite so the two cannot drift.
Cloud Run's own variables (``PORT``, ``K_SERVICE``, ``K_REVISION``) are read where they are used,
never renamed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from aifn.errors import ConfigError


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"expected true/false, got {raw!r}")


def _setting(env: str, doc: str, default: Any = None, *, shown_default: str | None = None) -> Any:
    return field(default=default, metadata={"env": env, "doc": doc, "shown_default": shown_default})


@dataclass(frozen=True)
class Settings:
    """Settings shared by every function; build it with :meth:`from_env`."""

    model_dir: Path = _setting(
        "MODEL_DIR",
        "Directory of the prepared Hugging Face model the function serves. Read once at startup; "
        "the process exits with an error if it is missing or malformed.",
        shown_default="`models/<function>/` at the repository root",
    )
    max_body_bytes: int = _setting(
        "MAX_BODY_BYTES",
        "Largest request body accepted; larger bodies get 413 `payload_too_large` without being "
        "read.",
        1_048_576,
    )
    max_batch_texts: int = _setting(
        "MAX_BATCH_TEXTS",
        "Most texts in one `texts` request; more get 422 `too_many_texts`. Send bigger jobs in "
        "several requests.",
        64,
    )
    max_tokens: int = _setting(
        "MAX_TOKENS",
        "Texts longer than this many tokens are truncated (and the result says `truncated: true`). "
        "Capped by the model's own limit. Cost grows with it.",
        256,
    )
    inference_batch_size: int = _setting(
        "INFERENCE_BATCH_SIZE",
        "Texts per forward pass; a request's texts are sorted by length and run in chunks of this "
        "size.",
        32,
    )
    torch_threads: int = _setting(
        "TORCH_THREADS",
        "Intra-op threads for inference. One inference runs at a time per instance, so this "
        "should match the instance's vCPUs.",
        shown_default="the CPUs this process may use",
    )
    log_level: str = _setting(
        "LOG_LEVEL", "Lowest severity logged: DEBUG, INFO, WARNING or ERROR.", "INFO"
    )
    log_request_text: bool = _setting(
        "LOG_REQUEST_TEXT",
        "Log the texts of each request at DEBUG. Off by default: texts are user data.",
        False,
    )
    google_cloud_project: str | None = _setting(
        "GOOGLE_CLOUD_PROJECT",
        "Project id used to link log lines to Cloud Trace (`logging.googleapis.com/trace`). "
        "Terraform sets it.",
        shown_default="unset (trace ids are logged bare)",
    )

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
        env = os.environ if environ is None else environ
        defaults: dict[str, Any] = {
            "model_dir": default_model_dir,
            "torch_threads": _cpu_count(),
        }
        parsers: dict[str, Callable[[str], Any]] = {
            "model_dir": lambda raw: Path(raw).expanduser(),
            "max_body_bytes": _positive_int,
            "max_batch_texts": _positive_int,
            "max_tokens": _token_count,
            "inference_batch_size": _positive_int,
            "torch_threads": _positive_int,
            "log_level": _log_level,
            "log_request_text": _parse_bool,
            "google_cloud_project": lambda raw: raw.strip() or None,
        }
        values: dict[str, Any] = {}
        for f in fields(cls):
            var = f.metadata["env"]
            raw = env.get(var)
            if raw is None or raw == "":
                values[f.name] = defaults.get(f.name, f.default)
                continue
            try:
                values[f.name] = parsers[f.name](raw)
            except ValueError as exc:
                raise ConfigError(f"{var}={raw!r} is invalid: {exc}") from None
        return cls(**values)


def _positive_int(raw: str) -> int:
    value = int(raw.strip())
    if value < 1:
        raise ValueError("must be a positive integer")
    return value


def _token_count(raw: str) -> int:
    value = _positive_int(raw)
    if value < 8:
        raise ValueError("must be at least 8 tokens")
    return value


def _log_level(raw: str) -> str:
    value = raw.strip().upper()
    if value not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ValueError("must be DEBUG, INFO, WARNING or ERROR")
    return value


def documented_settings() -> list[tuple[str, str, str]]:
    """(variable, default as shown in the README, description) for every setting, in order."""
    rows = []
    for f in fields(Settings):
        shown = f.metadata["shown_default"]
        if shown is None:
            shown = f"`{str(f.default).lower() if isinstance(f.default, bool) else f.default}`"
        rows.append((f.metadata["env"], shown, f.metadata["doc"]))
    return rows


def settings_table() -> str:
    """The README's configuration table, as Markdown."""
    lines = ["| Variable | Default | What it does |", "|---|---|---|"]
    lines += [f"| `{var}` | {default} | {doc} |" for var, default, doc in documented_settings()]
    return "\n".join(lines)
