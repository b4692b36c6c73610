"""GET /metrics on a real gunicorn server: known traffic moves each metric by exactly that much.

The last two tests are unit tests of the registry and the batcher's hook (no model).
"""

from __future__ import annotations

import subprocess
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from openapi_spec_validator import validate as validate_openapi
from prometheus_client.parser import text_string_to_metric_families

from aifn.core.batcher import DynamicBatcher
from aifn.http.metrics import Metrics

from .helpers import Recorder, Server, hold, served_revision, start_server

ENDPOINT = "/v1/analyze/sentiment"
# Labels -> value, per sample name.
Samples = dict[str, dict[frozenset[tuple[str, str]], float]]


def scrape(server: Server) -> tuple[Samples, str, str]:
    """(samples, raw text, Content-Type) of one GET /metrics."""
    with urllib.request.urlopen(server.url + "/metrics", timeout=30) as resp:
        text = resp.read().decode("utf-8")
        content_type = resp.headers["Content-Type"]
    return parse(text), text, content_type


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, {})[frozenset(s.labels.items())] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """A sample's value; 0 for a series that does not exist yet."""
    return samples.get(name, {}).get(frozenset(labels.items()), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def unique(n: int) -> list[str]:
    """Texts no request has sent before, so the cache cannot answer them."""
    tag = uuid.uuid4().hex[:8]
    return [f"Order {tag}-{i}: the parcel came on time and works well." for i in range(n)]


@pytest.fixture(scope="module")
def servers(
    sentiment_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Server]]:
    """One server with metrics (a small queue, so overload is easy to cause) and one without.

    Started side by side: loading the model is most of a start.
    """
    configs = {
        "on": {"MAX_QUEUED_TEXTS": "4", "THREADS": "32", "MODEL_WORKERS": "2"},
        "off": {"METRICS": "off"},
    }
    with ThreadPoolExecutor(2) as pool:
        futures = {
            name: pool.submit(
                start_server, sentiment_model_dir, tmp_path_factory.mktemp(name), **env
            )
            for name, env in configs.items()
        }
    started: dict[str, Server] = {}
    failures = []
    for name, future in futures.items():
        try:
            started[name] = future.result()
        except Exception as exc:  # stop the other one before failing
            failures.append(exc)
    try:
        if failures:
            raise failures[0]
        yield started
    finally:
        for server in started.values():  # stop both, then wait: each takes seconds
            server.proc.terminate()
        for server in started.values():
            try:
                server.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:  # a busy machine; not what these tests are about
                server.proc.kill()
                server.proc.wait(timeout=10)


@pytest.mark.integration
def test_known_traffic_moves_every_counter_by_exactly_that(servers: dict[str, Server]) -> None:
    server = servers["on"]
    before, _, _ = scrape(server)
    took: list[float] = []  # each request's Server-Timing, in seconds
    for text in unique(3):
        status, _, headers = server.request("POST", ENDPOINT, {"text": text})
        assert status == 200
        took.append(float(headers["Server-Timing"].removeprefix("app;dur=")) / 1000)
    status, body, headers = server.request("POST", ENDPOINT, {"texts": []})
    assert (status, body["error"]["type"]) == (422, "invalid_request")
    took.append(float(headers["Server-Timing"].removeprefix("app;dur=")) / 1000)
    status, _, headers = server.request("POST", ENDPOINT, {"texts": unique(6)})
    assert status == 200
    took.append(float(headers["Server-Timing"].removeprefix("app;dur=")) / 1000)
    after, _, _ = scrape(server)

    route = {"route": ENDPOINT}
    post = {**route, "method": "POST"}
    assert delta(before, after, "aifn_http_requests_total", **post, status="200") == 4
    assert delta(before, after, "aifn_http_requests_total", **post, status="422") == 1
    assert delta(before, after, "aifn_rejections_total", reason="invalid_request") == 1
    assert delta(before, after, "aifn_http_request_duration_seconds_count", **route) == 5
    # The histogram holds the same times the clients were told in Server-Timing.
    assert delta(before, after, "aifn_http_request_duration_seconds_sum", **route) == (
        pytest.approx(sum(took), abs=1e-5)
    )
    # Three model calls of one text, and the six texts shared out as three per model worker
    # (MODEL_WORKERS=2); the bad request never reached the model.
    assert delta(before, after, "aifn_batch_size_texts_count") == 5
    assert delta(before, after, "aifn_batch_size_texts_sum") == 9
    assert delta(before, after, "aifn_batch_size_texts_bucket", le="1.0") == 3
    assert delta(before, after, "aifn_batch_size_texts_bucket", le="2.0") == 3
    assert delta(before, after, "aifn_batch_size_texts_bucket", le="4.0") == 5
    assert delta(before, after, "aifn_inference_seconds_count") == 5
    # Model time fits inside the requests' times, each worker's own (two ran the six at once).
    assert 0 < delta(before, after, "aifn_inference_seconds_sum") < 2 * sum(took)
    assert delta(before, after, "aifn_cache_misses_total") == 9
    assert delta(before, after, "aifn_cache_hits_total") == 0


