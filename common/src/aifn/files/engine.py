"""The batch engine: records in, predictions and errors out, chunk by chunk, in input order.

:func:`process` reads a JSONL or CSV stream (see :mod:`aifn.files.storage`), validates each record,
sends each chunk's texts through a capability's ``predict`` (the HTTP path's cache and batcher),
and writes one predictions line per good record and one errors line per bad one, both sorted by
line number. A shard (task ``i`` of ``N``) takes every N-th chunk; :func:`merge` interleaves the
parts back by line number. :class:`BatchSettings` are the knobs; :mod:`aifn.files.processor`
drives it for events, jobs and the command line.
"""

from __future__ import annotations

import dataclasses
import heapq
import json
import logging
import tempfile
import time
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from aifn.core.errors import ConfigError, DeadlineExceeded, InvalidRequest, Overloaded
from aifn.core.model import ModelIdentity, Prediction
from aifn.core.validation import check_string, json_type
from aifn.files import storage
from aifn.files.storage import Location, ObjectInfo, PreconditionFailed
from aifn.settings import positive_int, setting

log = logging.getLogger(__name__)

OVERLOAD_RETRIES = 100
# A chunk is predicted early once its texts hold this many characters (long texts, e.g. near
# BATCH_MAX_LINE_BYTES each): the chunk's memory stays bounded by this as well as by its count.
CHUNK_TEXT_CHARS = 16 * 1024 * 1024

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


