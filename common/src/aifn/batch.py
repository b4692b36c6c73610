"""Batch inference: a file of texts in, a file of predictions out, through the served model.

Three ways in, one engine (:func:`process`):

- **Event**: a function's ``<name>_batch`` CloudEvent entry point receives Cloud Storage's
  "object finalized" event (Eventarc) and calls :meth:`Processor.handle_event`. Objects outside
  ``BATCH_INPUT_PREFIX``, or under the output prefix, are ignored, so the function never
  triggers itself.
- **Job**: ``python -m aifn.batch gs://bucket/inputs/`` in a Cloud Run job; task
  ``CLOUD_RUN_TASK_INDEX`` of ``CLOUD_RUN_TASK_COUNT`` takes every N-th file of a prefix, or every
  N-th chunk of one file (then writes a part, and the last task to finish merges the parts).
- **Local**: the same command on a local file or ``gs://`` path, with a progress bar and a summary.

Input is JSONL (an object per line: ``text``, optional ``id`` and the capability's request
fields) or CSV (a header row; ``text`` and ``id`` columns). Output is one JSONL line per good
input record, ``{"id", "line", "label", "score", "labels", "truncated"}``, in input order, and an
errors file beside it with one ``{"id", "line", "error"}`` line per bad record. Every record is
either predicted or reported; a bad record never fails the file.

Delivery is at least once, so writing is idempotent: outputs carry the input's generation in
their metadata, a redelivered event whose outputs exist is acknowledged without work, and every
upload has a generation precondition (a concurrent duplicate gets 412 and stands down). Outputs
are built in local temporary files and uploaded in one request each: never a partial object.
The model, batching and cache are the HTTP service's (:class:`aifn.service.Service`).
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import importlib.util
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from aifn import batch_io
from aifn.batch_io import Location, ObjectInfo, PreconditionFailed
from aifn.errors import ConfigError, DeadlineExceeded, InvalidRequest, Overloaded
from aifn.model import Prediction
from aifn.service import Service
from aifn.settings import positive_int, read_env, setting
from aifn.validation import check_string, json_type

log = logging.getLogger(__name__)

FINALIZED = "google.cloud.storage.object.v1.finalized"
# Functions this repository ships; a job derives its function from these names (see
# derive_function) when neither --function nor FUNCTION_TARGET says it.
KNOWN_FUNCTIONS = ("sentiment", "classify")
OVERLOAD_RETRIES = 100


# --- settings ------------------------------------------------------------------------------------


def _prefix(raw: str) -> str:
    """An object-name prefix: no leading slash, a trailing one unless empty."""
    value = raw.strip().lstrip("/")
    return value if not value or value.endswith("/") else value + "/"


def _bucket(raw: str) -> str | None:
    value = raw.strip().removeprefix("gs://").rstrip("/")
    if "/" in value:
        raise ValueError("must be a bucket name, without a path")
    return value or None


def _column(raw: str) -> str:
    value = raw.strip()
    if not value:
        raise ValueError("must not be blank")
    return value


def _options(raw: str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"must be a JSON object ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError(f"must be a JSON object, not {json_type(value)}")
    return value


@dataclass(frozen=True)
class BatchSettings:
    """Settings of the batch entry points and ``python -m aifn.batch``."""

    input_prefix: str = setting(
        "BATCH_INPUT_PREFIX",
        "Objects under this prefix are batch inputs: an event for any other object is ignored.",
        "inputs/",
        parse=_prefix,
    )
    output_bucket: str | None = setting(
        "BATCH_OUTPUT_BUCKET",
        "Bucket the predictions and errors files are written to.",
        shown_default="the input's bucket",
        parse=_bucket,
    )
    output_prefix: str = setting(
        "BATCH_OUTPUT_PREFIX",
        "Where outputs go: `<prefix><input path under BATCH_INPUT_PREFIX>` (`.jsonl` appended "
        "unless the name ends with it), errors beside it as `.errors.jsonl`. In the input's "
        "bucket it must not overlap the input prefix (the function would trigger itself).",
        "predictions/",
        parse=_prefix,
    )
    text_column: str = setting(
        "BATCH_TEXT_COLUMN",
        "The JSONL field or CSV column holding the text.",
        "text",
        parse=_column,
    )
    id_column: str = setting(
        "BATCH_ID_COLUMN",
        "The JSONL field or CSV column holding a record's id (optional per record; the line "
        "number stands in when it is missing).",
        "id",
        parse=_column,
    )
    chunk_size: int = setting(
        "BATCH_CHUNK_SIZE",
        "Records read, predicted and written at a time (memory stays bounded by it). Also the "
        "unit a job shards one file by: task i of N takes chunks i, i+N, ...",
        256,
        parse=positive_int,
    )
    options: Mapping[str, Any] | None = setting(
        "BATCH_OPTIONS",
        'Request fields applied to every record, as a JSON object, e.g. classify\'s `{"labels": '
        "[...]}`; a file's header line and a record's own fields override it.",
        shown_default="unset",
        parse=_options,
    )

    def check(self) -> None:
        """Refuse a configuration whose outputs would land under the input prefix.

        Raises:
            ConfigError: With the output bucket defaulting to the input's, one prefix contains
                the other.
        """
        if self.output_bucket is None and _overlap(self.input_prefix, self.output_prefix):
            raise ConfigError(
                f"BATCH_OUTPUT_PREFIX={self.output_prefix!r} overlaps BATCH_INPUT_PREFIX="
                f"{self.input_prefix!r} in the same bucket: predictions would trigger the function"
            )


def _overlap(a: str, b: str) -> bool:
    return a.startswith(b) or b.startswith(a)


# --- what a capability provides ------------------------------------------------------------------


def no_options(fields: Mapping[str, Any]) -> None:
    """The options parser of a capability that takes none (sentiment)."""
    return None


@dataclass(frozen=True)
class Capability:
    """What the engine needs from a function.

    Args:
        name: The function, e.g. ``"sentiment"``.
        service: Its HTTP service (model, batcher, cache, settings).
        predict: Predictions for texts under one set of parsed options, through the service's
            cache and batcher; may raise :class:`InvalidRequest` for options it rejects.
        option_fields: Request fields a record (or file header, or ``BATCH_OPTIONS``) may set.
        parse_options: Those fields to a hashable value; raises :class:`InvalidRequest`.
    """

    name: str
    service: Service
    predict: Callable[[list[str], Any], list[Prediction]]
    option_fields: frozenset[str] = frozenset()
    parse_options: Callable[[Mapping[str, Any]], Hashable] = no_options


# --- the engine ----------------------------------------------------------------------------------


@dataclass
class Summary:
    """What one run did."""

    records: int = 0  # records read (good and bad) in this task's share
    predictions: int = 0
    errors: int = 0
    cached: int = 0
    seconds: float = 0.0
    outputs: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # inputs already done (redelivery)

    @property
    def texts_per_second(self) -> float:
        return self.predictions / self.seconds if self.seconds > 0 else 0.0

    def add(self, other: Summary) -> None:
        for name in ("records", "predictions", "errors", "cached", "seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.outputs += other.outputs
        self.skipped += other.skipped

    def line(self) -> str:
        return (
            f"{self.records} lines: {self.predictions} predicted, {self.errors} errors "
            f"in {self.seconds:.1f} s ({self.texts_per_second:.0f} texts/s, "
            f"{self.cached} from the cache)"
        )


@dataclass(frozen=True)
class Shard:
    """Task ``index`` of ``count``; a single run is ``Shard(0, 1)``."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ConfigError(f"task index {self.index} is not in 0..{self.count - 1}")

    def owns(self, unit: int) -> bool:
        return unit % self.count == self.index


