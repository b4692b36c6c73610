"""Integration tests: batch files through the real sentiment model and a real Cloud Storage client.

The function is loaded as Cloud Run's batch service runs it: functions-framework's ``create_app``
with ``target=sentiment_batch`` and the ``cloudevent`` signature. Files are uploaded with the real
google-cloud-storage client to ``gcp-storage-emulator`` (started by the ``storage_emulator``
fixture), and the "object finalized" event Eventarc would send is POSTed to the function as a
binary-mode CloudEvent. Eventarc itself is not exercised.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from aifn.core.cache import PredictionCache
from aifn.core.errors import Overloaded
from aifn.files import engine as batch_engine
from aifn.files import processor as batch
from aifn.files.processor import FINALIZED, Shard
from aifn.files.storage import Location

from .helpers import function_app

pytestmark = pytest.mark.integration

BUCKET = "aifn-batch-test"


@pytest.fixture(autouse=True)
def _emulator_env(storage_emulator: str) -> None:
    os.environ["STORAGE_EMULATOR_HOST"] = storage_emulator


@pytest.fixture(scope="module")
def bucket(storage_emulator: str) -> Any:
    os.environ["STORAGE_EMULATOR_HOST"] = storage_emulator
    from google.cloud import storage

    client = storage.Client(project="test")
    return client.lookup_bucket(BUCKET) or client.create_bucket(BUCKET)


@pytest.fixture(scope="module")
def app(sentiment_model_dir: Path, storage_emulator: str) -> tuple[Any, Any]:
    """(test client of the sentiment_batch CloudEvent app, its main module)."""
    return function_app(
        "sentiment",
        sentiment_model_dir,
        target="sentiment_batch",
        signature_type="cloudevent",
        STORAGE_EMULATOR_HOST=storage_emulator,
        BATCH_CHUNK_SIZE="64",
    )


@pytest.fixture
def client(app: tuple[Any, Any]) -> Any:
    return app[0]


@pytest.fixture
def main(app: tuple[Any, Any]) -> Any:
    return app[1]


@pytest.fixture
def folder() -> str:
    """A fresh folder name, so tests never see each other's objects."""
    return uuid.uuid4().hex[:8]


def upload(bucket: Any, name: str, content: str) -> Any:
    blob = bucket.blob(name)
    blob.upload_from_string(content.encode("utf-8"))
    blob.reload()
    return blob


def deliver(
    client: Any,
    blob: Any,
    *,
    event_id: str | None = None,
    kind: str = FINALIZED,
    data: dict[str, Any] | None = None,
    status: int = 200,
) -> Any:
    """POST the CloudEvent Eventarc sends for a finalized object (binary content mode).

    ``data`` replaces the event's payload; ``status`` is the answer expected (200: acknowledged;
    a 5xx makes Eventarc deliver the event again).
    """
    if data is None:
        data = {
            "bucket": blob.bucket.name,
            "name": blob.name,
            "generation": str(blob.generation),
            "metageneration": "1",
            "size": str(blob.size),
            "contentType": "application/octet-stream",
        }
    response = client.post(
        "/",
        json=data,
        headers={
            "ce-id": event_id or uuid.uuid4().hex,
            "ce-specversion": "1.0",
            "ce-source": f"//storage.googleapis.com/projects/_/buckets/{data.get('bucket')}",
            "ce-type": kind,
            "ce-subject": f"objects/{data.get('name')}",
            "ce-time": "2026-11-27T00:00:00Z",
        },
    )
    assert response.status_code == status, response.get_data(as_text=True)
    return response


def read(bucket: Any, name: str) -> list[dict[str, Any]]:
    blob = bucket.get_blob(name)
    assert blob is not None, f"{name} was not written"
    return [json.loads(line) for line in blob.download_as_text().splitlines()]


def names(bucket: Any, prefix: str) -> list[str]:
    return sorted(b.name for b in bucket.client.list_blobs(bucket.name, prefix=prefix))


TICKETS = [
    ("t-1", "I love the new dashboard, it is fantastic."),
    ("t-2", "Still waiting for a refund after three weeks, this is awful."),
    ("t-3", "The invoice is attached."),
]


