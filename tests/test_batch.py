"""Unit tests: the batch engine (aifn.batch) with a stand-in model, on local files.

What a user of a batch file would notice: every record is either predicted or reported with its
line number, ids come through, the output keeps the input's order, a sharded run merges to the
same bytes as a single one, and the settings are documented. The real model and Cloud Storage
are in test_batch_storage.py.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import pytest

from aifn import batch, batch_io
from aifn.batch import BatchSettings, Capability, Shard
from aifn.batch_io import Location
from aifn.errors import ConfigError, InvalidRequest, Overloaded
from aifn.model import ModelIdentity, Prediction
from aifn.settings import read_env, settings_table

from .conftest import REPO


class FakeService:
    """What the engine reads from a Service: the function's name and the model's identity."""

    function = "fake"

    class model:
        identity = ModelIdentity("fake-model", "sha256:0")


def fake_predict(texts: list[str], options: Any) -> list[Prediction]:
    """A deterministic 'model': the score is a hash of the text (and of the labels, if any)."""
    labels = list(options) if options else ["A", "B"]
    out = []
    for text in texts:
        h = int.from_bytes(hashlib.sha256((text + "|".join(labels)).encode()).digest()[:4], "big")
        top = h / 2**32
        ranked = sorted(
            zip(labels, [top, *[(1 - top) / (len(labels) - 1)] * (len(labels) - 1)], strict=True),
            key=lambda pair: -pair[1],
        )
        out.append(Prediction(ranked, truncated=False, cached=False))
    return out


def parse_labels(fields: Mapping[str, Any]) -> Hashable:
    labels = fields.get("labels")
    if not isinstance(labels, list) or len(labels) < 2:
        raise InvalidRequest("'labels' must be a list of at least 2 labels")
    return tuple(labels)


def capability(**kwargs: Any) -> Capability:
    return Capability(name="fake", service=FakeService(), predict=fake_predict, **kwargs)  # type: ignore[arg-type]


def run(
    tmp_path: Path,
    content: str | bytes,
    *,
    name: str = "in.jsonl",
    cap: Capability | None = None,
    env: dict[str, str] | None = None,
    shard: Shard | None = None,
    options: dict[str, Any] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], batch.Summary]:
    source = tmp_path / name
    source.write_bytes(content.encode() if isinstance(content, str) else content)
    settings = read_env(BatchSettings, env or {})
    processor = batch.Processor(cap or capability(), settings)
    pred = Location(None, str(tmp_path / "out" / "in.predictions.jsonl"))
    outputs = batch.Outputs(pred, pred.sibling(batch.errors_name(pred.path)))
    summary = processor.run_local(
        Location(None, str(source)), outputs, shard=shard or Shard(), options=options
    )
    return read_jsonl(Path(pred.path)), read_jsonl(Path(outputs.errors.path)), summary


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_every_record_is_predicted_or_reported_with_its_line(tmp_path: Path) -> None:
    content = (
        '{"id": "t-1", "text": "first"}\n'
        "\n"  # blank lines are not records
        '{"text": "no id: the line number stands in"}\n'
        "{not json\n"
        "[1, 2]\n"
        '{"id": "t-5", "text": "   "}\n'
        '{"id": "t-6"}\n'
        '{"id": {"a": 1}, "text": "bad id"}\n'
        '{"id": 8, "text": 42}\n'
        '{"id": 9, "text": "lone surrogate \\ud800"}\n'
        '{"id": "t-10", "text": "last", "extra": "ignored"}\n'
    )
    predictions, errors, summary = run(tmp_path, content)
    assert [(p["id"], p["line"]) for p in predictions] == [("t-1", 1), (3, 3), ("t-10", 11)]
    for p in predictions:
        assert set(p) == {"id", "line", "label", "score", "labels", "truncated"}
        assert p["label"] == p["labels"][0]["label"]
        assert p["score"] == p["labels"][0]["score"]
    assert [(e["line"], e["id"]) for e in errors] == [
        (4, None),
        (5, None),
        (6, "t-5"),
        (7, "t-6"),
        (8, None),
        (9, 8),
        (10, 9),
    ]
    reasons = [e["error"] for e in errors]
    assert reasons[0].startswith("not valid JSON")
    assert reasons[1] == "not a JSON object"
    assert "empty" in reasons[2]
    assert reasons[3] == "'text' is missing"
    assert "'id' must be a string or an integer" in reasons[4]
    assert "must be a string" in reasons[5]
    assert "surrogate" in reasons[6]
    assert (summary.records, summary.predictions, summary.errors) == (10, 3, 7)


def test_invalid_utf8_fails_only_its_line(tmp_path: Path) -> None:
    content = b'{"text": "fine"}\n{"text": "bad \xff byte"}\n{"text": "also fine"}\n'
    predictions, errors, _ = run(tmp_path, content)
    assert [p["line"] for p in predictions] == [1, 3]
    assert errors == [{"id": None, "line": 2, "error": "not valid UTF-8"}]


def test_csv_named_columns_ids_and_bad_rows(tmp_path: Path) -> None:
    content = (
        "ticket,body,channel\n"
        "T1,Refund please,email\n"
        'T2,"A text with a comma, and\na line break",chat\n'
        ",no id here,chat\n"
        "T4,,email\n"
        "T5,too,many,cells\n"
        "T6,Last one,email\n"
    )
    env = {"BATCH_TEXT_COLUMN": "body", "BATCH_ID_COLUMN": "ticket"}
    predictions, errors, _ = run(tmp_path, content, name="in.csv", env=env)
    # Line numbers are where each record starts in the file (the header is line 1).
    assert [(p["id"], p["line"]) for p in predictions] == [("T1", 2), ("T2", 3), (5, 5), ("T6", 8)]
    assert [(e["id"], e["line"]) for e in errors] == [("T4", 6), (None, 7)]
    assert "4 cells; the header row has 3 columns" in errors[1]["error"]


def test_csv_without_the_text_column_is_reported_not_raised(tmp_path: Path) -> None:
    predictions, errors, _ = run(tmp_path, "id,body\n1,hello\n", name="in.csv")
    assert predictions == []
    assert len(errors) == 1
    assert errors[0]["line"] is None
    assert "no column 'text'" in errors[0]["error"]


def test_options_from_settings_header_line_and_record(tmp_path: Path) -> None:
    cap = capability(option_fields=frozenset({"labels"}), parse_options=parse_labels)
    content = (
        '{"labels": ["x", "y"]}\n'  # the header: applies to every line below
        '{"text": "uses the header"}\n'
        '{"text": "its own labels", "labels": ["p", "q", "r"]}\n'
        '{"text": "bad labels", "labels": "p"}\n'
    )
    predictions, errors, _ = run(tmp_path, content, cap=cap, env={"BATCH_OPTIONS": "{}"})
    assert [sorted(lbl["label"] for lbl in p["labels"]) for p in predictions] == [
        ["x", "y"],
        ["p", "q", "r"],
    ]
    assert [p["line"] for p in predictions] == [2, 3]
    assert errors == [{"id": 4, "line": 4, "error": "'labels' must be a list of at least 2 labels"}]
    # Without a header, BATCH_OPTIONS (and --options above it) apply.
    content = '{"text": "a"}\n'
    predictions, _, _ = run(
        tmp_path, content, cap=cap, env={"BATCH_OPTIONS": '{"labels": ["s1", "s2"]}'}
    )
    assert {lbl["label"] for lbl in predictions[0]["labels"]} == {"s1", "s2"}
    predictions, _, _ = run(
        tmp_path,
        content,
        cap=cap,
        env={"BATCH_OPTIONS": '{"labels": ["s1", "s2"]}'},
        options={"labels": ["o1", "o2"]},
    )
    assert {lbl["label"] for lbl in predictions[0]["labels"]} == {"o1", "o2"}


def test_csv_option_columns_are_json(tmp_path: Path) -> None:
    cap = capability(option_fields=frozenset({"labels"}), parse_options=parse_labels)
    content = 'text,labels\nhello,"[""a"", ""b""]"\nworld,\n'
    predictions, errors, _ = run(
        tmp_path, content, name="in.csv", cap=cap, options={"labels": ["d1", "d2"]}
    )
    assert [{lbl["label"] for lbl in p["labels"]} for p in predictions] == [
        {"a", "b"},
        {"d1", "d2"},  # an empty cell: the file's options
    ]
    assert errors == []


def test_output_is_in_input_order_across_chunks(tmp_path: Path) -> None:
    lines = [json.dumps({"id": f"r{i}", "text": "x" * (50 - i % 50)}) for i in range(23)]
    lines[7] = "oops"
    predictions, errors, _ = run(tmp_path, "\n".join(lines) + "\n", env={"BATCH_CHUNK_SIZE": "4"})
    assert [p["line"] for p in predictions] == [n for n in range(1, 24) if n != 8]
    assert [p["id"] for p in predictions] == [f"r{n - 1}" for n in range(1, 24) if n != 8]
    assert [e["line"] for e in errors] == [8]


@pytest.mark.parametrize("count", [2, 3])
def test_shards_merge_to_the_bytes_of_a_single_run(tmp_path: Path, count: int) -> None:
    lines = [json.dumps({"id": i, "text": f"text number {i}"}) for i in range(50)]
    lines[3] = lines[31] = "not json"
    content = "\n".join(lines) + "\n"
    env = {"BATCH_CHUNK_SIZE": "4"}
    single_dir, shard_dir = tmp_path / "single", tmp_path / "sharded"
    single_dir.mkdir()
    shard_dir.mkdir()
    run(single_dir, content, env=env)
    total = 0
    for index in range(count):
        _, _, summary = run(shard_dir, content, env=env, shard=Shard(index, count))
        total += summary.records
        merged = (shard_dir / "out" / "in.predictions.jsonl").exists()
        assert merged == (index == count - 1), "only the last part completes the merge"
    assert total == 50
    for name in ("in.predictions.jsonl", "in.errors.jsonl"):
        assert (shard_dir / "out" / name).read_bytes() == (single_dir / "out" / name).read_bytes()
    assert sorted(p.name for p in (shard_dir / "out").iterdir()) == [
        "in.errors.jsonl",
        "in.predictions.jsonl",
    ], "parts are removed once merged"


def test_merge_waits_for_every_part(tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n', encoding="utf-8")
    pred = Location(None, str(tmp_path / "in.predictions.jsonl"))
    outputs = batch.Outputs(pred, pred.sibling(batch.errors_name(pred.path)))
    assert batch.merge(outputs, 2) is False
    assert batch.main(["merge", str(tmp_path / "in.jsonl"), "--task-count", "2"]) == 1
    assert not Path(pred.path).exists()


def test_overload_is_waited_out(tmp_path: Path) -> None:
    calls = []

    def busy_then_fine(texts: list[str], options: Any) -> list[Prediction]:
        calls.append(len(texts))
        if len(calls) < 3:
            raise Overloaded("busy")
        return fake_predict(texts, options)

    cap = Capability(name="fake", service=FakeService(), predict=busy_then_fine)  # type: ignore[arg-type]
    predictions, errors, _ = run(tmp_path, '{"text": "a"}\n', cap=cap)
    assert len(predictions) == 1
    assert errors == []
    assert calls == [1, 1, 1]


def test_model_failures_are_raised_not_reported(tmp_path: Path) -> None:
    """A broken model is not a bad line: the run fails (an event is redelivered) and no output
    appears."""

    def broken(texts: list[str], options: Any) -> list[Prediction]:
        raise RuntimeError("model exploded")

    cap = Capability(name="fake", service=FakeService(), predict=broken)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="exploded"):
        run(tmp_path, '{"text": "a"}\n', cap=cap)
    assert not (tmp_path / "out" / "in.predictions.jsonl").exists()
    assert not (tmp_path / "out" / "in.errors.jsonl").exists()


# --- names, settings, the function a job runs ----------------------------------------------------


def settings(**env: str) -> BatchSettings:
    return read_env(BatchSettings, env)


def test_defaults_mirror_inputs_under_predictions() -> None:
    s = settings()
    assert (s.input_prefix, s.output_bucket, s.output_prefix) == ("inputs/", None, "predictions/")
    out = batch.outputs_for(s, Location("b", "inputs/2026/tickets.jsonl"))
    assert str(out.predictions) == "gs://b/predictions/2026/tickets.jsonl"
    assert str(out.errors) == "gs://b/predictions/2026/tickets.errors.jsonl"
    out = batch.outputs_for(s, Location("b", "inputs/t.csv"))
    assert str(out.predictions) == "gs://b/predictions/t.csv.jsonl"
    assert str(out.errors) == "gs://b/predictions/t.csv.errors.jsonl"
    other = settings(BATCH_OUTPUT_BUCKET="gs://results", BATCH_OUTPUT_PREFIX="/out")
    out = batch.outputs_for(other, Location("b", "inputs/t.jsonl"))
    assert str(out.predictions) == "gs://results/out/t.jsonl"
    assert batch.part_name("p/t.jsonl", Shard(1, 2)) == "p/t.part-00001-of-00002.jsonl"
    assert batch.local_output("/d/tickets.csv") == "/d/tickets.predictions.jsonl"
    assert batch.errors_name("/d/tickets.predictions.jsonl") == "/d/tickets.errors.jsonl"


def test_which_objects_are_inputs() -> None:
    processor = batch.Processor(capability(), settings())
    assert processor.is_input("b", "inputs/x/t.jsonl") is None
    assert processor.is_input("b", "inputs/t.CSV") is None
    assert "outside the input prefix" in (processor.is_input("b", "other/t.jsonl") or "")
    assert "outside the input prefix" in (processor.is_input("b", "predictions/t.jsonl") or "")
    assert "not a .jsonl" in (processor.is_input("b", "inputs/readme.txt") or "")
    assert "folder" in (processor.is_input("b", "inputs/x/") or "")
    # Outputs inside the input prefix are still never inputs, when another bucket's prefix nests.
    nested = batch.Processor(
        capability(),
        settings(BATCH_INPUT_PREFIX="/", BATCH_OUTPUT_BUCKET="b", BATCH_OUTPUT_PREFIX="out/"),
    )
    assert "output prefix" in (nested.is_input("b", "out/t.jsonl") or "")


def test_overlapping_prefixes_in_one_bucket_are_refused() -> None:
    with pytest.raises(ConfigError, match="would trigger the function"):
        settings(BATCH_INPUT_PREFIX="data/", BATCH_OUTPUT_PREFIX="data/predictions/").check()
    with pytest.raises(ConfigError, match="would trigger"):
        batch.Processor(capability(), settings(BATCH_INPUT_PREFIX="/"))
    settings(BATCH_INPUT_PREFIX="/", BATCH_OUTPUT_BUCKET="elsewhere").check()


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("BATCH_CHUNK_SIZE", "0"),
        ("BATCH_OUTPUT_BUCKET", "bucket/path"),
        ("BATCH_OPTIONS", "[1]"),
        ("BATCH_OPTIONS", "{nope"),
        ("BATCH_TEXT_COLUMN", " "),
    ],
)
def test_invalid_batch_settings_name_the_variable(var: str, value: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{var}="):
        settings(**{var: value})


def test_readme_batch_settings_table_matches_the_code() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert settings_table(BatchSettings) in readme, (
        "README's batch settings table is stale: paste settings_table(BatchSettings)"
    )


@pytest.mark.parametrize(
    ("explicit", "env", "expected"),
    [
        ("classify", {"FUNCTION_TARGET": "sentiment"}, "classify"),
        (None, {"FUNCTION_TARGET": "sentiment"}, "sentiment"),  # the Terraform job
        (None, {"FUNCTION_TARGET": "classify_batch"}, "classify"),  # the batch service's image
        (None, {"CLOUD_RUN_JOB": "aifn-classify-job"}, "classify"),
        (None, {"K_SERVICE": "aifn-sentiment-batch"}, "sentiment"),
    ],
)
def test_the_function_is_derived(explicit: str | None, env: dict[str, str], expected: str) -> None:
    assert batch.derive_function(explicit, env) == expected


def test_no_function_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="--function"):
        batch.derive_function(None, {"CLOUD_RUN_JOB": "nightly"})


def test_cli_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert batch.main([str(tmp_path / "missing.jsonl"), "--function", "sentiment"]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("hi", encoding="utf-8")
    assert batch.main([str(tmp_path / "notes.txt"), "--function", "sentiment"]) == 2
    assert "not a .jsonl" in capsys.readouterr().err


def test_csv_header_only_and_empty_files(tmp_path: Path) -> None:
    predictions, errors, summary = run(tmp_path, "text,id\n", name="in.csv")
    assert (predictions, errors, summary.records) == ([], [], 0)
    predictions, errors, _ = run(tmp_path, "", name="in.csv")
    assert predictions == []
    assert "empty" in errors[0]["error"]
    predictions, errors, summary = run(tmp_path, "")
    assert (predictions, errors, summary.records) == ([], [], 0)


def test_file_format_by_name() -> None:
    assert batch_io.file_format("a/b.JSONL") == "jsonl"
    assert batch_io.file_format("b.ndjson") == "jsonl"
    assert batch_io.file_format("b.csv") == "csv"
    assert batch_io.file_format("b.json") is None