@dataclass
class _Item:
    line: int
    id: Any
    text: str
    options: Hashable


class _Engine:
    """Reads records, validates them, predicts chunk by chunk, writes both outputs in order."""

    def __init__(
        self,
        capability: Capability,
        settings: BatchSettings,
        *,
        file_options: Mapping[str, Any],
        predictions: TextIO,
        errors: TextIO,
        progress: Callable[[Summary], None] | None,
    ) -> None:
        self.cap = capability
        self.settings = settings
        self.file_options = dict(file_options)
        self.out = predictions
        self.err = errors
        self.progress = progress
        self.summary = Summary()
        self._parsed: dict[str, tuple[Hashable, str | None]] = {}
        self._pending: list[_Item] = []
        self._failed: list[tuple[int, Any, str]] = []

    def record(self, raw: batch_io.RawRecord) -> None:
        """Validate one record and queue it (or its error) for the current chunk."""
        self.summary.records += 1
        fields = raw.fields
        if fields is None:
            self._failed.append((raw.line, None, raw.error or "unreadable"))
            return
        record_id = fields.get(self.settings.id_column)
        if record_id is None or record_id == "":
            record_id = raw.line
        elif isinstance(record_id, bool) or not isinstance(record_id, (str, int)):
            self._failed.append(
                (
                    raw.line,
                    None,
                    f"'{self.settings.id_column}' must be a string or an integer, "
                    f"not {json_type(record_id)}",
                )
            )
            return
        try:
            text = check_string(fields.get(self.settings.text_column), self.settings.text_column)
        except InvalidRequest as exc:
            column = self.settings.text_column
            why = f"'{column}' is missing" if column not in fields else exc.message
            self._failed.append((raw.line, record_id, why))
            return
        options, problem = self._options(fields)
        if problem is not None:
            self._failed.append((raw.line, record_id, problem))
            return
        self._pending.append(_Item(raw.line, record_id, text, options))

    def _options(self, fields: Mapping[str, Any]) -> tuple[Hashable, str | None]:
        merged = dict(self.file_options)
        merged.update((k, v) for k, v in fields.items() if k in self.cap.option_fields)
        key = json.dumps(merged, sort_keys=True, ensure_ascii=False)
        if key not in self._parsed:  # each distinct set of options is parsed once
            try:
                self._parsed[key] = (self.cap.parse_options(merged), None)
            except InvalidRequest as exc:
                self._parsed[key] = (None, exc.message)
        return self._parsed[key]

    def flush(self) -> None:
        """Predict the queued records and write them and the chunk's errors, in line order."""
        rows: list[tuple[int, bool, dict[str, Any]]] = [
            (line, False, {"id": rid, "line": line, "error": why})
            for line, rid, why in self._failed
        ]
        groups: dict[Hashable, list[_Item]] = {}
        for item in self._pending:
            groups.setdefault(item.options, []).append(item)
        for options, items in groups.items():
            # Similar lengths side by side: less padding in each forward pass.
            items.sort(key=lambda it: len(it.text))
            try:
                predictions = self._predict([it.text for it in items], options)
            except InvalidRequest as exc:
                rows += [(it.line, False, {"id": it.id, "line": it.line, "error": exc.message})
                         for it in items]  # fmt: skip
                continue
            for item, prediction in zip(items, predictions, strict=True):
                self.summary.cached += bool(prediction.cached)
                result = dataclasses.replace(prediction, cached=None).to_json()
                rows.append((item.line, True, {"id": item.id, "line": item.line, **result}))
        rows.sort(key=lambda row: row[0])
        for _, good, row in rows:
            (self.out if good else self.err).write(_dumps(row) + "\n")
            if good:
                self.summary.predictions += 1
            else:
                self.summary.errors += 1
        self._pending.clear()
        self._failed.clear()
        if self.progress is not None:
            self.progress(self.summary)

    def _predict(self, texts: list[str], options: Hashable) -> list[Prediction]:
        """The capability's predictions; waits and retries while the instance is at capacity."""
        for attempt in range(OVERLOAD_RETRIES):
            try:
                return self.cap.predict(texts, options)
            except (Overloaded, DeadlineExceeded):
                if attempt == OVERLOAD_RETRIES - 1:
                    raise
                time.sleep(min(0.05 * 2**attempt, 2.0))
        raise AssertionError("unreachable")


