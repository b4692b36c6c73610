"""monitoring.tf reads what the functions really log: its log-based metrics' filters and value
extractors, evaluated on the JSON lines real function processes print, select and extract what
a user of the dashboard expects; the uptime check's content matcher is in the real health body.

The lines come from a real HTTP function (a 200, a 422 and a 429) and a real batch service
(``sentiment_batch``) given two files through the storage emulator. Each line is turned into the
log entry Cloud Run's logging agent makes of it (its fields under ``jsonPayload``, the special
fields taken out: https://cloud.google.com/run/docs/logging#special-fields), and the filter
terms on ``jsonPayload`` are taken from monitoring.tf's text. The terms on resources
(``resource.labels.service_name``) are Terraform expressions; tests/monitoring.tftest.hcl checks
them.
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

from .helpers import REPO, start_server

pytestmark = pytest.mark.integration

MONITORING_TF = REPO / "infra" / "terraform" / "monitoring.tf"
# Fields the logging agent moves out of jsonPayload (message stays: jsonPayload.message).
SPECIAL = {
    "severity",
    "httpRequest",
    "time",
    "timestamp",
    "logging.googleapis.com/trace",
    "logging.googleapis.com/spanId",
    "logging.googleapis.com/trace_sampled",
    "logging.googleapis.com/insertId",
    "logging.googleapis.com/labels",
    "logging.googleapis.com/operation",
    "logging.googleapis.com/sourceLocation",
}


def _hcl_unescape(text: str) -> str:
    return text.replace('\\"', '"').replace("\\\\", "\\")


def _tf() -> str:
    return _hcl_unescape(MONITORING_TF.read_text(encoding="utf-8"))


def _block(text: str, start: str) -> str:
    """From ``start`` to the next top-level ``resource``/``variable`` (enough for one block)."""
    begin = text.index(start)
    end = re.compile(r"^(resource|variable|locals) ", re.M).search(text, begin + len(start))
    return text[begin : end.start() if end else len(text)]


def _terms(segment: str) -> list[tuple[str, str, str]]:
    """The ``jsonPayload`` terms of a filter: (field, operator, value)."""
    terms = [(f, "=", v) for f, v in re.findall(r'jsonPayload\.(\w+)="([^"]*)"', segment)] + [
        (f, "=~", v) for f, v in re.findall(r'jsonPayload\.(\w+)=~"([^"]*)"', segment)
    ]
    terms += [(f, ":*", "") for f in re.findall(r"jsonPayload\.(\w+):\*", segment)]
    return terms


def _selects(terms: list[tuple[str, str, str]], payload: dict[str, Any]) -> bool:
    for field, op, value in terms:
        if field not in payload:
            return False
        if op == "=" and str(payload[field]) != value:
            return False
        if op == "=~" and re.search(value, str(payload[field])) is None:
            return False
    return True


def _extract(extractor: str, payload: dict[str, Any]) -> float | None:
    """A log-based metric's value extractor (EXTRACT / REGEXP_EXTRACT) on a jsonPayload."""
    m = re.fullmatch(r"EXTRACT\(jsonPayload\.(\w+)\)", extractor)
    if m:
        value = payload.get(m.group(1))
        return None if value is None else float(value)
    m = re.fullmatch(r'REGEXP_EXTRACT\(jsonPayload\.(\w+), "(.*)"\)', extractor)
    assert m, f"unexpected extractor {extractor}"
    found = re.search(m.group(2), str(payload.get(m.group(1), "")))
    return None if found is None else float(found.group(1))


def _entries(log_path: Path) -> list[dict[str, Any]]:
    """The jsonPayloads Cloud Run's agent would make of the process's JSON lines."""
    out = []
    for raw in log_path.read_text(encoding="utf-8").splitlines():
        if raw.startswith("{"):
            line = json.loads(raw)
            out.append({k: v for k, v in line.items() if k not in SPECIAL})
    return out


