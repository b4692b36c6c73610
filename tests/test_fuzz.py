"""Fuzzing each function's HTTP API with schemathesis, against a real server process.

For each function: start it (functions-framework, shipped settings), fetch its own
``GET /openapi.json`` and run schemathesis's engine (what ``st run`` runs) over every operation
the document lists: the examples, coverage (boundary and invalid values) and fuzzing phases, with
schema-valid and invalid inputs, and every default check: no 5xx, status codes, content types and
bodies as documented, valid requests accepted, invalid ones rejected, 405s with ``Allow``.

The run is reproducible (fixed seed, derandomized, no example database). The test counts the
requests actually sent and fails below ``MIN_CASES`` per function.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import jsonschema_rs
import pytest
import schemathesis
from schemathesis.engine import StopReason, events, from_schema

from aifn.core.errors import InvalidRequest
from aifn.core.validation import check_string, fold
from aifn.http.openapi import COMPONENTS

from .helpers import CLASSIFY_MODEL, REPO, SENTIMENT_MODEL, Server, start_server

MODELS = {"sentiment": SENTIMENT_MODEL, "classify": CLASSIFY_MODEL}
MIN_CASES = 1000
# Fuzzing-phase examples per operation. Operations without inputs (the GETs) stop after a few;
# the POST endpoint takes nearly all, and the coverage phase adds its own cases on top.
MAX_EXAMPLES = 1000
SEED = 20261127


@dataclass(frozen=True)
class Target:
    function: str
    server: Server


@pytest.fixture(scope="module", params=sorted(MODELS))
def target(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Target]:
    """One function's real server process, with the settings it ships with."""
    function = str(request.param)
    model_dir = MODELS[function]
    if not (model_dir / "config.json").is_file():
        pytest.fail(f"{model_dir} is not prepared: run `make model` (make test does)")
    srv = start_server(model_dir, tmp_path_factory.mktemp(f"fuzz-{function}"), function=function)
    yield Target(function, srv)
    if srv.proc.poll() is None:
        srv.proc.kill()
        srv.proc.wait()


def load_schema(url: str) -> schemathesis.BaseSchema:
    """The function's own document, as it serves it, with the run's settings.

    Loaded from the fetched dict rather than ``from_url``: schemathesis leaves out the operation
    that served the document, and ``GET /openapi.json`` is part of the API too.
    """
    with urllib.request.urlopen(f"{url}/openapi.json", timeout=30) as resp:
        document = json.loads(resp.read())
    config = schemathesis.Config.from_dict(
        {
            "seed": SEED,
            "base-url": url,
            "cache": {"enabled": False},
            # Report every distinct failure, not only each operation's first.
            "continue-on-failure": True,
            # Long generated texts on a busy 2-core machine; a timeout is still an error.
            "request-timeout": 60,
            "generation": {
                "mode": "all",
                "max-examples": MAX_EXAMPLES,
                "deterministic": True,
                "database": "none",
            },
            "checks": {"enabled": True},
        }
    )
    schema = schemathesis.openapi.from_dict(document, config=config)
    schema.hook("map_case")(_classify_cross_field_rules)
    return schema


def _classify_cross_field_rules(
    context: schemathesis.HookContext, case: schemathesis.Case[Any]
) -> schemathesis.Case[Any]:
    """Make a schema-valid classify request obey the two rules JSON Schema cannot state.

    The document says them in prose: labels are unique ignoring case, Unicode normalisation and
    surrounding spaces (``fold``), and
    `descriptions` keys must be labels. A valid case that breaks them would be a false "valid data
    rejected"; every other valid case is sent as generated.
    """
    meta = case.meta
    body = case.body
    if (
        context.operation is None
        or context.operation.path != "/v1/classify"
        or meta is None
        or not meta.generation.mode.is_positive
        or not isinstance(body, dict)
    ):
        return case
    labels, descriptions = body.get("labels"), body.get("descriptions")
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        return case
    seen: set[str] = set()
    unique: list[str] = []
    for i, label in enumerate(labels):
        assert isinstance(label, str)
        candidate, n = label, 0
        while fold(candidate) in seen:
            n += 1
            candidate = f"label {i}.{n}"
        seen.add(fold(candidate))
        unique.append(candidate)
    body["labels"] = list(unique)
    if isinstance(descriptions, dict):
        body["descriptions"] = dict(zip(unique, descriptions.values(), strict=False))
    return case