def _dumps(row: Mapping[str, Any]) -> str:
    return json.dumps(row, ensure_ascii=False, separators=(",", ":"))


def process(
    stream: Any,
    fmt: str,
    capability: Capability,
    settings: BatchSettings,
    *,
    predictions: TextIO,
    errors: TextIO,
    options: Mapping[str, Any] | None = None,
    shard: Shard = Shard(),
    progress: Callable[[Summary], None] | None = None,
) -> Summary:
    """Predict every record of ``stream`` (binary, ``fmt`` ``"jsonl"`` or ``"csv"``) in this shard.

    Records are numbered in file order and grouped into chunks of ``settings.chunk_size``; the
    shard owns chunks ``index``, ``index + count``, ... Memory holds one chunk at a time.

    Args:
        options: Request fields for every record (beneath the file's header and the record's).

    Returns:
        The counts; the outputs were written to ``predictions`` and ``errors``.

    Raises:
        UnreadableFile: The file as a whole cannot be read (a CSV without its text column).
    """
    started = time.perf_counter()
    file_options = dict(settings.options or {})
    file_options.update(options or {})
    engine = _Engine(
        capability,
        settings,
        file_options=file_options,
        predictions=predictions,
        errors=errors,
        progress=progress,
    )
    chunk = settings.chunk_size
    ordinal = -1

    def owned() -> bool:
        """Advance to the next record; flush when it starts a new chunk; True if ours."""
        nonlocal ordinal
        ordinal += 1
        if ordinal and ordinal % chunk == 0:
            engine.flush()
        return shard.owns(ordinal // chunk)

    if fmt == "jsonl":
        first = True
        for number, line in batch_io.jsonl_lines(stream):
            if first:
                first = False
                header = _header(line, capability, settings)
                if header is not None:
                    engine.file_options.update(header)
                    continue
            if owned():
                engine.record(_jsonl_record(number, line))
    elif fmt == "csv":
        columns, rows = batch_io.csv_rows(stream)
        if settings.text_column not in columns:
            raise batch_io.UnreadableFile(
                f"the header row {columns} has no column {settings.text_column!r} "
                "(BATCH_TEXT_COLUMN)"
            )
        for number, cells in rows:
            if owned():
                engine.record(_csv_record(number, columns, cells, capability))
    else:
        raise batch_io.UnreadableFile(f"unknown format {fmt!r}")
    engine.flush()
    engine.summary.seconds = time.perf_counter() - started
    return engine.summary


def _header(line: str, capability: Capability, settings: BatchSettings) -> dict[str, Any] | None:
    """The file's options if the first JSONL line is a header: no text, only request fields."""
    if not capability.option_fields:
        return None
    record = batch_io.parse_jsonl_line(line)
    if not isinstance(record, dict) or settings.text_column in record or not record:
        return None
    if set(record) <= capability.option_fields:
        return record
    return None


def _jsonl_record(number: int, line: str) -> batch_io.RawRecord:
    record = batch_io.parse_jsonl_line(line)
    if isinstance(record, str):
        return batch_io.RawRecord(number, None, record)
    return batch_io.RawRecord(number, record)


def _csv_record(
    number: int, columns: list[str], cells: list[str], capability: Capability
) -> batch_io.RawRecord:
    record = batch_io.csv_record(columns, cells)
    if isinstance(record, str):
        return batch_io.RawRecord(number, None, record)
    fields: dict[str, Any] = {}
    for key, value in record.items():
        if key in capability.option_fields:
            if not value.strip():
                continue  # an empty cell: the file's options apply
            fields[key] = _cell_value(value)
        else:
            fields[key] = value
    return batch_io.RawRecord(number, fields)


def _cell_value(value: str) -> Any:
    """A CSV cell of a request field: JSON for lists, objects and booleans, else the string."""
    stripped = value.strip()
    if stripped[:1] in "[{" or stripped in {"true", "false"}:
        try:
            return json.loads(stripped)
        except ValueError:
            return value
    return value


# --- names ---------------------------------------------------------------------------------------


def errors_name(predictions: str) -> str:
    """The errors file beside a predictions file."""
    for suffix in (".predictions.jsonl", ".jsonl"):
        if predictions.endswith(suffix):
            return predictions.removesuffix(suffix) + ".errors.jsonl"
    return predictions + ".errors.jsonl"


def part_name(name: str, shard: Shard) -> str:
    """``x.jsonl`` -> ``x.part-00000-of-00002.jsonl`` for task 0 of 2."""
    return f"{name.removesuffix('.jsonl')}.part-{shard.index:05d}-of-{shard.count:05d}.jsonl"


def local_output(path: str) -> str:
    """A local input's default predictions file: beside it, ``<stem>.predictions.jsonl``."""
    p = Path(path)
    return str(p.with_name(p.with_suffix("").name + ".predictions.jsonl"))


# --- the processor: events, jobs, local runs ------------------------------------------------------


@dataclass(frozen=True)
class Outputs:
    predictions: Location
    errors: Location


def outputs_for(settings: BatchSettings, source: Location) -> Outputs:
    """Where a ``gs://`` input's predictions and errors go: the input's path under
    ``BATCH_INPUT_PREFIX``, mirrored under ``BATCH_OUTPUT_PREFIX``."""
    assert source.bucket is not None
    name = settings.output_prefix + source.path.removeprefix(settings.input_prefix)
    if not name.endswith(".jsonl"):
        name += ".jsonl"
    bucket = settings.output_bucket or source.bucket
    return Outputs(Location(bucket, name), Location(bucket, errors_name(name)))


def _parts(outputs: Outputs, shard: Shard) -> Outputs:
    return Outputs(
        outputs.predictions.sibling(part_name(outputs.predictions.path, shard)),
        outputs.errors.sibling(part_name(outputs.errors.path, shard)),
    )


_PROCESSORS: dict[str, Processor] = {}


class Processor:
    """A function's batch side: turns input files into outputs with :func:`process`."""

    def __init__(self, capability: Capability, settings: BatchSettings) -> None:
        settings.check()
        self.capability = capability
        self.settings = settings

    @classmethod
    def start(
        cls,
        service: Service,
        *,
        predict: Callable[[list[str], Any], list[Prediction]],
        option_fields: frozenset[str] = frozenset(),
        parse_options: Callable[[Mapping[str, Any]], Hashable] = no_options,
    ) -> Processor:
        """Build the function's processor at start-up (from its ``main.py``).

        Reads :class:`BatchSettings` (exiting with a message naming a bad variable), and, inside
        functions-framework's app, answers ``GET /v1/health`` there too: a CloudEvent function's
        app has no GET routes, and Cloud Run's startup probe needs one.

        Raises:
            SystemExit: A batch setting is invalid.
        """
        try:
            settings = read_env(BatchSettings)
            processor = cls(
                Capability(
                    name=service.function,
                    service=service,
                    predict=predict,
                    option_fields=option_fields,
                    parse_options=parse_options,
                ),
                settings,
            )
        except ConfigError as exc:
            raise SystemExit(f"{service.function}: configuration error: {exc}") from None
        _PROCESSORS[service.function] = processor
        import flask

        if flask.has_app_context():
            app = flask.current_app
            for path in ("/v1/health", "/openapi.json"):
                app.add_url_rule(
                    path,
                    endpoint=f"aifn-batch{path}",
                    view_func=lambda: service(flask.request),
                    methods=["GET"],
                )
        return processor

    # names

    def outputs_for(self, source: Location) -> Outputs:
        return outputs_for(self.settings, source)

    def is_input(self, bucket: str, name: str) -> str | None:
        """``None`` if the object is ours to process, else why it is ignored."""
        if not name.startswith(self.settings.input_prefix):
            return f"outside the input prefix {self.settings.input_prefix!r}"
        if name.endswith("/"):
            return "a folder placeholder"
        out_bucket = self.settings.output_bucket or bucket
        if out_bucket == bucket and name.startswith(self.settings.output_prefix):
            return f"under the output prefix {self.settings.output_prefix!r} (our own output)"
        if out_bucket == bucket and _overlap(
            self.settings.input_prefix, self.settings.output_prefix
        ):
            return "the input and output prefixes overlap in this bucket; refusing to loop"
        if batch_io.file_format(name) is None:
            return "not a .jsonl, .ndjson or .csv file"
        return None

    # events

    def handle_event(self, event: Any) -> Summary | None:
        """Process the object a Cloud Storage "finalized" CloudEvent names, at most once.

        Returns ``None`` when the event is not ours (wrong type, outside the input prefix, our own
        output, not a supported file). Raises on transient failures, so the event is redelivered.
        """
        kind = event["type"]
        data = event.data if isinstance(event.data, dict) else json.loads(event.data or b"{}")
        bucket, name = data.get("bucket"), data.get("name")
        fields = {"event_id": event["id"], "bucket": bucket, "object": name, "type": kind}
        if kind != FINALIZED or not bucket or not name:
            log.info("ignored event: not an object-finalized event", extra={"fields": fields})
            return None
        why = self.is_input(bucket, name)
        if why is not None:
            log.info("ignored %s: %s", name, why, extra={"fields": fields})
            return None
        generation = int(data["generation"]) if data.get("generation") else None
        summary = self.run_object(Location(bucket, name), generation)
        log.info(
            "batch %s: %s",
            name,
            "already done (redelivery)" if summary.skipped else summary.line(),
            extra={
                "fields": {
                    **fields,
                    "records": summary.records,
                    "predictions": summary.predictions,
                    "errors": summary.errors,
                    "texts_per_second": round(summary.texts_per_second, 1),
                }
            },
        )
        return summary

    def run_object(
        self,
        source: Location,
        generation: int | None,
        *,
        outputs: Outputs | None = None,
        shard: Shard = Shard(),
        options: Mapping[str, Any] | None = None,
        progress: Callable[[Summary], None] | None = None,
        size: Callable[[int], None] | None = None,
    ) -> Summary:
        """Process one ``gs://`` object idempotently (one shard of it when ``shard.count > 1``)."""
        outputs = outputs or self.outputs_for(source)
        if generation is None:
            info = batch_io.stat(source)
            if info is None:
                log.warning("%s no longer exists; nothing to do", source)
                return Summary(skipped=[str(source)])
            generation = info.generation
        tag = {"aifn-source": str(source), "aifn-source-generation": str(generation)}
        targets = outputs
        if shard.count > 1:
            final = batch_io.stat(outputs.predictions)
            if final is not None and _same_source(final, tag):  # merged by an earlier run
                return Summary(skipped=[str(source)])
            targets = _parts(outputs, shard)
        existing = batch_io.stat(targets.predictions)
        if existing is not None and _same_source(existing, tag):
            summary = Summary(skipped=[str(source)])
        else:
            if existing is not None and _newer_source(existing, tag):
                log.warning(
                    "%s: a newer version of %s is already done", targets.predictions, source
                )
                return Summary(skipped=[str(source)])
            try:
                with batch_io.open_input(source, generation=generation, on_bytes=size) as stream:
                    summary = self._write(
                        stream,
                        batch_io.file_format(source.path) or "",
                        targets,
                        tag=tag,
                        expect=existing,
                        shard=shard,
                        options=options,
                        progress=progress,
                    )
            except FileNotFoundError:
                log.warning("%s generation %s no longer exists; nothing to do", source, generation)
                return Summary(skipped=[str(source)])
        if shard.count > 1:
            merge(outputs, shard.count)
        return summary

    def run_local(
        self,
        source: Location,
        outputs: Outputs,
        *,
        shard: Shard = Shard(),
        options: Mapping[str, Any] | None = None,
        progress: Callable[[Summary], None] | None = None,
        size: Callable[[int], None] | None = None,
    ) -> Summary:
        """Process a local file (always rewriting its outputs)."""
        targets = _parts(outputs, shard) if shard.count > 1 else outputs
        with batch_io.open_input(source, on_bytes=size) as stream:
            summary = self._write(
                stream,
                batch_io.file_format(source.path) or "",
                targets,
                tag={"aifn-source": str(source)},
                expect=None,
                shard=shard,
                options=options,
                progress=progress,
                overwrite=True,
            )
        if shard.count > 1:
            merge(outputs, shard.count)
        return summary

    def _write(
        self,
        stream: Any,
        fmt: str,
        targets: Outputs,
        *,
        tag: dict[str, str],
        expect: ObjectInfo | None,
        shard: Shard,
        options: Mapping[str, Any] | None,
        progress: Callable[[Summary], None] | None,
        overwrite: bool = False,
    ) -> Summary:
        """Run the engine into temporary files, then publish errors, then predictions.

        Predictions go last: their existence (with the input's generation) is what marks the
        input done, so a crash in between is redone in full on redelivery.
        """
        local_dir = None if targets.predictions.is_gcs else Path(targets.predictions.path).parent
        if local_dir is not None:
            local_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=local_dir, prefix=".aifn-batch-") as tmp:
            pred_file, err_file = Path(tmp) / "predictions.jsonl", Path(tmp) / "errors.jsonl"
            with (
                open(pred_file, "w", encoding="utf-8", newline="\n") as out,
                open(err_file, "w", encoding="utf-8", newline="\n") as err,
            ):
                try:
                    summary = process(
                        stream,
                        fmt,
                        self.capability,
                        self.settings,
                        predictions=out,
                        errors=err,
                        options=options,
                        shard=shard,
                        progress=progress,
                    )
                except batch_io.UnreadableFile as exc:  # the whole file: say so, once
                    summary = Summary(errors=1)
                    err.write(_dumps({"id": None, "line": None, "error": str(exc)}) + "\n")
            model = self.capability.service.model.identity
            metadata = {
                **tag,
                "aifn-function": self.capability.name,
                "aifn-model": model.name,
                "aifn-model-revision": model.revision,
                "aifn-records": str(summary.records),
                "aifn-predictions": str(summary.predictions),
                "aifn-errors": str(summary.errors),
            }
            try:
                for file, target in ((err_file, targets.errors), (pred_file, targets.predictions)):
                    if overwrite or not target.is_gcs:
                        batch_io.publish(file, target, metadata=metadata)
                        continue
                    seen = expect if target == targets.predictions else batch_io.stat(target)
                    if seen is not None and target == targets.errors and _same_source(seen, tag):
                        continue  # written by an earlier, interrupted delivery: the same content
                    batch_io.publish(
                        file,
                        target,
                        metadata=metadata,
                        if_generation_match=seen.generation if seen is not None else 0,
                    )
            except PreconditionFailed as exc:
                log.info("%s was written by a concurrent delivery; leaving it", exc)
                summary.skipped.append(str(targets.predictions))
                return summary
        summary.outputs += [str(targets.predictions), str(targets.errors)]
        return summary

    def run_prefix(
        self,
        prefix: Location,
        *,
        shard: Shard = Shard(),
        options: Mapping[str, Any] | None = None,
        progress: Callable[[Summary], None] | None = None,
    ) -> Summary:
        """A job task's share of a ``gs://`` prefix: files ``index``, ``index + count``, ..."""
        assert prefix.bucket is not None
        files = [
            (name, generation)
            for name, generation in batch_io.list_objects(prefix)
            if self.is_input(prefix.bucket, name) is None
        ]
        total = Summary()
        mine = [f for i, f in enumerate(files) if shard.owns(i)]
        log.info(
            "task %d of %d: %d of %d files under %s",
            shard.index,
            shard.count,
            len(mine),
            len(files),
            prefix,
        )
        for name, generation in mine:
            total.add(
                self.run_object(
                    prefix.sibling(name), generation, options=options, progress=progress
                )
            )
        return total