@pytest.mark.integration
def test_a_repeated_text_is_counted_as_a_cache_hit(servers: dict[str, Server]) -> None:
    server = servers["on"]
    [text] = unique(1)
    assert server.request("POST", ENDPOINT, {"text": text})[0] == 200
    before, _, _ = scrape(server)
    status, body, _ = server.request("POST", ENDPOINT, {"text": text})
    assert status == 200
    assert body["results"][0]["cached"] is True
    after, _, _ = scrape(server)
    assert delta(before, after, "aifn_cache_hits_total") == 1
    assert delta(before, after, "aifn_cache_misses_total") == 0
    assert delta(before, after, "aifn_batch_size_texts_count") == 0  # the model did not run


@pytest.mark.integration
def test_queue_depth_model_identity_and_text_format(
    servers: dict[str, Server], sentiment_model_dir: Path
) -> None:
    health = servers["on"].request("GET", "/v1/health")[1]
    samples, text, content_type = scrape(servers["on"])
    assert content_type.startswith("text/plain; version=")
    assert value(samples, "aifn_queue_texts") == 0  # idle
    assert "# TYPE aifn_queue_texts gauge" in text
    [labels] = samples["aifn_model_info"]
    assert dict(labels) == {
        "function": "sentiment",
        "kind": "classifier",
        "name": health["model"]["name"],
        "revision": served_revision(sentiment_model_dir),
    }
    assert value(samples, "aifn_cache_circuit_open") == 0
    # The serving worker's own process (gunicorn forks it from the master that loaded the app).
    assert value(samples, "process_resident_memory_bytes") > 50_000_000


@pytest.mark.integration
def test_unknown_paths_share_one_label(servers: dict[str, Server]) -> None:
    server = servers["on"]
    server.request("GET", "/no-such-page")  # the "unmatched" series exists from here on
    before, _, _ = scrape(server)
    tags = [uuid.uuid4().hex for _ in range(3)]
    assert server.request("GET", f"/{tags[0]}")[0] == 404
    assert server.request("GET", f"/v1/{tags[1]}/x")[0] == 404
    assert server.request("POST", f"/{tags[2]}", {"text": "hi"})[0] == 404
    after, text, _ = scrape(server)
    routes = {dict(labels)["route"] for labels in after["aifn_http_requests_total"]}
    assert routes == {dict(labels)["route"] for labels in before["aifn_http_requests_total"]}
    assert routes <= {ENDPOINT, "/v1/health", "/openapi.json", "/metrics", "unmatched"}
    assert not any(tag in text for tag in tags)
    unmatched = {"route": "unmatched", "status": "404"}
    assert delta(before, after, "aifn_http_requests_total", **unmatched, method="GET") == 2
    assert delta(before, after, "aifn_http_requests_total", **unmatched, method="POST") == 1
    assert delta(before, after, "aifn_rejections_total", reason="not_found") == 3


