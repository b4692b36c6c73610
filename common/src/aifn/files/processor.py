"""Batch inference: a file of texts in, a file of predictions out, through the served model.

Three ways in, one engine (:func:`aifn.files.engine.process`):

- **Event**: a function's ``<name>_batch`` CloudEvent entry point receives Cloud Storage's
  "object finalized" event (Eventarc) and calls :meth:`Processor.handle_event`. Objects outside
  ``BATCH_INPUT_PREFIX``, or under the output prefix, are ignored, so the function never
  triggers itself.
- **Job**: ``python -m aifn.files gs://bucket/inputs/`` in a Cloud Run job; task
  ``CLOUD_RUN_TASK_INDEX`` of ``CLOUD_RUN_TASK_COUNT`` takes every N-th file of a prefix, or every
  N-th chunk of one file (then writes a part, and the last task to finish merges the parts).
- **Local**: the same command on a local file or ``gs://`` path, with a progress bar and a summary.

Input is JSONL (an object per line: ``text``, optional ``id`` and the capability's request
fields) or CSV (a header row; ``text`` and ``id`` columns). Output is one JSONL line per good
input record, ``{"id", "line", "label", "score", "labels", "truncated"}``, in input order, in
``<input name>.predictions.jsonl``, and ``<input name>.errors.jsonl`` beside it with one
``{"id", "line", "error"}`` line per bad record. Every record is either predicted or reported; a
bad record never fails the file, and no record can hold the process's memory (lines over
``BATCH_MAX_LINE_BYTES`` are skipped unread).

An event that can never succeed is acknowledged and logged (a malformed payload, an object that
is gone, a file over ``BATCH_EVENT_MAX_BYTES``, which gets an errors file pointing to the job);
transient failures (Cloud Storage, a model that stays overloaded) raise, so Eventarc retries. An
existing output written from another input is never overwritten.

Delivery is at least once, so writing is idempotent: outputs carry the input's generation in
their metadata, a redelivered event whose outputs exist is acknowledged without work, and every
upload has a generation precondition (a concurrent duplicate gets 412 and stands down). Outputs
are built in local temporary files and uploaded in one request each: never a partial object.
The model, batching and cache are the function's :class:`~aifn.core.predictor.Predictor`'s,
the same as its HTTP endpoints use.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aifn.core.errors import ConfigError
from aifn.core.model import Prediction
from aifn.core.predictor import Predictor
from aifn.files import storage
from aifn.files.engine import (
    BatchSettings,
    Capability,
    Outputs,
    Shard,
    Summary,
    dumps,
    errors_name,
    local_output,
    merge,
    no_options,
    options_json,
    outputs_for,
    overlap,
    part_name,
    parts_of,
    process,
)
from aifn.files.storage import Location, ObjectInfo, PreconditionFailed
from aifn.settings import read_env

__all__ = [
    "FINALIZED",
    "REFUSED",
    "BatchSettings",
    "Capability",
    "ObjectEvent",
    "Outputs",
    "Processor",
    "Shard",
    "Summary",
    "derive_function",
    "errors_name",
    "local_output",
    "main",
    "merge",
    "outputs_for",
    "parse_event",
    "part_name",
]

# Named as before the package split: dashboards and log-based metrics filter on it
# (infra/terraform/monitoring.tf).
log = logging.getLogger("aifn.batch")

FINALIZED = "google.cloud.storage.object.v1.finalized"
# Metadata key of an errors file that says the input was refused, not processed.
REFUSED = "aifn-refused"
# Functions this repository ships; a job derives its function from these names (see
# derive_function) when neither --function nor FUNCTION_TARGET says it.
KNOWN_FUNCTIONS = ("sentiment", "classify")


# --- the processor: events, jobs, local runs ------------------------------------------------------


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
        name: str,
        predictor: Predictor,
        *,
        predict: Callable[[list[str], Any], list[Prediction]],
        option_fields: frozenset[str] = frozenset(),
        parse_options: Callable[[Mapping[str, Any]], Hashable] = no_options,
        http: Callable[[Any], Any] | None = None,
    ) -> Processor:
        """Build the function's processor at start-up (from its ``main.py``).

        Reads :class:`BatchSettings` (exiting with a message naming a bad variable), and, inside
        functions-framework's app, answers ``GET /v1/health`` there too with ``http`` (the
        function's HTTP service): a CloudEvent function's app has no GET routes, and Cloud Run's
        startup probe needs one.

        Raises:
            SystemExit: A batch setting is invalid.
        """
        try:
            settings = read_env(BatchSettings)
            processor = cls(
                Capability(
                    name=name,
                    model=predictor.model.identity,
                    predict=predict,
                    option_fields=option_fields,
                    parse_options=parse_options,
                ),
                settings,
            )
        except ConfigError as exc:
            raise SystemExit(f"{name}: configuration error: {exc}") from None
        _PROCESSORS[name] = processor
        import flask

        if flask.has_app_context():
            app = flask.current_app
            if http is not None:
                serve = http
                for path in ("/v1/health", "/openapi.json"):
                    app.add_url_rule(
                        path,
                        endpoint=f"aifn-batch{path}",
                        view_func=lambda: serve(flask.request),
                        methods=["GET"],
                    )
            # functions-framework decodes the event's data before the entry point runs; data it
            # cannot decode (JSON nested too deep, an integer over the digit limit) raised past
            # it as a 500, redelivered for a day. No retry can decode it: acknowledge and log.
            from cloudevents.exceptions import DataUnmarshallerError

            app.register_error_handler(DataUnmarshallerError, _undecodable_event)
        return processor

    # names

    def outputs_for(self, source: Location) -> Outputs:
        return outputs_for(self.settings, source)

    def is_input(self, bucket: str, name: str, *, in_prefix: bool = True) -> str | None:
        """``None`` if the object is ours to process, else why it is ignored.

        Args:
            in_prefix: Require the name to be under ``BATCH_INPUT_PREFIX`` (events do; a job
                given an explicit prefix takes what is under that).
        """
        if in_prefix and not name.startswith(self.settings.input_prefix):
            return f"outside the input prefix {self.settings.input_prefix!r}"
        if name.endswith("/"):
            return "a folder placeholder"
        out_bucket = self.settings.output_bucket or bucket
        if out_bucket == bucket and name.startswith(self.settings.output_prefix):
            return f"under the output prefix {self.settings.output_prefix!r} (our own output)"
        if out_bucket == bucket and overlap(
            self.settings.input_prefix, self.settings.output_prefix
        ):
            return "the input and output prefixes overlap in this bucket; refusing to loop"
        if storage.file_format(name) is None:
            return "not a .jsonl, .ndjson or .csv file"
        return None

    # events

    def handle_event(self, event: Any) -> Summary | None:
        """Process the object a Cloud Storage "finalized" CloudEvent names, at most once.

        An event that can never succeed is acknowledged (returns, so the function answers 2xx)
        and logged: ``None`` when it is not ours (wrong type, malformed, outside the input prefix,
        our own output, not a supported file) or its object is gone; a file over
        ``BATCH_EVENT_MAX_BYTES`` gets an errors file pointing to the job, without model work.
        Transient failures (Cloud Storage errors and timeouts, a model that stays overloaded)
        raise, so Eventarc redelivers the event.
        """
        parsed = parse_event(event)
        if isinstance(parsed, str):
            log.warning("ignored event: %s", parsed, extra={"fields": _event_fields(event)})
            return None
        fields = {
            "event_id": parsed.id,
            "bucket": parsed.bucket,
            "object": parsed.name,
            "type": parsed.kind,
        }
        if parsed.kind != FINALIZED:
            log.info("ignored event: not an object-finalized event", extra={"fields": fields})
            return None
        bucket, name = parsed.bucket, parsed.name
        why = self.is_input(bucket, name)
        if why is not None:
            log.info("ignored %s: %s", name, why, extra={"fields": fields})
            return None
        source = Location(bucket, name)
        generation, size = parsed.generation, parsed.size
        if size is None:  # not in the event: the object's own
            info = storage.stat(source)
            if info is None:
                log.warning("ignored %s: it no longer exists", name, extra={"fields": fields})
                return None
            size = info.size
            generation = generation or info.generation
        if size > self.settings.event_max_bytes:
            summary = self.refuse_large(source, generation, size)
            log.warning(
                "batch %s: %s",
                name,
                summary.refused[0] if summary.refused else "already refused or done (redelivery)",
                extra={"fields": {**fields, "size": size}},
            )
            return summary
        summary = self.run_object(source, generation)
        log.log(
            logging.WARNING if summary.refused else logging.INFO,
            "batch %s: %s",
            name,
            "; ".join(summary.refused)
            or ("already done (redelivery)" if summary.skipped else summary.line()),
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

    def refuse_large(self, source: Location, generation: int | None, size: int) -> Summary:
        """Write the errors file of an input too big for the event path, and nothing else.

        Its one line says why and how to run the file instead (the job, or ``make batch``); it is
        tagged ``aifn-refused``, so a redelivery leaves it alone and the job's own run replaces it.
        """
        outputs = self.outputs_for(source)
        tag = {"aifn-source": str(source), "aifn-source-generation": str(generation)}
        done = storage.stat(outputs.predictions)
        if done is not None and (_same_source(done, tag) or _newer_source(done, tag)):
            return Summary(skipped=[str(source)])  # the job (or a newer version) got there
        marker = storage.stat(outputs.errors)
        for target, info in ((outputs.predictions, done), (outputs.errors, marker)):
            if info is not None and _foreign(info, tag):
                return _refuse_foreign(target, info, source)
        if marker is not None and _same_source(marker, tag) and REFUSED in marker.metadata:
            return Summary(skipped=[str(source)])
        why = (
            f"the file is {size:,} bytes, more than the event path takes (BATCH_EVENT_MAX_BYTES="
            f"{self.settings.event_max_bytes:,}, sized to finish within the batch service's "
            f"request timeout); nothing was predicted. Run it with the batch job (`gcloud run jobs "
            f"execute` the {self.capability.name} job: it processes every file under the input "
            f"prefix not done yet, and can shard one file over its tasks) or `make batch "
            f"FUNCTION={self.capability.name} INPUT={source}` (python -m aifn.files {source}); "
            "either replaces this file."
        )
        model = self.capability.model
        metadata = {
            **tag,
            REFUSED: "too-large",
            "aifn-function": self.capability.name,
            "aifn-model": model.name,
            "aifn-model-revision": model.revision,
            "aifn-records": "0",
            "aifn-predictions": "0",
            "aifn-errors": "1",
        }
        with tempfile.TemporaryDirectory(prefix=".aifn-batch-") as tmp:
            marker_file = Path(tmp) / "errors.jsonl"
            marker_file.write_text(
                dumps({"id": None, "line": None, "error": why}) + "\n", encoding="utf-8"
            )
            try:
                storage.publish(
                    marker_file,
                    outputs.errors,
                    metadata=metadata,
                    if_generation_match=marker.generation if marker is not None else 0,
                )
            except PreconditionFailed:
                return Summary(skipped=[str(source)])  # a concurrent delivery wrote it
        return Summary(errors=1, outputs=[str(outputs.errors)], refused=[why])

    def run_object(
        self,
        source: Location,
        generation: int | None,
        *,
        outputs: Outputs | None = None,
        shard: Shard | None = None,
        options: Mapping[str, Any] | None = None,
        progress: Callable[[Summary], None] | None = None,
        size: Callable[[int], None] | None = None,
    ) -> Summary:
        """Process one ``gs://`` object idempotently (one shard of it when ``shard.count > 1``)."""
        shard = shard or Shard()
        outputs = outputs or self.outputs_for(source)
        if generation is None:
            info = storage.stat(source)
            if info is None:
                log.warning("%s no longer exists; nothing to do", source)
                return Summary(refused=[f"{source} no longer exists"])
            generation = info.generation
        tag = {"aifn-source": str(source), "aifn-source-generation": str(generation)}
        targets = outputs
        if shard.count > 1:
            final = storage.stat(outputs.predictions)
            if final is not None and _same_source(final, tag):  # merged by an earlier run
                return Summary(skipped=[str(source)])
            if final is not None and _foreign(final, tag):
                return _refuse_foreign(outputs.predictions, final, source)
            targets = parts_of(outputs, shard)
        existing = storage.stat(targets.predictions)
        for target, info in (
            (targets.predictions, existing),
            (targets.errors, storage.stat(targets.errors)),
        ):
            if info is not None and _foreign(info, tag):
                return _refuse_foreign(target, info, source)
        if existing is not None and _same_source(existing, tag):
            summary = Summary(skipped=[str(source)])
        else:
            if existing is not None and _newer_source(existing, tag):
                log.warning(
                    "%s: a newer version of %s is already done", targets.predictions, source
                )
                return Summary(skipped=[str(source)])
            try:
                with storage.open_input(source, generation=generation, on_bytes=size) as stream:
                    summary = self._write(
                        stream,
                        storage.file_format(source.path) or "",
                        targets,
                        tag=tag,
                        expect=existing,
                        shard=shard,
                        options=options,
                        progress=progress,
                    )
            except FileNotFoundError:
                why = f"{source} generation {generation} no longer exists; nothing to do"
                log.warning("%s", why)
                return Summary(refused=[why])
        if shard.count > 1:
            merge(outputs, shard.count)
        return summary

    def run_local(
        self,
        source: Location,
        outputs: Outputs,
        *,
        shard: Shard | None = None,
        options: Mapping[str, Any] | None = None,
        progress: Callable[[Summary], None] | None = None,
        size: Callable[[int], None] | None = None,
    ) -> Summary:
        """Process a local file (always rewriting its outputs)."""
        shard = shard or Shard()
        targets = parts_of(outputs, shard) if shard.count > 1 else outputs
        with storage.open_input(source, on_bytes=size) as stream:
            summary = self._write(
                stream,
                storage.file_format(source.path) or "",
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
            # Every string is checked for lone surrogates on the way in; backslashreplace is the
            # net under that: a "\\udXXX" spelled in JSON, never a writer that raises.
            text: dict[str, Any] = {
                "encoding": "utf-8",
                "errors": "backslashreplace",
                "newline": "\n",
            }
            with open(pred_file, "w", **text) as out, open(err_file, "w", **text) as err:
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
                except storage.UnreadableFile as exc:  # the whole file: say so, once
                    summary = Summary(errors=1)
                    err.write(dumps({"id": None, "line": None, "error": str(exc)}) + "\n")
            model = self.capability.model
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
                        storage.publish(file, target, metadata=metadata)
                        continue
                    seen = expect if target == targets.predictions else storage.stat(target)
                    if (
                        seen is not None
                        and target == targets.errors
                        and _same_source(seen, tag)
                        and REFUSED not in seen.metadata  # a refusal marker is replaced
                    ):
                        continue  # written by an earlier, interrupted delivery: the same content
                    storage.publish(
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
        shard: Shard | None = None,
        options: Mapping[str, Any] | None = None,
        progress: Callable[[Summary], None] | None = None,
    ) -> Summary:
        """A job task's share of a ``gs://`` prefix: files ``index``, ``index + count``, ..."""
        shard = shard or Shard()
        assert prefix.bucket is not None
        files = [
            (name, generation)
            for name, generation in storage.list_objects(prefix)
            if self.is_input(prefix.bucket, name, in_prefix=False) is None
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


@dataclass(frozen=True)
class ObjectEvent:
    """The fields of a Cloud Storage event this module reads, checked."""

    id: str
    kind: str
    bucket: str
    name: str
    generation: int | None
    size: int | None


_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]")
MAX_OBJECT_NAME_BYTES = 1024  # Cloud Storage's own limit


def parse_event(event: Any) -> ObjectEvent | str:
    """The event's type, bucket, object name, generation and size, or why they are unusable.

    Total: whatever the event holds (a payload that is not JSON or not an object, names that are
    not strings or not valid UTF-8, a generation that is not a number), the answer is a reason,
    never an exception; the caller acknowledges such an event, as no retry can mend it.
    """
    try:
        kind, event_id, data = event.get("type"), event.get("id"), event.data
    except Exception as exc:  # whatever object arrived, it is not an event
        return f"not a CloudEvent ({type(exc).__name__})"
    if not isinstance(kind, str) or not kind:
        return "the event has no type"
    if isinstance(data, (bytes, bytearray, str)):
        try:
            data = json.loads(data or b"{}")
        except (ValueError, RecursionError):
            return "the event's data is not JSON"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        return "the event's data is not a JSON object"
    bucket, name = data.get("bucket"), data.get("name")
    if kind != FINALIZED:
        return ObjectEvent(str(event_id), kind, str(bucket), str(name), None, None)
    if not isinstance(bucket, str) or not _BUCKET_NAME.fullmatch(bucket):
        return "the event's 'bucket' is not a bucket name"
    if not isinstance(name, str) or not name:
        return "the event's 'name' is not an object name"
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        return "the event's 'name' is not valid Unicode"
    if len(encoded) > MAX_OBJECT_NAME_BYTES or "\n" in name or "\r" in name:
        return "the event's 'name' is not an object name"
    numbers: list[int | None] = []
    for key in ("generation", "size"):
        value = data.get(key)
        if value is None or value == "":
            numbers.append(None)
        elif isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            numbers.append(value)
        elif isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 20:
            numbers.append(int(value))
        else:
            return f"the event's {key!r} is not a whole number"
    return ObjectEvent(str(event_id), kind, bucket, name, numbers[0] or None, numbers[1])


def _undecodable_event(exc: Exception) -> tuple[str, int]:
    """The answer to an event whose data functions-framework could not decode: acknowledged."""
    import flask

    why = str(exc)[:300].encode("utf-8", "backslashreplace").decode("utf-8")
    event_id = flask.request.headers.get("ce-id", "")[:200]
    log.warning(
        "ignored event: its data cannot be decoded (%s)",
        why,
        extra={"fields": {"event_id": event_id}},
    )
    return "OK", 200


def _event_fields(event: Any) -> dict[str, Any]:
    """What a log line may say about a malformed event: its id and type, if readable, cut short."""
    fields: dict[str, Any] = {}
    for key in ("id", "type"):
        try:
            value = event.get(key)
        except Exception:  # logging must not fail on a strange object
            value = None
        if isinstance(value, str):
            fields["event_id" if key == "id" else key] = (
                value[:200].encode("utf-8", "backslashreplace").decode("utf-8")
            )
    return fields


def _same_source(info: ObjectInfo, tag: Mapping[str, str]) -> bool:
    return all(info.metadata.get(k) == v for k, v in tag.items())


def _foreign(info: ObjectInfo, tag: Mapping[str, str]) -> bool:
    """The existing object was not written from this input (another input, or not by us)."""
    return info.metadata.get("aifn-source") != tag.get("aifn-source")


def _refuse_foreign(target: Location, info: ObjectInfo, source: Location) -> Summary:
    owner = info.metadata.get("aifn-source")
    why = (
        f"{target} exists and was written from {owner}, not {source}; not overwriting it"
        if owner
        else f"{target} exists and was not written by aifn.files; not overwriting it"
    )
    log.warning("%s (delete it, or change BATCH_OUTPUT_PREFIX / --output)", why)
    return Summary(refused=[why])


def _newer_source(info: ObjectInfo, tag: Mapping[str, str]) -> bool:
    """The existing output was made from a later generation of the same input."""
    if info.metadata.get("aifn-source") != tag.get("aifn-source"):
        return False
    try:
        return int(info.metadata["aifn-source-generation"]) > int(tag["aifn-source-generation"])
    except (KeyError, ValueError):
        return False


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
        prog="python -m aifn.files",
        description="Batch inference over a JSONL or CSV file (local or gs://) or a gs:// prefix. "
        "`python -m aifn.files merge INPUT` merges a sharded run's parts.",
    )
    parser.add_argument("input", help="a local file, gs://BUCKET/OBJECT, or gs://BUCKET/PREFIX/")
    parser.add_argument(
        "--output",
        help="predictions file (local or gs://); errors go beside it. Default: for gs:// inputs "
        "BATCH_OUTPUT_BUCKET/BATCH_OUTPUT_PREFIX mirroring the input path; for a local file "
        "<name>.predictions.jsonl beside it (tickets.csv -> tickets.csv.predictions.jsonl)",
    )
    parser.add_argument(
        "--function",
        choices=KNOWN_FUNCTIONS,
        help="default: from FUNCTION_TARGET, or the function named in CLOUD_RUN_JOB / K_SERVICE",
    )
    parser.add_argument("--source", help="the function's main.py (default: found; docs/batch.md)")
    parser.add_argument(
        "--options",
        type=options_json,
        default=None,
        help='request fields for every record, JSON, e.g. \'{"labels": ["a", "b"]}\'',
    )
    parser.add_argument("--task-index", type=int, help="default: CLOUD_RUN_TASK_INDEX or 0")
    parser.add_argument("--task-count", type=int, help="default: CLOUD_RUN_TASK_COUNT or 1")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _merge_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m aifn.files merge",
        description="Merge the parts a sharded run wrote into the final predictions and errors "
        "files (the last task does this by itself; this is for doing it by hand).",
    )
    parser.add_argument("input", help="the input file the sharded run read")
    parser.add_argument("--output", help="the predictions file, as given to the run")
    parser.add_argument("--task-count", type=int, help="default: CLOUD_RUN_TASK_COUNT")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m aifn.files [merge] INPUT [options]``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["merge"]:
            return _merge_main(argv[1:])
        return _run_main(argv)
    except ConfigError as exc:
        print(f"aifn.files: {exc}", file=sys.stderr)
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
    if storage.file_format(source.path) is None and not (
        source.is_gcs and (source.path.endswith("/") or not source.path)
    ):
        raise ConfigError(f"{source}: not a .jsonl, .ndjson or .csv file (or a gs:// prefix/)")
    processor = load_processor(name, function_source(name, args.source))
    started = time.perf_counter()
    bar = _progress_bar(source, disable=args.no_progress)
    prefix_run = source.is_gcs and (source.path.endswith("/") or not source.path)
    try:
        if prefix_run:
            if args.output:
                raise ConfigError("--output applies to one file; a prefix uses BATCH_OUTPUT_*")
            summary = processor.run_prefix(
                source, shard=shard, options=args.options, progress=bar.summary
            )
        else:
            outputs = _outputs(processor.settings, source, args.output)
            if source.is_gcs and storage.stat(source) is None:
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
    for why in summary.refused:
        print(f"  not written: {why}")
    # One file not written is the command's failure; in a prefix, the others went on (and a job
    # task that fails would be retried over the same files for nothing).
    return 1 if summary.refused and not prefix_run else 0


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
    info = None if source.path.endswith("/") or not source.path else storage.stat(source)
    return _Progress(info.size if info is not None else None, disable)