def _same_source(info: ObjectInfo, tag: Mapping[str, str]) -> bool:
    return all(info.metadata.get(k) == v for k, v in tag.items())


def _newer_source(info: ObjectInfo, tag: Mapping[str, str]) -> bool:
    """The existing output was made from a later generation of the same input."""
    if info.metadata.get("aifn-source") != tag.get("aifn-source"):
        return False
    try:
        return int(info.metadata["aifn-source-generation"]) > int(tag["aifn-source-generation"])
    except (KeyError, ValueError):
        return False


# --- merging parts -------------------------------------------------------------------------------


def merge(outputs: Outputs, count: int) -> bool:
    """Merge the ``count`` parts of both outputs into the final files, once all exist.

    Each part is sorted by line number, so the merge is a streaming k-way merge: the result is
    byte for byte what a single task writes. The parts are deleted afterwards. Safe to call from
    every task and again later: until all parts exist it does nothing, and a finished merge is
    not redone.

    Returns:
        True when the final files exist (merged now or before).

    Raises:
        ConfigError: The parts were made from different versions of the input.
    """
    pairs = []
    for target in (outputs.errors, outputs.predictions):
        parts = [target.sibling(part_name(target.path, Shard(i, count))) for i in range(count)]
        infos = [batch_io.stat(p) for p in parts]
        pairs.append((target, parts, infos))
    final = batch_io.stat(outputs.predictions)
    part_infos = [i for _, _, infos in pairs for i in infos]
    if any(i is None for i in part_infos):
        if final is not None:
            return True
        log.info("%s: waiting for %d more part(s)", outputs.predictions,
                 sum(i is None for i in part_infos))  # fmt: skip
        return False
    sources = {
        (i.metadata.get("aifn-source"), i.metadata.get("aifn-source-generation"))
        for i in part_infos
        if i is not None
    }
    if len(sources) > 1:
        raise ConfigError(
            f"{outputs.predictions}: the parts come from different inputs "
            f"{sorted(map(str, sources))}; delete them and run the job again"
        )
    first = next(i for i in part_infos if i is not None)
    for target, parts, infos in pairs:
        _merge_one(target, parts, infos, first)
    for _, parts, _ in pairs:
        for part in parts:
            batch_io.delete(part)
    return True