def test_jsonl_event_writes_predictions_and_errors(client: Any, bucket: Any, folder: str) -> None:
    lines = [json.dumps({"id": i, "text": t}) for i, t in TICKETS]
    lines.insert(1, "{broken json")
    lines.append(json.dumps({"text": "No id on this one, but it is great."}))
    lines.append(json.dumps({"id": "t-9", "text": ""}))
    blob = upload(bucket, f"inputs/{folder}/tickets.jsonl", "\n".join(lines) + "\n")

    deliver(client, blob)

    predictions = read(bucket, f"predictions/{folder}/tickets.jsonl.predictions.jsonl")
    assert [(p["id"], p["line"]) for p in predictions] == [
        ("t-1", 1),
        ("t-2", 3),
        ("t-3", 4),
        (5, 5),  # no id: the line number
    ]
    assert [p["label"] for p in predictions] == ["POSITIVE", "NEGATIVE", "NEUTRAL", "POSITIVE"]
    for p in predictions:
        assert p["labels"][0]["label"] == p["label"]
        assert abs(sum(lbl["score"] for lbl in p["labels"]) - 1) < 1e-4
    errors = read(bucket, f"predictions/{folder}/tickets.jsonl.errors.jsonl")
    assert [(e["line"], e["id"]) for e in errors] == [(2, None), (6, "t-9")]
    assert errors[0]["error"].startswith("not valid JSON")
    meta = bucket.get_blob(f"predictions/{folder}/tickets.jsonl.predictions.jsonl").metadata
    assert meta["aifn-source"] == f"gs://{BUCKET}/inputs/{folder}/tickets.jsonl"
    assert meta["aifn-source-generation"] == str(blob.generation)
    assert (meta["aifn-records"], meta["aifn-predictions"], meta["aifn-errors"]) == ("6", "4", "2")
    assert meta["aifn-model"] == "aifn-sentiment-minilm-vader"


def test_csv_event_with_ids_and_poison_rows(client: Any, bucket: Any, folder: str) -> None:
    content = (
        "id,text,channel\n"
        + "".join(f'{i},"{t}",email\n' for i, t in TICKETS)
        + "t-4,,chat\n"
        + "t-5,one,too,many\n"
        + '"t-6","Great, ""quoted"" and\nmultiline support reply",chat\n'
    )
    blob = upload(bucket, f"inputs/{folder}/export.csv", content)

    deliver(client, blob)

    predictions = read(bucket, f"predictions/{folder}/export.csv.predictions.jsonl")
    assert [(p["id"], p["line"]) for p in predictions] == [
        ("t-1", 2),
        ("t-2", 3),
        ("t-3", 4),
        ("t-6", 7),
    ]
    assert [p["label"] for p in predictions[:3]] == ["POSITIVE", "NEGATIVE", "NEUTRAL"]
    errors = read(bucket, f"predictions/{folder}/export.csv.errors.jsonl")
    assert [(e["id"], e["line"]) for e in errors] == [("t-4", 5), (None, 6)]


def test_redelivered_event_changes_nothing(
    client: Any, main: Any, bucket: Any, folder: str
) -> None:
    lines = [json.dumps({"id": i, "text": t}) for i, t in TICKETS] + ["oops"]
    blob = upload(bucket, f"inputs/{folder}/again.jsonl", "\n".join(lines) + "\n")
    deliver(client, blob, event_id="evt-1")
    out = f"predictions/{folder}/again.jsonl.predictions.jsonl"
    first = bucket.get_blob(out)
    generation = first.generation  # read before downloading: the emulator's download clears it
    errors_generation = bucket.get_blob(f"predictions/{folder}/again.jsonl.errors.jsonl").generation
    content = first.download_as_bytes()
    misses = main.predictor.cache.stats.misses

    deliver(client, blob, event_id="evt-1")  # the same event, delivered again
    deliver(client, blob, event_id="evt-2")  # a duplicate with another id

    again = bucket.get_blob(out)
    assert again.generation == generation, "the predictions object was rewritten"
    assert again.download_as_bytes() == content
    assert len(content.splitlines()) == 3, "one line per good input line, no duplicates"
    errors_again = bucket.get_blob(f"predictions/{folder}/again.jsonl.errors.jsonl")
    assert errors_again.generation == errors_generation
    assert main.predictor.cache.stats.misses == misses, "the model ran again"
    assert names(bucket, f"predictions/{folder}/") == [
        f"predictions/{folder}/again.jsonl.errors.jsonl",
        out,
    ]