def options_json(raw: str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"must be a JSON object ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError(f"must be a JSON object, not {json_type(value)}")
    return value


@dataclass(frozen=True)
class BatchSettings:
    """Settings of the batch entry points and ``python -m aifn.files``."""

    input_prefix: str = setting(
        "BATCH_INPUT_PREFIX",
        "Objects under this prefix are batch inputs: an event for any other object is ignored. "
        "`/` means the whole bucket (then the outputs need another bucket).",
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
        "Where outputs go: `<prefix><input path under BATCH_INPUT_PREFIX>.predictions.jsonl`, "
        "errors beside it as `<...>.errors.jsonl` (the whole input name is kept, so no two "
        "inputs share an output). In the input's bucket it must not overlap the input prefix "
        "(the function would trigger itself).",
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
    max_line_bytes: int = setting(
        "BATCH_MAX_LINE_BYTES",
        "Longest JSONL line (or CSV record) in bytes. A longer one is that record's error, "
        "skipped without being held in memory; with `BATCH_CHUNK_SIZE` it bounds a file's memory "
        "whatever its content.",
        1_048_576,
        parse=positive_int,
    )
    event_max_bytes: int = setting(
        "BATCH_EVENT_MAX_BYTES",
        "Largest file the event path takes (from the object's size). A bigger one is refused "
        "at once, without model work: its errors file says so and points to the job (or `make "
        "batch INPUT=gs://...`). Keep it to what finishes well within the batch service's "
        "request timeout: sentiment reads about 38 KB/s of 20-word texts on 2 vCPUs, so 8 MiB "
        "is about 220 s of Terraform's 600 s.",
        8_388_608,
        parse=positive_int,
    )
    options: Mapping[str, Any] | None = setting(
        "BATCH_OPTIONS",
        'Request fields applied to every record, as a JSON object, e.g. classify\'s `{"labels": '
        "[...]}`; a file's header line and a record's own fields override it.",
        shown_default="unset",
        parse=options_json,
    )

    def check(self) -> None:
        """Refuse a configuration whose outputs would land under the input prefix.

        Raises:
            ConfigError: With the output bucket defaulting to the input's, one prefix contains
                the other.
        """
        if self.output_bucket is None and overlap(self.input_prefix, self.output_prefix):
            raise ConfigError(
                f"BATCH_OUTPUT_PREFIX={self.output_prefix!r} overlaps BATCH_INPUT_PREFIX="
                f"{self.input_prefix!r} in the same bucket: predictions would trigger the function"
            )


def overlap(a: str, b: str) -> bool:
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
        model: The model's identity, recorded with every output.
        predict: Predictions for texts under one set of parsed options, through the function's
            :class:`~aifn.core.predictor.Predictor`; may raise :class:`InvalidRequest` for
            options it rejects.
        option_fields: Request fields a record (or file header, or ``BATCH_OPTIONS``) may set.
        parse_options: Those fields to a hashable value; raises :class:`InvalidRequest`.
    """

    name: str
    model: ModelIdentity
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
    # Why an input was not processed: gone, too big for the event path, someone else's output.
    refused: list[str] = field(default_factory=list)

    @property
    def texts_per_second(self) -> float:
        return self.predictions / self.seconds if self.seconds > 0 else 0.0

    def add(self, other: Summary) -> None:
        for name in ("records", "predictions", "errors", "cached", "seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.outputs += other.outputs
        self.skipped += other.skipped
        self.refused += other.refused

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
        self._pending_chars = 0
        self._failed: list[tuple[int, Any, str]] = []

    def record(self, raw: storage.RawRecord) -> None:
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
        elif isinstance(record_id, str) and not _encodable(record_id):
            # JSON can spell a lone surrogate ("\\ud800") that no UTF-8 output can hold.
            why = f"'{self.settings.id_column}' contains an unpaired surrogate escape"
            self._failed.append((raw.line, None, why))
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
        self._pending_chars += len(text)
        if self._pending_chars > CHUNK_TEXT_CHARS:  # long texts: predict what we hold now
            self.flush()

    def _options(self, fields: Mapping[str, Any]) -> tuple[Hashable, str | None]:
        merged = dict(self.file_options)
        merged.update((k, v) for k, v in fields.items() if k in self.cap.option_fields)
        key = json.dumps(merged, sort_keys=True, ensure_ascii=False)
        if key not in self._parsed:  # each distinct set of options is parsed once per chunk
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
            (self.out if good else self.err).write(dumps(row) + "\n")
            if good:
                self.summary.predictions += 1
            else:
                self.summary.errors += 1
        self._pending.clear()
        self._pending_chars = 0
        self._failed.clear()
        # Parsed options live for one chunk: a file whose every record brings its own options
        # holds one chunk's worth, not the whole file's.
        self._parsed.clear()
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


def dumps(row: Mapping[str, Any]) -> str:
    return json.dumps(row, ensure_ascii=False, separators=(",", ":"))


def _encodable(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


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

    too_long = f"the line is longer than {settings.max_line_bytes} bytes (BATCH_MAX_LINE_BYTES)"
    if fmt == "jsonl":
        first = True
        for number, line in storage.jsonl_lines(stream, settings.max_line_bytes):
            if first and line is not None:
                header = _header(line, capability, settings)
                if header is not None:
                    first = False
                    engine.file_options.update(header)
                    continue
            first = False
            if owned():
                engine.record(
                    _jsonl_record(number, line)
                    if line is not None
                    else storage.RawRecord(number, None, too_long)
                )
    elif fmt == "csv":
        columns, rows = storage.csv_rows(stream, settings.max_line_bytes)
        if settings.text_column not in columns:
            raise storage.UnreadableFile(
                f"the header row {columns} has no column {settings.text_column!r} "
                "(BATCH_TEXT_COLUMN)"
            )
        for number, cells in rows:
            if owned():
                engine.record(_csv_record(number, columns, cells, capability))
    else:
        raise storage.UnreadableFile(f"unknown format {fmt!r}")
    engine.flush()
    engine.summary.seconds = time.perf_counter() - started
    return engine.summary


def _header(line: str, capability: Capability, settings: BatchSettings) -> dict[str, Any] | None:
    """The file's options if the first JSONL line is a header: no text, only request fields."""
    if not capability.option_fields:
        return None
    record = storage.parse_jsonl_line(line)
    if not isinstance(record, dict) or settings.text_column in record or not record:
        return None
    if set(record) <= capability.option_fields:
        return record
    return None


def _jsonl_record(number: int, line: str) -> storage.RawRecord:
    record = storage.parse_jsonl_line(line)
    if isinstance(record, str):
        return storage.RawRecord(number, None, record)
    return storage.RawRecord(number, record)


def _csv_record(
    number: int, columns: list[str], cells: list[str], capability: Capability
) -> storage.RawRecord:
    record = storage.csv_record(columns, cells)
    if isinstance(record, str):
        return storage.RawRecord(number, None, record)
    fields: dict[str, Any] = {}
    for key, value in record.items():
        if key in capability.option_fields:
            if not value.strip():
                continue  # an empty cell: the file's options apply
            fields[key] = _cell_value(value)
        else:
            fields[key] = value
    return storage.RawRecord(number, fields)


def _cell_value(value: str) -> Any:
    """A CSV cell of a request field: JSON for lists, objects and booleans, else the string."""
    stripped = value.strip()
    if stripped[:1] in "[{" or stripped in {"true", "false"}:
        try:
            return json.loads(stripped)
        except (ValueError, RecursionError):  # not JSON, too deep, a number over the digit limit
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
    """A local input's default predictions file: beside it, ``<name>.predictions.jsonl``.

    The whole input name is kept (``t.csv`` -> ``t.csv.predictions.jsonl``), so inputs that
    differ only in their extension never share an output.
    """
    return path + ".predictions.jsonl"


# --- outputs --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outputs:
    predictions: Location
    errors: Location


def outputs_for(settings: BatchSettings, source: Location) -> Outputs:
    """Where a ``gs://`` input's predictions and errors go: the input's path under
    ``BATCH_INPUT_PREFIX``, mirrored under ``BATCH_OUTPUT_PREFIX``, with ``.predictions.jsonl``
    and ``.errors.jsonl`` added to the whole name.

    One input, one pair of names: ``t.csv`` and ``t.csv.jsonl`` (or ``t.jsonl`` and
    ``t.errors.jsonl``) never write to the same object, as they would if a suffix were dropped
    or added only sometimes.
    """
    assert source.bucket is not None
    name = settings.output_prefix + source.path.removeprefix(settings.input_prefix)
    bucket = settings.output_bucket or source.bucket
    return Outputs(
        Location(bucket, name + ".predictions.jsonl"), Location(bucket, name + ".errors.jsonl")
    )


def parts_of(outputs: Outputs, shard: Shard) -> Outputs:
    return Outputs(
        outputs.predictions.sibling(part_name(outputs.predictions.path, shard)),
        outputs.errors.sibling(part_name(outputs.errors.path, shard)),
    )


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
        infos = [storage.stat(p) for p in parts]
        pairs.append((target, parts, infos))
    final = storage.stat(outputs.predictions)
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
    source = first.metadata.get("aifn-source")
    for target, _, _ in pairs:
        existing = storage.stat(target) if target.is_gcs else None
        if existing is not None and existing.metadata.get("aifn-source") != source:
            raise ConfigError(
                f"{target} exists and was not written from {source}; not overwriting it "
                "(delete it, or merge to another --output)"
            )
    for target, parts, infos in pairs:
        _merge_one(target, parts, infos, first)
    for _, parts, _ in pairs:
        for part in parts:
            storage.delete(part)
    return True


def _merge_one(
    target: Location, parts: Sequence[Location], infos: Sequence[ObjectInfo | None], first: Any
) -> None:
    local_dir = None if target.is_gcs else Path(target.path).parent
    with tempfile.TemporaryDirectory(dir=local_dir, prefix=".aifn-merge-") as tmp:
        merged = Path(tmp) / "merged.jsonl"
        counts = {"aifn-records": 0, "aifn-predictions": 0, "aifn-errors": 0}
        with open(merged, "w", encoding="utf-8", newline="\n") as out:
            streams = [storage.open_input(p) for p in parts]
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
        existing = storage.stat(target)
        try:
            storage.publish(
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