def _merge_one(
    target: Location, parts: Sequence[Location], infos: Sequence[ObjectInfo | None], first: Any
) -> None:
    local_dir = None if target.is_gcs else Path(target.path).parent
    with tempfile.TemporaryDirectory(dir=local_dir, prefix=".aifn-merge-") as tmp:
        merged = Path(tmp) / "merged.jsonl"
        counts = {"aifn-records": 0, "aifn-predictions": 0, "aifn-errors": 0}
        with open(merged, "w", encoding="utf-8", newline="\n") as out:
            streams = [batch_io.open_input(p) for p in parts]
            try:
                readers = [_lines(s.__enter__()) for s in streams]
                for _, line in heapq.merge(*readers, key=lambda pair: pair[0]):
                    out.write(line)
            finally:
                for s in streams:
                    s.__exit__(None, None, None)
        for info in infos:
            assert info is not None
            for key in counts:
                counts[key] += int(info.metadata.get(key, 0) or 0)
        metadata = dict(first.metadata)
        metadata.update({k: str(v) for k, v in counts.items()})
        existing = batch_io.stat(target)
        try:
            batch_io.publish(
                merged,
                target,
                metadata=metadata if target.is_gcs else None,
                if_generation_match=(
                    (existing.generation if existing is not None else 0) if target.is_gcs else None
                ),
            )
        except PreconditionFailed:
            log.info("%s: merged by another task", target)