def test_a_new_version_of_the_input_replaces_the_output(
    client: Any, bucket: Any, folder: str
) -> None:
    name = f"inputs/{folder}/v.jsonl"
    deliver(client, upload(bucket, name, json.dumps({"id": "a", "text": "Awful."}) + "\n"))
    second = upload(bucket, name, json.dumps({"id": "b", "text": "Wonderful!"}) + "\n")
    deliver(client, second)
    predictions = read(bucket, f"predictions/{folder}/v.jsonl.predictions.jsonl")
    assert [(p["id"], p["label"]) for p in predictions] == [("b", "POSITIVE")]


def test_events_outside_the_input_prefix_are_ignored(client: Any, bucket: Any, folder: str) -> None:
    before = set(names(bucket, ""))
    line = json.dumps({"text": "hello"}) + "\n"
    outside = upload(bucket, f"elsewhere/{folder}/a.jsonl", line)
    own_output = upload(bucket, f"predictions/{folder}/b.jsonl", line)
    not_a_batch_file = upload(bucket, f"inputs/{folder}/notes.txt", "hello\n")
    for blob in (outside, own_output, not_a_batch_file):
        deliver(client, blob)
    deliver(
        client,
        upload(bucket, f"inputs/{folder}/deleted.jsonl", line),
        kind="google.cloud.storage.object.v1.deleted",
    )
    created = set(names(bucket, "")) - before
    assert created == {
        f"elsewhere/{folder}/a.jsonl",
        f"predictions/{folder}/b.jsonl",
        f"inputs/{folder}/notes.txt",
        f"inputs/{folder}/deleted.jsonl",
    }, "an ignored event wrote something"


# --- what can never succeed is acknowledged; what may succeed later is retried (issue 18) -------


def test_an_event_for_a_gone_object_is_acknowledged(client: Any, bucket: Any, folder: str) -> None:
    """Deleted before delivery: reading it used to raise (500, redelivered for a day).

    (A version replaced by a newer one is the same case on Cloud Storage, a 404 for the pinned
    generation; the emulator keeps no old generations, so it is not exercised here.)
    """
    line = json.dumps({"text": "hello"}) + "\n"
    deleted = upload(bucket, f"inputs/{folder}/deleted.jsonl", line)
    deleted.delete()
    deliver(client, deleted)
    assert names(bucket, f"predictions/{folder}/") == []


def test_a_malformed_event_payload_is_acknowledged(client: Any, bucket: Any, folder: str) -> None:
    blob = upload(bucket, f"inputs/{folder}/t.jsonl", json.dumps({"text": "hello"}) + "\n")
    for data in (
        {"bucket": BUCKET, "name": blob.name, "generation": "not a number"},
        {"bucket": BUCKET, "name": blob.name, "generation": "9" * 5000},
        {"bucket": BUCKET, "name": [blob.name]},
        {"bucket": BUCKET, "name": blob.name, "size": {"bytes": 1}},
    ):
        deliver(client, blob, data=data)
    assert names(bucket, f"predictions/{folder}/") == []


