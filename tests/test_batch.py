"""Unit tests: the batch engine (aifn.files.processor) with a stand-in model, on local files.

What a user of a batch file would notice: every record is either predicted or reported with its
line number, ids come through, the output keeps the input's order, a sharded run merges to the
same bytes as a single one, and the settings are documented. The real model and Cloud Storage
are in test_batch_storage.py.
"""

from __future__ import annotations

import hashlib
import json
import tracemalloc
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import pytest

from aifn.core.errors import ConfigError, InvalidRequest, Overloaded
from aifn.core.model import ModelIdentity, Prediction
from aifn.files import engine as batch_engine
from aifn.files import processor as batch
from aifn.files import storage as batch_io
from aifn.files.processor import BatchSettings, Capability, Shard
from aifn.files.storage import Location
from aifn.settings import read_env, settings_table

from .helpers import REPO

FAKE_MODEL = ModelIdentity("fake-model", "sha256:0")


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
    return Capability(name="fake", model=FAKE_MODEL, predict=fake_predict, **kwargs)


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

    cap = Capability(name="fake", model=FAKE_MODEL, predict=busy_then_fine)
    predictions, errors, _ = run(tmp_path, '{"text": "a"}\n', cap=cap)
    assert len(predictions) == 1
    assert errors == []
    assert calls == [1, 1, 1]


def test_model_failures_are_raised_not_reported(tmp_path: Path) -> None:
    """A broken model is not a bad line: the run fails (an event is redelivered) and no output
    appears."""

    def broken(texts: list[str], options: Any) -> list[Prediction]:
        raise RuntimeError("model exploded")

    cap = Capability(name="fake", model=FAKE_MODEL, predict=broken)
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
    assert str(out.predictions) == "gs://b/predictions/2026/tickets.jsonl.predictions.jsonl"
    assert str(out.errors) == "gs://b/predictions/2026/tickets.jsonl.errors.jsonl"
    out = batch.outputs_for(s, Location("b", "inputs/t.csv"))
    assert str(out.predictions) == "gs://b/predictions/t.csv.predictions.jsonl"
    assert str(out.errors) == "gs://b/predictions/t.csv.errors.jsonl"
    other = settings(BATCH_OUTPUT_BUCKET="gs://results", BATCH_OUTPUT_PREFIX="/out")
    out = batch.outputs_for(other, Location("b", "inputs/t.jsonl"))
    assert str(out.predictions) == "gs://results/out/t.jsonl.predictions.jsonl"
    assert batch.part_name("p/t.jsonl", Shard(1, 2)) == "p/t.part-00001-of-00002.jsonl"
    assert batch.local_output("/d/tickets.csv") == "/d/tickets.csv.predictions.jsonl"
    assert batch.errors_name("/d/tickets.csv.predictions.jsonl") == "/d/tickets.csv.errors.jsonl"


def test_no_two_inputs_share_an_output_name() -> None:
    """x.csv and x.csv.jsonl (or x.jsonl and x.errors.jsonl) used to write the same object."""
    s = settings()
    inputs = [
        "x.csv",
        "x.csv.jsonl",
        "x.jsonl",
        "x.errors.jsonl",
        "x.predictions.jsonl",
        "x.ndjson",
        "x.ndjson.jsonl",
        "x.JSONL",
        "x.part-00000-of-00002.jsonl",
        "x.errors.part-00000-of-00002.jsonl",
    ]
    names: list[str] = []
    for name in inputs:
        out = batch.outputs_for(s, Location("b", f"inputs/{name}"))
        names += [out.predictions.path, out.errors.path]
        for shard in (Shard(0, 2), Shard(1, 2)):
            parts = batch.parts_of(out, shard)
            names += [parts.predictions.path, parts.errors.path]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    local = [batch.local_output(f"/d/{name}") for name in inputs]
    local += [batch.errors_name(p) for p in local]
    assert len(local) == len(set(local))


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