@dataclass
class Run:
    """What one engine run sent and found."""

    by_mode: Counter[str] = field(default_factory=Counter)
    by_operation: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    error_types: Counter[str] = field(default_factory=Counter)
    failures: dict[tuple[str, str, str], str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    stop_reason: StopReason | None = None
    seconds: float = 0.0

    @property
    def sent(self) -> int:
        return sum(self.by_mode.values())


def fuzz(schema: schemathesis.BaseSchema) -> Run:
    run = Run()
    started = time.perf_counter()
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            record(run, event)
        elif isinstance(event, events.NonFatalError):
            run.errors.append(f"{event.label}: {event.info.format()}")
        elif isinstance(event, events.FatalError):
            raise event.exception
        elif isinstance(event, events.EngineFinished):
            run.stop_reason = event.stop_reason
    run.seconds = time.perf_counter() - started
    return run


def record(run: Run, event: events.ScenarioFinished) -> None:
    recorder = event.recorder
    for case_id, interaction in recorder.interactions.items():
        meta = recorder.cases[case_id].value.meta
        run.by_mode[str(meta.generation.mode) if meta is not None else "unknown"] += 1
        run.by_operation[recorder.label] += 1
        if interaction.response is not None:
            run.statuses[interaction.response.status_code] += 1
            if interaction.response.status_code >= 400:
                run.error_types[error_type(interaction.response.content)] += 1
    for case_id, checks in recorder.checks.items():
        for check in checks:
            if check.failure_info is None:
                continue
            response = recorder.interactions[case_id].response
            status = "no response" if response is None else str(response.status_code)
            key = (recorder.label, check.name, status)
            if key not in run.failures:
                failure = check.failure_info.failure
                answer = "" if response is None else response.content[:300].decode(errors="replace")
                run.failures[key] = (
                    f"{recorder.label}: {check.name}: {failure.title}\n{failure.message}\n"
                    f"answer {status}: {answer}\n{check.failure_info.code_sample}"
                )


def error_type(content: bytes) -> str:
    """The ``error.type`` of one of our error bodies (the schema check validates the rest)."""
    try:
        return str(json.loads(content)["error"]["type"])
    except (ValueError, KeyError, TypeError):
        return "not our error body"


@pytest.mark.integration
@pytest.mark.slow
def test_every_generated_request_gets_a_documented_answer(target: Target) -> None:
    server = target.server
    schema = load_schema(server.url)
    run = fuzz(schema)

    figures = {
        "cases": run.sent,
        "by_mode": dict(run.by_mode),
        "by_operation": dict(run.by_operation),
        "statuses": dict(sorted(run.statuses.items())),
        "error_types": dict(run.error_types.most_common()),
        "seconds": round(run.seconds, 1),
    }
    print(f"\nfigures fuzz-{target.function}: {json.dumps(figures)}")
    assert not run.errors, "\n\n".join(run.errors)
    assert not run.failures, f"{len(run.failures)} distinct failures:\n\n" + "\n\n".join(
        run.failures.values()
    )
    assert run.stop_reason is StopReason.COMPLETED
    assert run.sent >= MIN_CASES, figures
    # Both kinds of input went out, and every documented operation was exercised.
    assert run.by_mode["negative"] >= MIN_CASES // 10, figures
    assert run.by_mode["positive"] >= MIN_CASES // 10, figures
    paths = schema.raw_schema["paths"]
    documented = {f"{method.upper()} {path}" for path, item in paths.items() for method in item}
    assert documented <= set(run.by_operation), figures
    # Valid requests reached the model and answered 200; invalid ones got 4xx, never 5xx.
    assert run.statuses[200] >= MIN_CASES // 10, figures
    assert not [s for s in run.statuses if s >= 500], figures
    # The server is still up and healthy after all of it.
    assert server.request("GET", "/v1/health")[0] == 200
    assert server.proc.poll() is None


def test_the_document_text_rule_is_the_server_rule() -> None:
    """The document's `Text` schema, read as JSON Schema tools read it, is `check_string`.

    Every character of the Basic Multilingual Plane alone, repeated, and around a letter. The
    fuzz test found the two disagreeing (NUL, blank texts); generated texts hit few of these.
    """
    validator = jsonschema_rs.validator_for(COMPONENTS["Text"])
    disagree = []
    for code in range(0x10000):
        if 0xD800 <= code <= 0xDFFF:  # surrogates: no valid UTF-8 text holds one
            continue
        char = chr(code)
        for text in (char, char * 3, f"a{char}", f"{char}a{char}"):
            try:
                check_string(text, "text")
                accepted = True
            except InvalidRequest:
                accepted = False
            if validator.is_valid(text) != accepted:
                disagree.append(text)
    assert not disagree, [f"U+{ord(t[-1]):04X} in {t!r}" for t in disagree[:20]]


def test_every_function_is_fuzzed() -> None:
    served = {p.name for p in (REPO / "functions").iterdir() if (p / "main.py").is_file()}
    assert set(MODELS) == served