def test_event_data_the_framework_cannot_decode_is_acknowledged(
    client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """functions-framework decodes the data before the entry point: JSON nested too deep or an
    integer over the digit limit raised there, a 500 that Eventarc would retry for a day."""
    headers = {
        "ce-id": "undecodable",
        "ce-specversion": "1.0",
        "ce-source": f"//storage.googleapis.com/projects/_/buckets/{BUCKET}",
        "ce-type": FINALIZED,
        "content-type": "application/json",
    }
    for body in (b"[" * 100_000, b'{"bucket": "b", "generation": ' + b"9" * 5000 + b"}"):
        with caplog.at_level("WARNING", logger="aifn.batch"):
            response = client.post("/", data=body, headers=headers)
        assert response.status_code == 200
        assert "its data cannot be decoded" in caplog.text
        caplog.clear()


def test_hostile_records_are_errors_of_their_own_lines(
    client: Any, main: Any, bucket: Any, folder: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each of these used to fail the whole file with a 500, on every delivery."""
    monkeypatch.setattr(main.files, "settings", replace(main.files.settings, max_line_bytes=8192))
    lines = [
        json.dumps({"id": "ok-1", "text": "I love it."}),
        '{"id": "bad \\udc00", "text": "A lone surrogate in the id."}',
        '{"id": ' + "7" * 4400 + ', "text": "An id past the int digit limit."}',
        json.dumps({"id": "long", "text": "word " * 4000}),  # 20 kB, over the 8 kB limit
        json.dumps({"id": "ok-2", "text": "This is awful."}),
    ]
    blob = upload(bucket, f"inputs/{folder}/hostile.jsonl", "\n".join(lines))  # no final newline
    deliver(client, blob)
    predictions = read(bucket, f"predictions/{folder}/hostile.jsonl.predictions.jsonl")
    assert [(p["id"], p["label"]) for p in predictions] == [
        ("ok-1", "POSITIVE"),
        ("ok-2", "NEGATIVE"),
    ]
    errors = read(bucket, f"predictions/{folder}/hostile.jsonl.errors.jsonl")
    assert [e["line"] for e in errors] == [2, 3, 4]
    assert "unpaired surrogate" in errors[0]["error"]
    assert "4300 digits" in errors[1]["error"]
    assert "longer than 8192 bytes" in errors[2]["error"]


def test_a_file_over_the_event_budget_is_refused_and_left_to_the_job(
    client: Any, main: Any, bucket: Any, folder: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refused at once from its size, with no model work, an errors file that says how to run
    it, and a 200 so that Eventarc does not redeliver it for a day; the job then does it."""
    monkeypatch.setattr(main.files, "settings", replace(main.files.settings, event_max_bytes=500))
    body = "".join(
        json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(ticket_texts(10, seed=5))
    )
    assert len(body) > 500
    blob = upload(bucket, f"inputs/{folder}/large.jsonl", body)
    misses = main.predictor.cache.stats.misses
    deliver(client, blob)
    errors_name = f"predictions/{folder}/large.jsonl.errors.jsonl"
    [marker] = read(bucket, errors_name)
    assert marker["line"] is None
    assert f"{blob.size:,} bytes" in marker["error"]
    assert "BATCH_EVENT_MAX_BYTES=500" in marker["error"]
    assert "batch job" in marker["error"]
    assert f"make batch FUNCTION=sentiment INPUT=gs://{BUCKET}/{blob.name}" in marker["error"]
    assert main.predictor.cache.stats.misses == misses, "the model ran"
    assert names(bucket, f"predictions/{folder}/") == [errors_name]
    generation = bucket.get_blob(errors_name).generation
    deliver(client, blob)  # a redelivery leaves the marker alone
    assert bucket.get_blob(errors_name).generation == generation
    # The job (no size limit) processes it and replaces the marker.
    summary = main.files.run_object(Location(BUCKET, blob.name), None)
    assert (summary.records, summary.predictions, summary.errors) == (10, 10, 0)
    assert read(bucket, errors_name) == []
    assert len(read(bucket, f"predictions/{folder}/large.jsonl.predictions.jsonl")) == 10
    deliver(client, blob)  # and an event after that finds it done
    assert read(bucket, errors_name) == []


def test_an_output_written_from_another_source_is_not_overwritten(
    client: Any, main: Any, bucket: Any, folder: str, capsys: pytest.CaptureFixture[str]
) -> None:
    source = upload(bucket, f"inputs/{folder}/mine.jsonl", json.dumps({"text": "hi"}) + "\n")
    outputs = main.files.outputs_for(Location(BUCKET, source.name))
    theirs = bucket.blob(outputs.predictions.path)
    theirs.metadata = {"aifn-source": f"gs://{BUCKET}/elsewhere/theirs.jsonl"}
    theirs.upload_from_string(b'{"id": "theirs"}\n')
    untagged = upload(bucket, f"inputs/{folder}/other.jsonl", json.dumps({"text": "yo"}) + "\n")
    hand_made = bucket.blob(main.files.outputs_for(Location(BUCKET, untagged.name)).errors.path)
    hand_made.upload_from_string(b"a file somebody put there\n")
    deliver(client, source)
    deliver(client, untagged)
    assert bucket.get_blob(outputs.predictions.path).download_as_bytes() == b'{"id": "theirs"}\n'
    assert bucket.get_blob(outputs.errors.path) is None
    assert bucket.get_blob(hand_made.name).download_as_bytes() == b"a file somebody put there\n"
    # The command says so and fails (the model is already loaded: main is imported).
    status = batch.main(
        [f"gs://{BUCKET}/{source.name}", "--function", "sentiment", "--no-progress"]
    )
    assert status == 1
    assert "not written" in capsys.readouterr().out
    assert bucket.get_blob(outputs.predictions.path).download_as_bytes() == b'{"id": "theirs"}\n'


def test_x_csv_and_x_csv_jsonl_get_outputs_of_their_own(
    client: Any, bucket: Any, folder: str
) -> None:
    csv_blob = upload(bucket, f"inputs/{folder}/x.csv", "id,text\ncsv-1,Lovely.\n")
    jsonl_blob = upload(
        bucket, f"inputs/{folder}/x.csv.jsonl", json.dumps({"id": "jsonl-1", "text": "Bad."}) + "\n"
    )
    deliver(client, csv_blob)
    deliver(client, jsonl_blob)
    outputs = names(bucket, f"predictions/{folder}/")
    assert len(outputs) == 4
    got = {
        name: [p["id"] for p in read(bucket, name)]
        for name in outputs
        if name.endswith(".predictions.jsonl")
    }
    assert sorted(got.values()) == [["csv-1"], ["jsonl-1"]]


def test_a_transient_failure_is_retried_by_eventarc(
    client: Any, main: Any, bucket: Any, folder: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model that stays overloaded fails the delivery (a 5xx: Eventarc delivers it again,
    nothing was written); the next delivery succeeds."""
    blob = upload(bucket, f"inputs/{folder}/busy.jsonl", json.dumps({"text": "Nice!"}) + "\n")

    def overloaded(texts: list[str], options: Any) -> Any:
        raise Overloaded("the instance is at capacity")

    monkeypatch.setattr(batch_engine, "OVERLOAD_RETRIES", 2)
    capability = main.files.capability
    monkeypatch.setattr(main.files, "capability", replace(capability, predict=overloaded))
    deliver(client, blob, status=500)
    assert names(bucket, f"predictions/{folder}/") == []
    monkeypatch.setattr(main.files, "capability", capability)
    deliver(client, blob)
    [prediction] = read(bucket, f"predictions/{folder}/busy.jsonl.predictions.jsonl")
    assert prediction["label"] == "POSITIVE"


def test_health_answers_on_the_cloudevent_service(client: Any) -> None:
    """Cloud Run's startup probe: GET /v1/health on the batch service (a CloudEvent app)."""
    response = client.get("/v1/health")
    assert response.status_code == 200
    assert response.get_json()["function"] == "sentiment"


def test_repeated_texts_come_from_the_shared_cache(
    client: Any, main: Any, bucket: Any, folder: str
) -> None:
    texts = [f"Order {folder}-{i} arrived broken and support never answered." for i in range(20)]
    body = "".join(json.dumps({"text": t}) + "\n" for t in texts)
    deliver(client, upload(bucket, f"inputs/{folder}/one.jsonl", body))
    hits = main.predictor.cache.stats.hits
    deliver(client, upload(bucket, f"inputs/{folder}/two.jsonl", body))
    assert main.predictor.cache.stats.hits - hits == 20
    one = read(bucket, f"predictions/{folder}/one.jsonl.predictions.jsonl")
    two = read(bucket, f"predictions/{folder}/two.jsonl.predictions.jsonl")
    assert one == two


def ticket_texts(n: int, seed: int) -> list[str]:
    """Distinct support-ticket-like sentences (10-25 words), reproducible."""
    rng = random.Random(seed)
    openers = ["Hi team,", "Hello,", "Urgent:", "Quick question:", "FYI", "Dear support,"]
    subjects = [
        "the invoice",
        "my order",
        "the mobile app",
        "the dashboard",
        "the export",
        "my subscription",
        "the refund",
        "the login page",
        "the API",
        "the new release",
    ]
    verdicts = [
        "is fantastic and saved us hours",
        "keeps crashing when I open it",
        "was charged twice this month",
        "works as described",
        "is slower than before",
        "is exactly what we needed",
        "still has not arrived after two weeks",
        "shows an error on every save",
        "looks fine to me",
        "is confusing to set up",
    ]
    tails = [
        "Thanks.",
        "Please advise.",
        "Really disappointed.",
        "Great job!",
        "No rush.",
        "This is unacceptable.",
        "Cheers,",
        "Let me know.",
    ]
    return [
        f"{rng.choice(openers)} {rng.choice(subjects)} {rng.choice(verdicts)} "
        f"(ticket {i}, batch {seed}). {rng.choice(tails)}"
        for i in range(n)
    ]


@pytest.mark.slow
def test_ten_thousand_lines(
    client: Any, main: Any, bucket: Any, folder: str, capsys: pytest.CaptureFixture[str]
) -> None:
    texts = ticket_texts(10_000, seed=10)
    lines = [json.dumps({"id": f"r{i}", "text": t}) for i, t in enumerate(texts)]
    for poison in (17, 4_321, 9_998):
        lines[poison] = '{"id": "poison", "text": '
    blob = upload(bucket, f"inputs/{folder}/big.jsonl", "\n".join(lines) + "\n")
    started = time.perf_counter()
    deliver(client, blob)
    seconds = time.perf_counter() - started
    predictions = read(bucket, f"predictions/{folder}/big.jsonl.predictions.jsonl")
    errors = read(bucket, f"predictions/{folder}/big.jsonl.errors.jsonl")
    assert len(predictions) == 9_997
    assert [e["line"] for e in errors] == [18, 4_322, 9_999]
    expected = [(f"r{i}", i + 1) for i in range(10_000) if i not in (17, 4_321, 9_998)]
    assert [(p["id"], p["line"]) for p in predictions] == expected
    labels = {p["label"] for p in predictions}
    assert labels == {"NEGATIVE", "NEUTRAL", "POSITIVE"}
    rate = len(predictions) / seconds
    # The bare model on 640 of the same kind of texts, batches of 32, right after: the ratio
    # is the batch path's overhead (reading, validation, cache, batcher, writing, uploads).
    sample = ticket_texts(640, seed=11)
    started = time.perf_counter()
    for i in range(0, len(sample), 32):
        main.predictor.model.scores(sample[i : i + 32])
    bare = len(sample) / (time.perf_counter() - started)
    with capsys.disabled():
        print(
            f"\n[batch] 10,000-line JSONL through sentiment_batch: {seconds:.1f} s, "
            f"{rate:.0f} texts/s (download, model, upload included); the bare model in the "
            f"same run: {bare:.0f} texts/s at batch 32 (ratio {rate / bare:.2f})"
        )
    assert rate > 0.4 * bare, "far below the model's own throughput: batching is not working"


def test_two_shards_merge_to_the_single_run(main: Any, bucket: Any, folder: str) -> None:
    """Two job tasks on one file write parts; the last merges them into the single-run bytes.

    The cache is off here, as it is between two job tasks without Redis: every score is computed
    in the same chunk, hence the same forward passes, as in the single run.
    """
    texts = ticket_texts(300, seed=2)
    lines = [json.dumps({"id": i, "text": t}) for i, t in enumerate(texts)]
    lines[5] = lines[200] = "not json"
    source = upload(bucket, f"inputs/{folder}/backlog.jsonl", "\n".join(lines) + "\n")
    files = main.files
    location = Location(BUCKET, source.name)
    single = batch.Outputs(
        Location(BUCKET, f"single/{folder}/backlog.jsonl"),
        Location(BUCKET, f"single/{folder}/backlog.errors.jsonl"),
    )
    saved = main.predictor.cache
    main.predictor.cache = PredictionCache(None, namespace="sentiment:test", ttl=60)
    try:
        files.run_object(location, None, outputs=single)
        first = files.run_object(location, None, shard=Shard(0, 2))
        assert bucket.get_blob(f"predictions/{folder}/backlog.jsonl.predictions.jsonl") is None
        assert len(names(bucket, f"predictions/{folder}/")) == 2, "task 0 wrote its two parts"
        second = files.run_object(location, None, shard=Shard(1, 2))
    finally:
        main.predictor.cache = saved
    assert first.records + second.records == 300
    assert first.records > 0
    assert second.records > 0
    for merged, alone in (
        (f"predictions/{folder}/backlog.jsonl.predictions.jsonl", single.predictions.path),
        (f"predictions/{folder}/backlog.jsonl.errors.jsonl", single.errors.path),
    ):
        assert bucket.get_blob(merged).download_as_bytes() == (
            bucket.get_blob(alone).download_as_bytes()
        )
    assert names(bucket, f"predictions/{folder}/") == [
        f"predictions/{folder}/backlog.jsonl.errors.jsonl",
        f"predictions/{folder}/backlog.jsonl.predictions.jsonl",
    ], "the parts are removed after the merge"
    # A retried task after the merge does nothing.
    again = files.run_object(location, None, shard=Shard(0, 2))
    assert again.skipped
    assert again.records == 0


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aifn.files", *args],
        env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.mark.slow
def test_job_tasks_share_a_prefix_by_files(
    sentiment_model_dir: Path, bucket: Any, folder: str
) -> None:
    """The Cloud Run job as Terraform runs it: no --function, FUNCTION_TARGET and the task env."""
    for n in range(3):
        body = "".join(
            json.dumps({"id": f"{n}-{i}", "text": t}) + "\n"
            for i, t in enumerate(ticket_texts(10, seed=100 + n))
        )
        upload(bucket, f"inputs/{folder}/day-{n}.jsonl", body)
    env = {
        "FUNCTION_TARGET": "sentiment",
        "MODEL_DIR": str(sentiment_model_dir),
        "CLOUD_RUN_TASK_COUNT": "2",
    }
    outputs = []
    for index in range(2):
        done = cli(
            f"gs://{BUCKET}/inputs/{folder}/", env={**env, "CLOUD_RUN_TASK_INDEX": str(index)}
        )
        assert done.returncode == 0, done.stderr[-2000:]
        outputs.append(done.stdout)
    assert "task 1 of 2" in outputs[0]
    assert "20 lines: 20 predicted" in outputs[0], "task 0 takes files 0 and 2"
    assert "10 lines: 10 predicted" in outputs[1], "task 1 takes file 1"
    for n in range(3):
        predictions = read(bucket, f"predictions/{folder}/day-{n}.jsonl.predictions.jsonl")
        assert [p["id"] for p in predictions] == [f"{n}-{i}" for i in range(10)]


@pytest.mark.slow
def test_local_command_end_to_end(sentiment_model_dir: Path, tmp_path: Path) -> None:
    rows = "".join(f'{i},"{t}"\n' for i, t in enumerate(ticket_texts(40, seed=7)))
    source = tmp_path / "tickets.csv"
    source.write_text("id,text\n" + rows + "41,\n", encoding="utf-8")
    done = cli(str(source), "--function", "sentiment", env={"MODEL_DIR": str(sentiment_model_dir)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "41 lines: 40 predicted, 1 errors" in done.stdout
    assert "texts/s" in done.stdout
    assert "100%" in done.stderr, "no progress bar"
    predictions = [
        json.loads(line)
        for line in (tmp_path / "tickets.csv.predictions.jsonl").read_text().splitlines()
    ]
    assert [p["id"] for p in predictions] == [str(i) for i in range(40)]
    errors = (tmp_path / "tickets.csv.errors.jsonl").read_text().splitlines()
    assert [json.loads(e)["line"] for e in errors] == [42]


def test_a_sharded_run_never_overwrites_another_sources_final_output(
    main: Any, bucket: Any, folder: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = "".join(json.dumps({"text": t}) + "\n" for t in ticket_texts(6, seed=3))
    source = upload(bucket, f"inputs/{folder}/sharded.jsonl", body)
    location = Location(BUCKET, source.name)
    files = main.files
    outputs = files.outputs_for(location)
    with monkeypatch.context() as m:
        m.setattr(batch, "merge", lambda outputs, count: False)  # both tasks write their parts
        files.run_object(location, None, shard=Shard(0, 2))
        files.run_object(location, None, shard=Shard(1, 2))
    theirs = bucket.blob(outputs.predictions.path)
    theirs.metadata = {"aifn-source": f"gs://{BUCKET}/elsewhere/x.jsonl"}
    theirs.upload_from_string(b"theirs\n")
    summary = files.run_object(location, None, shard=Shard(1, 2))  # a retried last task
    assert summary.refused
    assert "not overwriting" in summary.refused[0]
    with pytest.raises(batch.ConfigError, match="not overwriting"):
        batch.merge(outputs, 2)  # by hand
    assert bucket.get_blob(outputs.predictions.path).download_as_bytes() == b"theirs\n"