def test_docs_batch_settings_table_matches_the_code() -> None:
    page = (REPO / "docs" / "batch.md").read_text(encoding="utf-8")
    assert settings_table(BatchSettings) in page, (
        "docs/batch.md's batch settings table is stale: run `make docs-tables`"
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


# --- hostile records (issue 18): each a per-record error, never an exception ---------------------


def test_a_lone_surrogate_id_is_a_record_error(tmp_path: Path) -> None:
    """It used to pass validation and then break the UTF-8 writer: the whole file failed."""
    content = (
        '{"id": "a", "text": "first"}\n'
        '{"id": "bad \\ud800 id", "text": "second"}\n'
        '{"id": "c", "text": "third"}\n'
    )
    predictions, errors, summary = run(tmp_path, content)
    assert [p["id"] for p in predictions] == ["a", "c"]
    assert errors == [
        {"id": None, "line": 2, "error": "'id' contains an unpaired surrogate escape"}
    ]
    assert (summary.records, summary.errors) == (3, 1)


def test_an_integer_too_long_to_read_is_a_record_error(tmp_path: Path) -> None:
    """More digits than Python's int limit (4,300) made json.loads raise a plain ValueError."""
    cap = capability(option_fields=frozenset({"labels"}), parse_options=parse_labels)
    huge = "9" * 5000
    content = (
        f'{{"labels": [{huge}]}}\n'  # where a header line would be
        f'{{"id": {huge}, "text": "a", "labels": ["x", "y"]}}\n'
        '{"text": "fine", "labels": ["x", "y"]}\n'
    )
    predictions, errors, _ = run(tmp_path, content, cap=cap)
    assert [p["line"] for p in predictions] == [3]
    assert [(e["line"], e["id"]) for e in errors] == [(1, None), (2, None)]
    assert all("more than 4300 digits" in e["error"] for e in errors)


def test_a_csv_cell_nested_too_deep_is_a_record_error(tmp_path: Path) -> None:
    """A request-field cell is read as JSON; 50,000 brackets made it raise RecursionError."""
    cap = capability(option_fields=frozenset({"labels"}), parse_options=parse_labels)
    content = 'text,labels\nhello,"' + "[" * 50_000 + '"\nworld,"[""a"", ""b""]"\n'
    predictions, errors, _ = run(tmp_path, content, name="in.csv", cap=cap)
    assert [p["line"] for p in predictions] == [3]
    assert errors == [{"id": 2, "line": 2, "error": "'labels' must be a list of at least 2 labels"}]


def test_a_line_over_the_limit_is_a_record_error_and_reading_goes_on(tmp_path: Path) -> None:
    env = {"BATCH_MAX_LINE_BYTES": "64"}
    long_line = json.dumps({"id": "long", "text": "x" * 200})
    content = (
        '{"id": "a", "text": "short"}\n'
        + long_line
        + "\r\n"
        + '{"id": "b", "text": "after a CRLF"}\r'  # a lone CR ends a line too
        + '{"id": "c", "text": "after a CR"}\n'
        + '{"id": "d", "text": "the last line has no line break and is too long '
        + "y" * 80
        + '"}'
    )
    predictions, errors, summary = run(tmp_path, content, env=env)
    assert [(p["id"], p["line"]) for p in predictions] == [("a", 1), ("b", 3), ("c", 4)]
    assert [(e["line"], e["id"]) for e in errors] == [(2, None), (5, None)]
    assert all("longer than 64 bytes (BATCH_MAX_LINE_BYTES)" in e["error"] for e in errors)
    assert summary.records == 5
    # Exactly at the limit is fine.
    exact = json.dumps({"text": "z" * 50})
    exact += " " * (64 - len(exact))
    predictions, errors, _ = run(tmp_path, exact + "\n", env=env)
    assert (len(predictions), errors) == (1, [])


def test_a_csv_record_over_the_limit_is_a_record_error(tmp_path: Path) -> None:
    env = {"BATCH_MAX_LINE_BYTES": "64"}
    content = (
        "id,text\n"
        "1,short\n"
        f"2,{'x' * 100}\n"
        f'3,"quoted over lines\n{"y" * 40}\n{"y" * 40}"\n'  # 3 lines, over 64 bytes together
        "4,after\n"
    )
    predictions, errors, _ = run(tmp_path, content, name="in.csv", env=env)
    assert [(p["id"], p["line"]) for p in predictions] == [("1", 2), ("4", 7)]
    assert [(e["line"], e["id"]) for e in errors] == [(3, None), (4, None)]
    assert all("record is longer than 64 bytes" in e["error"] for e in errors)
    # The header row itself over the limit: the file is unreadable, said once.
    predictions, errors, _ = run(tmp_path, "text," + "c" * 100 + "\nhello,x\n", name="in.csv",
                                 env=env)  # fmt: skip
    assert predictions == []
    assert errors[0]["line"] is None
    assert "header row is longer than 64 bytes" in errors[0]["error"]


def _peak_bytes(fn: Any) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_64_mb_line_without_a_line_break_is_read_in_bounded_memory(tmp_path: Path) -> None:
    """The reader skips an over-long line in blocks: peak memory is the limit plus a block, not
    the line. (bench/batch_memory.py measures the process's RSS on a 1 GB line.)"""
    source = tmp_path / "in.jsonl"
    with open(source, "wb") as f:
        f.write(b'{"id": "first", "text": "before the long line"}\n{"text": "')
        block = b"x" * (1 << 20)
        for _ in range(64):
            f.write(block)  # and no line break at the end of the file
    settings = read_env(BatchSettings, {})
    processor = batch.Processor(capability(), settings)
    pred = Location(None, str(tmp_path / "out" / "in.predictions.jsonl"))
    outputs = batch.Outputs(pred, pred.sibling(batch.errors_name(pred.path)))
    summaries: list[batch.Summary] = []
    peak = _peak_bytes(
        lambda: summaries.append(processor.run_local(Location(None, str(source)), outputs))
    )
    assert peak < 8 * 2**20, f"peak {peak / 2**20:.1f} MiB for a 64 MiB line"
    assert [p["id"] for p in read_jsonl(Path(pred.path))] == ["first"]
    assert read_jsonl(Path(outputs.errors.path)) == [
        {
            "id": None,
            "line": 2,
            "error": "the line is longer than 1048576 bytes (BATCH_MAX_LINE_BYTES)",
        }
    ]
    assert (summaries[0].records, summaries[0].errors) == (2, 1)


def test_distinct_options_per_record_do_not_accumulate(tmp_path: Path) -> None:
    """Each record with its own labels: the parsed options used to be kept for the whole file."""
    cap = capability(option_fields=frozenset({"labels"}), parse_options=parse_labels)
    lines = [
        json.dumps({"text": f"text {i}", "labels": [f"label {i} " + "x" * 4000, "other"]})
        for i in range(3000)
    ]  # 12 MB of distinct label sets
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    processor = batch.Processor(cap, read_env(BatchSettings, {"BATCH_CHUNK_SIZE": "64"}))
    pred = Location(None, str(tmp_path / "out" / "in.predictions.jsonl"))
    outputs = batch.Outputs(pred, pred.sibling(batch.errors_name(pred.path)))
    peak = _peak_bytes(lambda: processor.run_local(Location(None, str(source)), outputs))
    assert peak < 6 * 2**20, f"peak {peak / 2**20:.1f} MiB"
    assert len(read_jsonl(Path(pred.path))) == 3000


# --- events that can never succeed are acknowledged -------------------------------------------


def event(data: Any, kind: str = batch.FINALIZED) -> Any:
    from cloudevents.http import CloudEvent

    return CloudEvent({"type": kind, "source": "//storage.googleapis.com/test", "id": "e1"}, data)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"not json", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b"[" * 100_000, "not JSON"),
        ({"bucket": "bkt", "name": "inputs/t.jsonl", "generation": "abc"}, "'generation'"),
        ({"bucket": "bkt", "name": "inputs/t.jsonl", "generation": "9" * 5000}, "'generation'"),
        ({"bucket": "bkt", "name": "inputs/t.jsonl", "generation": 1.5}, "'generation'"),
        ({"bucket": "bkt", "name": "inputs/t.jsonl", "size": "-1"}, "'size'"),
        ({"bucket": "bkt", "name": ["inputs/t.jsonl"]}, "'name'"),
        ({"bucket": "bkt", "name": "inputs/\ud800.jsonl"}, "'name'"),
        ({"bucket": "bkt", "name": "inputs/" + "n" * 1100 + ".jsonl"}, "'name'"),
        ({"bucket": {"x": 1}, "name": "inputs/t.jsonl"}, "'bucket'"),
        ({"bucket": "Not A Bucket!", "name": "inputs/t.jsonl"}, "'bucket'"),
        ({"name": "inputs/t.jsonl"}, "'bucket'"),
    ],
)
def test_a_malformed_event_is_acknowledged_not_raised(
    data: Any, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    processor = batch.Processor(capability(), settings())
    with caplog.at_level("WARNING", logger="aifn.batch"):
        assert processor.handle_event(event(data)) is None
    assert why in caplog.text


def test_other_event_types_are_ignored_whatever_their_data() -> None:
    processor = batch.Processor(capability(), settings())
    assert (
        processor.handle_event(event({"bucket": 1}, kind="google.cloud.storage.object.v1.deleted"))
        is None
    )


def test_a_chunk_of_long_texts_is_predicted_before_it_fills(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BATCH_CHUNK_SIZE records of near-BATCH_MAX_LINE_BYTES texts would all be held at once;
    the chunk is predicted early once its texts pass a character budget."""
    monkeypatch.setattr(batch_engine, "CHUNK_TEXT_CHARS", 2**20, raising=False)
    source = tmp_path / "in.jsonl"
    with open(source, "w", encoding="utf-8") as f:
        for i in range(40):
            f.write(json.dumps({"id": i, "text": f"{i} " + "word " * 100_000}) + "\n")  # 500 kB
    processor = batch.Processor(capability(), settings(BATCH_CHUNK_SIZE="1000"))
    pred = Location(None, str(tmp_path / "out" / "in.predictions.jsonl"))
    outputs = batch.Outputs(pred, pred.sibling(batch.errors_name(pred.path)))
    peak = _peak_bytes(lambda: processor.run_local(Location(None, str(source)), outputs))
    assert peak < 8 * 2**20, f"peak {peak / 2**20:.1f} MiB for 20 MB of texts"
    assert [p["id"] for p in read_jsonl(Path(pred.path))] == list(range(40))