def _lines(stream: Any) -> Iterator[tuple[float, str]]:
    for raw in stream:
        line = raw.decode("utf-8")
        number = json.loads(line).get("line")
        yield (number if isinstance(number, int) else -1), line


# --- the command line ----------------------------------------------------------------------------


def derive_function(explicit: str | None, environ: Mapping[str, str] | None = None) -> str:
    """The function to run: ``--function``, else ``FUNCTION_TARGET`` (``<name>`` or
    ``<name>_batch``), else the one known function named in ``CLOUD_RUN_JOB`` or ``K_SERVICE``.

    Raises:
        ConfigError: None of them says.
    """
    env = os.environ if environ is None else environ
    if explicit:
        return explicit
    target = env.get("FUNCTION_TARGET", "").strip()
    if target:
        return target.removesuffix("_batch")
    for var in ("CLOUD_RUN_JOB", "K_SERVICE"):
        named = [f for f in KNOWN_FUNCTIONS if f in env.get(var, "")]
        if len(named) == 1:
            return named[0]
    raise ConfigError("which function? pass --function sentiment|classify, or set FUNCTION_TARGET")


def function_source(
    name: str, explicit: str | None, environ: Mapping[str, str] | None = None
) -> Path:
    """The function's ``main.py``: ``--source``, ``FUNCTION_SOURCE``, ``functions/<name>/main.py``
    under the working directory or this repository, or ``main.py`` in the working directory.

    Raises:
        ConfigError: None exists.
    """
    env = os.environ if environ is None else environ
    repo = Path(__file__).resolve().parents[3]
    candidates = [
        explicit,
        env.get("FUNCTION_SOURCE"),
        Path.cwd() / "functions" / name / "main.py",
        repo / "functions" / name / "main.py",
        Path.cwd() / "main.py",
    ]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise ConfigError(f"cannot find the {name} function's main.py; pass --source PATH")


