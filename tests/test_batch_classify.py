"""Integration tests: classify_batch (zero-shot) on the real model, files in gcp-storage-emulator.

Labels come per file (a JSONL header line, or BATCH_OPTIONS) or per record (a JSONL field, a CSV
column holding JSON), with descriptions, template and multi_label as in the HTTP API; each batch
result equals what POST /v1/classify answers for the same text and options.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

import pytest

from aifn.files.processor import FINALIZED

from .helpers import CLASSIFY_MODEL, function_app

pytestmark = pytest.mark.integration

BUCKET = "aifn-batch-classify"
TICKETS = ["billing", "bug report", "feature request"]
DEFAULT_LABELS = ["sport", "politics", "technology"]
DESCRIPTIONS = {
    "billing": "A question about money: a charge, payment, card, invoice, refund or price.",
    "bug report": "Something is broken: an error, a crash, or a button or page that does not work.",
}


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
def app(storage_emulator: str) -> tuple[Any, Any]:
    client, module = function_app(
        "classify",
        CLASSIFY_MODEL,
        target="classify_batch",
        signature_type="cloudevent",
        STORAGE_EMULATOR_HOST=storage_emulator,
        # Labels for files that name none (Terraform could set this per deployment).
        BATCH_OPTIONS=json.dumps({"labels": DEFAULT_LABELS}),
        BATCH_OUTPUT_PREFIX="results/",
    )
    assert module.zero_shot is not None, "the packaged classify model should be an encoder"
    return client, module


def upload(bucket: Any, name: str, content: str) -> Any:
    blob = bucket.blob(name)
    blob.upload_from_string(content.encode("utf-8"))
    blob.reload()
    return blob


def deliver(client: Any, blob: Any) -> None:
    """POST the "object finalized" CloudEvent Eventarc sends (binary content mode)."""
    response = client.post(
        "/",
        json={
            "bucket": blob.bucket.name,
            "name": blob.name,
            "generation": str(blob.generation),
            "size": str(blob.size),
        },
        headers={
            "ce-id": uuid.uuid4().hex,
            "ce-specversion": "1.0",
            "ce-source": f"//storage.googleapis.com/projects/_/buckets/{blob.bucket.name}",
            "ce-type": FINALIZED,
            "ce-subject": f"objects/{blob.name}",
        },
    )
    assert response.status_code == 200, response.get_data(as_text=True)


def read(bucket: Any, name: str) -> list[dict[str, Any]]:
    blob = bucket.get_blob(name)
    assert blob is not None, f"{name} was not written"
    return [json.loads(line) for line in blob.download_as_text().splitlines()]


def test_header_labels_line_overrides_and_bad_options(app: tuple[Any, Any], bucket: Any) -> None:
    client, main = app
    folder = uuid.uuid4().hex[:8]
    lines = [
        {"labels": TICKETS, "descriptions": DESCRIPTIONS},  # the header: every line's defaults
        {"id": "a", "text": "I was charged twice for my subscription this month."},
        {"id": "b", "text": "The export button does nothing, the page shows an error."},
        {"id": "c", "text": "Could you add a dark mode to the app?"},
        # A record's fields replace the header's field by field: new labels, no descriptions.
        {
            "id": "d",
            "text": "The striker scored twice in the final.",
            "labels": DEFAULT_LABELS,
            "descriptions": {},
        },
        {
            "id": "e",
            "text": "I was billed twice and now the app keeps crashing.",
            "multi_label": True,
            "descriptions": {},
        },
        # ... and the header's descriptions, kept, do not fit these labels: an error.
        {"id": "h", "text": "Anything", "labels": DEFAULT_LABELS},
        {"id": "f", "text": "Anything", "labels": ["only one"]},
        {"id": "g", "text": "Anything", "template": "no placeholder"},
    ]
    blob = upload(
        bucket, f"inputs/{folder}/tickets.jsonl", "".join(json.dumps(x) + "\n" for x in lines)
    )
    deliver(client, blob)

    predictions = {
        p["id"]: p for p in read(bucket, f"results/{folder}/tickets.jsonl.predictions.jsonl")
    }
    assert {k: p["label"] for k, p in predictions.items()} == {
        "a": "billing",
        "b": "bug report",
        "c": "feature request",
        "d": "sport",
        "e": "billing",
    }
    assert [p["line"] for p in predictions.values()] == [2, 3, 4, 5, 6]
    assert predictions["e"]["matches"] == ["billing", "bug report"]
    assert {lbl["label"] for lbl in predictions["a"]["labels"]} == set(TICKETS)
    assert "matches" in predictions["e"]
    assert "matches" not in predictions["a"]
    errors = read(bucket, f"results/{folder}/tickets.jsonl.errors.jsonl")
    assert [(e["id"], e["line"]) for e in errors] == [("h", 7), ("f", 8), ("g", 9)]
    assert "'descriptions' has 'billing', which is not in 'labels'" in errors[0]["error"]
    assert "'labels' has 1; send at least 2" in errors[1]["error"]
    assert "'template'" in errors[2]["error"]

    # The same answers as the HTTP endpoint for the same text and options.
    http = main.classify_texts(
        main.parse_request(
            {
                "texts": [lines[1]["text"], lines[2]["text"]],
                "labels": TICKETS,
                "descriptions": DESCRIPTIONS,
            }
        )
    )["results"]
    for got, want in zip((predictions["a"], predictions["b"]), http, strict=True):
        want = {k: v for k, v in want.items() if k != "cached"}
        assert {k: v for k, v in got.items() if k not in {"id", "line"}} == want


def test_csv_with_a_labels_column_and_settings_default(app: tuple[Any, Any], bucket: Any) -> None:
    client, _ = app
    folder = uuid.uuid4().hex[:8]
    content = (
        "id,text,labels\n"
        "p1,Parliament passed the new tax bill after a long debate,\n"
        "p2,The new phone has a faster chip and better battery life,\n"
        'p3,Please refund the extra payment on my card,"[""billing"", ""bug report""]"\n'
        "p4,Bad labels cell,billing|bug report\n"
    )
    deliver(client, upload(bucket, f"inputs/{folder}/mixed.csv", content))
    predictions = read(bucket, f"results/{folder}/mixed.csv.predictions.jsonl")
    assert [(p["id"], p["label"]) for p in predictions] == [
        ("p1", "politics"),  # an empty cell: BATCH_OPTIONS' labels
        ("p2", "technology"),
        ("p3", "billing"),
    ]
    errors = read(bucket, f"results/{folder}/mixed.csv.errors.jsonl")
    assert [(e["id"], e["line"]) for e in errors] == [("p4", 5)]
    assert "'labels' must be a list" in errors[0]["error"]