def _call(url: str, data: bytes | None = None, headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(url, data=data, method="POST" if data else "GET")
    for key, value in (headers or {}).items():
        request.add_header(key, value)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return int(response.status)
    except urllib.error.HTTPError as err:
        return int(err.code)


@pytest.fixture(scope="module")
def http_lines(
    sentiment_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[list[dict[str, Any]], bytes]:
    """(request log entries of two 200s, a 422 and a 429, the health answer's body).

    The second 200 sends the first one's text again beside a new one: 2 texts, 1 from the cache.
    Its 2 units of rate limit, with 1 for each other request, spend the budget of 4 by the 429.
    """
    server = start_server(
        sentiment_model_dir, tmp_path_factory.mktemp("http"), RATE_LIMIT="4/minute"
    )
    url = server.url
    try:
        post = {"Content-Type": "application/json"}
        statuses = [
            _call(f"{url}/v1/analyze/sentiment", b'{"text": "I love it"}', post),
            _call(
                f"{url}/v1/analyze/sentiment",
                b'{"texts": ["I love it", "Broke after a day."]}',
                post,
            ),
            _call(f"{url}/v1/analyze/sentiment", b'{"text": ""}', post),
            _call(f"{url}/v1/analyze/sentiment", b'{"text": "again"}', post),
        ]
        assert statuses == [200, 200, 422, 429]
        with urllib.request.urlopen(f"{url}/v1/health", timeout=30) as response:
            health = response.read()
    finally:
        server.proc.terminate()
        server.proc.wait(timeout=30)
    return _entries(server.log_path), health


@pytest.fixture(scope="module")
def batch_lines(
    sentiment_model_dir: Path, storage_emulator: str, tmp_path_factory: pytest.TempPathFactory
) -> list[dict[str, Any]]:
    """Log entries of a batch service that processed two files with the same texts (the second
    from the cache), then got an event for its own output (ignored)."""
    os.environ["STORAGE_EMULATOR_HOST"] = storage_emulator
    from google.cloud import storage

    client = storage.Client(project="test")
    bucket_name = "aifn-monitoring-test"
    bucket = client.lookup_bucket(bucket_name) or client.create_bucket(bucket_name)
    folder = uuid.uuid4().hex[:8]
    server = start_server(
        sentiment_model_dir,
        tmp_path_factory.mktemp("batch"),
        target="sentiment_batch",
        STORAGE_EMULATOR_HOST=storage_emulator,
        BATCH_INPUT_PREFIX=f"{folder}/in/",
        BATCH_OUTPUT_PREFIX=f"{folder}/out/",
    )
    proc, url, log_path = server.proc, server.url, server.log_path
    lines = "\n".join(
        [
            json.dumps({"text": "Great value, works perfectly."}),
            json.dumps({"text": "Broke after a day."}),
            "{not json",
            json.dumps({"text": "It is blue."}),
        ]
    )
    try:
        for name in (f"{folder}/in/a.jsonl", f"{folder}/in/b.jsonl", f"{folder}/out/c.jsonl"):
            blob = bucket.blob(name)
            blob.upload_from_string(lines.encode())
            blob.reload()
            status = _call(
                url,
                json.dumps(
                    {"bucket": bucket_name, "name": name, "generation": str(blob.generation)}
                ).encode(),
                {
                    "Content-Type": "application/json",
                    "ce-id": uuid.uuid4().hex,
                    "ce-specversion": "1.0",
                    "ce-source": f"//storage.googleapis.com/projects/_/buckets/{bucket_name}",
                    "ce-type": "google.cloud.storage.object.v1.finalized",
                    "ce-subject": f"objects/{name}",
                },
            )
            assert status == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return _entries(log_path)


def test_the_error_metric_counts_each_error_answer_by_its_type(
    http_lines: tuple[list[dict[str, Any]], bytes],
) -> None:
    entries, _ = http_lines
    block = _block(_tf(), 'resource "google_logging_metric" "request_errors"')
    terms = _terms(block[block.index("filter") :].splitlines()[0])
    assert ("logger", "=", "aifn.request") in terms
    selected = [e for e in entries if _selects(terms, e)]
    requests = [e for e in entries if e.get("logger") == "aifn.request"]
    assert len(requests) >= 3  # the 200, the 422, the 429 (and the health check)
    extractor = re.search(r'error_type = "(.*)"', block)
    assert extractor is not None
    # Exactly the error answers, each labelled with the type the client saw.
    assert sorted(_extract_label(extractor.group(1), e) for e in selected) == [
        "invalid_request",
        "rate_limited",
    ]


def test_the_cache_hit_ratio_reads_each_answered_predictions_counts(
    http_lines: tuple[list[dict[str, Any]], bytes],
) -> None:
    entries, _ = http_lines
    text = _tf()
    block = _block(text, "http_prediction_filter = join(")
    terms = _terms(block[: block.index("])")])
    assert ("logger", "=", "aifn.request") in terms
    selected = [e for e in entries if _selects(terms, e)]
    http_values = text[text.index("http_values = {") : text.index("log_metric_prefix =")]
    extractors = dict(re.findall(r'(\w+)\s+= \{ extractor = "(.*?)", what', http_values))
    assert set(extractors) == {"texts", "cached"}
    values = [{k: _extract(extractors[k], e) for k in ("texts", "cached")} for e in selected]
    # Only the two answered predictions (not the 422, the 429 or health): 1 text, none cached;
    # then 2 texts, the repeated one from the cache. Over the two: 1 of 3 texts was a hit.
    assert values == [{"texts": 1, "cached": 0}, {"texts": 2, "cached": 1}]


def _extract_label(extractor: str, payload: dict[str, Any]) -> str:
    m = re.fullmatch(r"EXTRACT\(jsonPayload\.(\w+)\)", extractor)
    assert m, extractor
    return str(payload[m.group(1)])


def test_the_batch_metrics_read_each_processed_files_summary(
    batch_lines: list[dict[str, Any]],
) -> None:
    text = _tf()
    summary_filter = _block(text, "batch_summary_filter = join(")
    summary_filter = summary_filter[: summary_filter.index("])")]
    terms = _terms(summary_filter)
    assert ("logger", "=", "aifn.batch") in terms
    selected = [e for e in batch_lines if _selects(terms, e)]
    # Two files processed; the event for the service's own output is logged but not selected.
    assert any("ignored" in e["message"] for e in batch_lines)
    assert len(selected) == 2
    batch_values = text[text.index("batch_values = {") : text.index("http_prediction_filter")]
    extractors = dict(re.findall(r'(\w+)\s+= \{ extractor = "(.*?)", what', batch_values))
    assert set(extractors) == {"lines", "predictions", "line_errors", "cached"}
    values = [{k: _extract(x, e) for k, x in extractors.items()} for e in selected]
    # 4 lines each: 3 predicted, 1 error; the second file's 3 texts come from the cache.
    assert values == [
        {"lines": 4, "predictions": 3, "line_errors": 1, "cached": 0},
        {"lines": 4, "predictions": 3, "line_errors": 1, "cached": 3},
    ]


def test_every_json_payload_field_monitoring_reads_is_one_the_functions_log(
    http_lines: tuple[list[dict[str, Any]], bytes], batch_lines: list[dict[str, Any]]
) -> None:
    logged = {key for e in http_lines[0] + batch_lines for key in e}
    read = set(re.findall(r"jsonPayload\.(\w+)", _tf()))
    assert read
    assert read <= logged, f"monitoring.tf reads fields no function logs: {read - logged}"


def test_the_uptime_checks_content_matcher_is_in_the_real_health_answer(
    http_lines: tuple[list[dict[str, Any]], bytes],
) -> None:
    block = _block(_tf(), 'resource "google_monitoring_uptime_check_config" "health"')
    content = re.search(r'content = "(.*)"', block)
    assert content is not None
    assert 'matcher = "CONTAINS_STRING"' in block
    assert content.group(1) in http_lines[1].decode()
    assert 'path           = "/v1/health"' in block