@pytest.mark.integration
def test_overload_refusals_are_counted_by_error_type(servers: dict[str, Server]) -> None:
    server = servers["on"]  # MAX_QUEUED_TEXTS=4
    tag = uuid.uuid4().hex[:8]

    def send(i: int) -> int:
        # Distinct long texts: identical ones would wait on each other (single-flight).
        body = {"texts": [f"{tag} review {i}: " + "word " * 200, f"{tag} note {i}: " + "ok " * 90]}
        return server.request("POST", ENDPOINT, body)[0]

    before, _, _ = scrape(server)
    with ThreadPoolExecutor(24) as pool:
        statuses = Counter(pool.map(send, range(48)))
    after, _, _ = scrape(server)
    assert set(statuses) == {200, 429}, statuses
    route = {"route": ENDPOINT, "method": "POST"}
    assert delta(before, after, "aifn_rejections_total", reason="overloaded") == statuses[429]
    assert delta(before, after, "aifn_http_requests_total", **route, status="429") == statuses[429]
    assert delta(before, after, "aifn_http_requests_total", **route, status="200") == statuses[200]
    assert delta(before, after, "aifn_batch_size_texts_sum") == 2 * statuses[200]


@pytest.mark.integration
def test_the_openapi_document_describes_metrics_as_text(servers: dict[str, Server]) -> None:
    status, document, _ = servers["on"].request("GET", "/openapi.json")
    assert status == 200
    validate_openapi(document)
    response = document["paths"]["/metrics"]["get"]["responses"]["200"]
    assert response["content"] == {"text/plain": {"schema": {"type": "string"}}}


@pytest.mark.integration
def test_metrics_off_means_no_endpoint(servers: dict[str, Server]) -> None:
    server = servers["off"]
    assert server.request("POST", ENDPOINT, {"text": "Works fine."})[0] == 200
    status, body, _ = server.request("GET", "/metrics")
    assert (status, body["error"]["type"]) == (404, "not_found")
    assert "/metrics" not in server.request("GET", "/openapi.json")[1]["paths"]


def test_two_registries_in_one_process_do_not_clash() -> None:
    # prometheus-client's global registry would refuse the second set of names.
    first, second = Metrics("sentiment"), Metrics("classify")
    first.observe_request(route="/a", method="GET", status=200, seconds=0.01, error_type=None)
    first.observe_request(route="/a", method="BREW", status=405, seconds=0.01, error_type="x")
    assert 'aifn_http_requests_total{method="GET",route="/a",status="200"} 1.0' in (
        first.render().decode()
    )
    assert 'method="other"' in first.render().decode()  # methods are a bounded label too
    assert "aifn_http_requests_total{" not in second.render().decode()


def test_every_model_run_is_a_batch_observation_failed_ones_included() -> None:
    metrics = Metrics("sentiment")
    model = Recorder()
    batcher = DynamicBatcher(
        model,
        max_batch=8,
        max_wait=0.0,
        max_queued=64,
        timeout=10.0,
        on_batch=metrics.observe_batch,
    )
    holder = hold(model, batcher)  # one run of 1 text, held until the others queue
    with ThreadPoolExecutor(2) as pool:
        good = pool.submit(batcher, ["fine", "also fine"])
        bad = pool.submit(batcher, ["poison pill"])
        time.sleep(0.2)
        model.gate.set()
        assert good.result(10) == ["FINE", "ALSO FINE"]
        with pytest.raises(ValueError, match="poison"):
            bad.result(10)
    holder.join(5)
    # The holder (1), the merged batch that failed (3), then each request alone (2, 1).
    assert sorted(len(b) for b in model.batches) == [1, 1, 2, 3]
    samples = parse(metrics.render().decode())
    assert value(samples, "aifn_batch_size_texts_count") == 4
    assert value(samples, "aifn_batch_size_texts_sum") == 7
    assert value(samples, "aifn_inference_seconds_count") == 4
    assert value(samples, "aifn_inference_seconds_sum") >= 0.2  # the held run took that long