def load_processor(name: str, source: Path) -> Processor:
    """Import the function's ``main.py`` as functions-framework does; it starts the model."""
    if name not in _PROCESSORS:
        directory = str(source.resolve().parent)
        if directory not in sys.path:  # the source's siblings (zero_shot.py, ...) import as such
            sys.path.append(directory)
        spec = importlib.util.spec_from_file_location("main", source.resolve())
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["main"] = module
        spec.loader.exec_module(module)
    if name not in _PROCESSORS:
        raise ConfigError(f"{source} does not start a batch processor for {name!r}")
    return _PROCESSORS[name]


def _shard_from_env(args: argparse.Namespace) -> Shard:
    index = args.task_index
    count = args.task_count
    if index is None:
        index = int(os.environ.get("CLOUD_RUN_TASK_INDEX", "0") or 0)
    if count is None:
        count = int(os.environ.get("CLOUD_RUN_TASK_COUNT", "1") or 1)
    return Shard(index, count)


def _outputs(settings: BatchSettings, source: Location, output: str | None) -> Outputs:
    if output:
        target = Location.parse(output)
        return Outputs(target, target.sibling(errors_name(target.path)))
    if source.is_gcs:
        return outputs_for(settings, source)
    pred = Location(None, local_output(source.path))
    return Outputs(pred, pred.sibling(errors_name(pred.path)))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m aifn.batch",
        description="Batch inference over a JSONL or CSV file (local or gs://) or a gs:// prefix. "
        "`python -m aifn.batch merge INPUT` merges a sharded run's parts.",
    )
    parser.add_argument("input", help="a local file, gs://BUCKET/OBJECT, or gs://BUCKET/PREFIX/")
    parser.add_argument(
        "--output",
        help="predictions file (local or gs://); errors go beside it. Default: for gs:// inputs "
        "BATCH_OUTPUT_BUCKET/BATCH_OUTPUT_PREFIX mirroring the input path; for a local file "
        "<stem>.predictions.jsonl beside it",
    )
    parser.add_argument(
        "--function",
        choices=KNOWN_FUNCTIONS,
        help="default: from FUNCTION_TARGET, or the function named in CLOUD_RUN_JOB / K_SERVICE",
    )
    parser.add_argument("--source", help="the function's main.py (default: found, see README)")
    parser.add_argument(
        "--options",
        type=_options,
        default=None,
        help='request fields for every record, JSON, e.g. \'{"labels": ["a", "b"]}\'',
    )
    parser.add_argument("--task-index", type=int, help="default: CLOUD_RUN_TASK_INDEX or 0")
    parser.add_argument("--task-count", type=int, help="default: CLOUD_RUN_TASK_COUNT or 1")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _merge_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m aifn.batch merge",
        description="Merge the parts a sharded run wrote into the final predictions and errors "
        "files (the last task does this by itself; this is for doing it by hand).",
    )
    parser.add_argument("input", help="the input file the sharded run read")
    parser.add_argument("--output", help="the predictions file, as given to the run")
    parser.add_argument("--task-count", type=int, help="default: CLOUD_RUN_TASK_COUNT")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m aifn.batch [merge] INPUT [options]``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["merge"]:
            return _merge_main(argv[1:])
        return _run_main(argv)
    except ConfigError as exc:
        print(f"aifn.batch: {exc}", file=sys.stderr)
        return 2


def _merge_main(argv: list[str]) -> int:
    args = _merge_parser().parse_args(argv)
    count = args.task_count or int(os.environ.get("CLOUD_RUN_TASK_COUNT", "0") or 0)
    if count < 2:
        raise ConfigError("merge needs --task-count N (N >= 2), the run's task count")
    settings = read_env(BatchSettings)
    outputs = _outputs(settings, Location.parse(args.input), args.output)
    if not merge(outputs, count):
        print(f"not all {count} parts of {outputs.predictions} exist yet", file=sys.stderr)
        return 1
    print(f"merged: {outputs.predictions} and {outputs.errors}")
    return 0


def _run_main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    name = derive_function(args.function)
    try:
        source = Location.parse(args.input)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    shard = _shard_from_env(args)
    if not source.is_gcs and not Path(source.path).is_file():
        raise ConfigError(f"{source}: no such file")
    if batch_io.file_format(source.path) is None and not (
        source.is_gcs and (source.path.endswith("/") or not source.path)
    ):
        raise ConfigError(f"{source}: not a .jsonl, .ndjson or .csv file (or a gs:// prefix/)")
    processor = load_processor(name, function_source(name, args.source))
    started = time.perf_counter()
    bar = _progress_bar(source, disable=args.no_progress)
    try:
        if source.is_gcs and (source.path.endswith("/") or not source.path):
            if args.output:
                raise ConfigError("--output applies to one file; a prefix uses BATCH_OUTPUT_*")
            summary = processor.run_prefix(
                source, shard=shard, options=args.options, progress=bar.summary
            )
        else:
            outputs = _outputs(processor.settings, source, args.output)
            if source.is_gcs and batch_io.stat(source) is None:
                raise ConfigError(f"{source}: no such object")
            if source.is_gcs:
                summary = processor.run_object(
                    source,
                    None,
                    outputs=outputs,
                    shard=shard,
                    options=args.options,
                    progress=bar.summary,
                    size=bar.bytes,
                )
            else:
                summary = processor.run_local(
                    source,
                    outputs,
                    shard=shard,
                    options=args.options,
                    progress=bar.summary,
                    size=bar.bytes,
                )
    finally:
        bar.close()
    wall = time.perf_counter() - started
    print(
        f"{name}: {summary.line()}; {wall:.1f} s wall"
        + (f"; task {shard.index + 1} of {shard.count}" if shard.count > 1 else "")
    )
    for output in summary.outputs:
        print(f"  wrote {output}")
    for skipped in summary.skipped:
        print(f"  already done: {skipped}")
    return 0


class _Progress:
    """A tqdm bar over the input's bytes, with lines, errors and texts/s beside it."""

    def __init__(self, total: int | None, disable: bool) -> None:
        from tqdm import tqdm

        self._bar = tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            disable=disable,
            desc="batch",
            file=sys.stderr,
        )
        self._started = time.perf_counter()

    def bytes(self, n: int) -> None:
        self._bar.update(n)

    def summary(self, summary: Summary) -> None:
        seconds = time.perf_counter() - self._started
        self._bar.set_postfix(
            lines=summary.records,
            errors=summary.errors,
            texts_s=f"{summary.predictions / seconds:.0f}" if seconds > 0 else "-",
            refresh=False,
        )

    def close(self) -> None:
        self._bar.close()


def _progress_bar(source: Location, *, disable: bool) -> _Progress:
    info = None if source.path.endswith("/") or not source.path else batch_io.stat(source)
    return _Progress(info.size if info is not None else None, disable)


if __name__ == "__main__":
    # Run as the imported module, not as __main__: a function's main.py registers its processor
    # in aifn.batch, which would otherwise be a second copy of this module.
    from aifn import batch

    raise SystemExit(batch.main())
