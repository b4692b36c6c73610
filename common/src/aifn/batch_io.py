"""Files for batch inference: where they are (local or ``gs://``) and what is in them.

Inputs are read as streams, never whole: a Cloud Storage object through
:meth:`google.cloud.storage.Blob.open` (ranged reads, pinned to one generation), a local file
as is. Records come out one by one with their line numbers. Outputs are written to a local
temporary file first and then published in one step — :func:`os.replace` locally, one upload
with a generation precondition on Cloud Storage — so a reader sees a whole file or none.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

JSONL_SUFFIXES = (".jsonl", ".ndjson")
CSV_SUFFIXES = (".csv",)
READ_CHUNK_BYTES = 1024 * 1024


class UnreadableFile(Exception):
    """The file as a whole cannot be read (no CSV header, no text column); the message says why."""


def file_format(name: str) -> str | None:
    """``"jsonl"``, ``"csv"``, or ``None`` for a name this module does not read."""
    lower = name.lower()
    if lower.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if lower.endswith(CSV_SUFFIXES):
        return "csv"
    return None


# --- where files are -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Location:
    """A local path (``bucket`` is ``None``) or a Cloud Storage object or prefix."""

    bucket: str | None
    path: str

    @classmethod
    def parse(cls, value: str) -> Location:
        """``gs://bucket/name`` or a local path.

        Raises:
            ValueError: A ``gs://`` URL without a bucket.
        """
        if value.startswith("gs://"):
            bucket, _, name = value.removeprefix("gs://").partition("/")
            if not bucket:
                raise ValueError(f"{value}: expected gs://BUCKET/NAME")
            return cls(bucket, name)
        return cls(None, str(Path(value).expanduser()))

    @property
    def is_gcs(self) -> bool:
        return self.bucket is not None

    def __str__(self) -> str:
        return f"gs://{self.bucket}/{self.path}" if self.is_gcs else self.path

    def sibling(self, path: str) -> Location:
        """Another location in the same bucket (or on the local disk)."""
        return Location(self.bucket, path)


@dataclass(frozen=True)
class ObjectInfo:
    """What is known about an existing output: its generation and custom metadata."""

    generation: int
    metadata: dict[str, str]
    size: int = 0


_clients: dict[str | None, Any] = {}


def storage_client() -> Any:
    """A google-cloud-storage client, one per process (per ``STORAGE_EMULATOR_HOST``, in tests)."""
    key = os.environ.get("STORAGE_EMULATOR_HOST")
    if key not in _clients:
        from google.cloud import storage

        _clients[key] = storage.Client()
    return _clients[key]


def _blob(location: Location, generation: int | None = None) -> Any:
    return storage_client().bucket(location.bucket).blob(location.path, generation=generation)


def stat(location: Location) -> ObjectInfo | None:
    """The object's generation and metadata, or ``None`` when it does not exist."""
    if not location.is_gcs:
        path = Path(location.path)
        return ObjectInfo(0, {}, path.stat().st_size) if path.is_file() else None
    blob = storage_client().bucket(location.bucket).get_blob(location.path)
    if blob is None:
        return None
    return ObjectInfo(int(blob.generation), dict(blob.metadata or {}), int(blob.size or 0))


def list_objects(prefix: Location) -> Iterator[tuple[str, int]]:
    """(name, generation) of every object under a ``gs://`` prefix, in name order."""
    for blob in storage_client().list_blobs(prefix.bucket, prefix=prefix.path):
        yield blob.name, int(blob.generation)


def delete(location: Location) -> None:
    """Remove the file or object if it exists."""
    if location.is_gcs:
        from google.api_core.exceptions import NotFound

        with suppress(NotFound):
            _blob(location).delete()
    else:
        Path(location.path).unlink(missing_ok=True)


class _Counting(io.RawIOBase):
    """A read-only stream that reports how many bytes have passed through it."""

    def __init__(self, raw: BinaryIO, on_bytes: Callable[[int], None] | None) -> None:
        self._raw = raw
        self._on_bytes = on_bytes

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._raw.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        if n and self._on_bytes is not None:
            self._on_bytes(n)
        return n


@contextmanager
def open_input(
    location: Location,
    *,
    generation: int | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> Iterator[BinaryIO]:
    """A binary stream of the file, read in chunks; ``generation`` pins a Cloud Storage read.

    Raises:
        FileNotFoundError: The file or object (at that generation) does not exist.
    """
    if location.is_gcs:
        from google.api_core.exceptions import NotFound

        try:
            raw = _blob(location, generation).open("rb", chunk_size=READ_CHUNK_BYTES)
        except NotFound:
            raise FileNotFoundError(str(location)) from None
    else:
        raw = open(location.path, "rb")  # noqa: SIM115 - closed below
    try:
        yield io.BufferedReader(_Counting(raw, on_bytes), READ_CHUNK_BYTES)
    finally:
        raw.close()


class PreconditionFailed(Exception):
    """Somebody else wrote the object since we looked (Cloud Storage answered 412)."""


def publish(
    source: Path,
    target: Location,
    *,
    if_generation_match: int | None = None,
    metadata: dict[str, str] | None = None,
) -> None:
    """Make ``source`` (a complete local file) appear at ``target`` in one step.

    On Cloud Storage this is one upload with the precondition ``if_generation_match`` (``0``:
    only if the object does not exist); the object becomes visible only once the upload is
    complete. Locally, the file is renamed over the target (same directory, so atomic).

    Raises:
        PreconditionFailed: Cloud Storage refused the write because of the precondition.
    """
    if target.is_gcs:
        from google.api_core.exceptions import PreconditionFailed as Http412

        blob = _blob(target)
        blob.metadata = metadata or None
        try:
            blob.upload_from_filename(
                str(source),
                content_type="application/x-ndjson",
                if_generation_match=if_generation_match,
            )
        except Http412:
            raise PreconditionFailed(str(target)) from None
        return
    path = Path(target.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if source.parent.resolve() == path.parent.resolve():
        os.replace(source, path)
    else:  # a temporary file elsewhere: copy beside the target first, then rename
        staged = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(source, "rb") as src, open(staged, "wb") as dst:
            while block := src.read(READ_CHUNK_BYTES):
                dst.write(block)
        os.replace(staged, path)


# --- what is in them -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RawRecord:
    """One record before validation: its first line number and its fields, or why it is bad."""

    line: int
    fields: dict[str, Any] | None
    error: str | None = None


def _decoded(stream: BinaryIO) -> io.TextIOWrapper:
    # surrogateescape keeps undecodable bytes as lone surrogates, so one bad line is reported
    # as that line's error instead of stopping the whole file.
    return io.TextIOWrapper(stream, encoding="utf-8-sig", errors="surrogateescape", newline="")


def _valid_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def jsonl_lines(stream: BinaryIO) -> Iterator[tuple[int, str]]:
    """(line number, line) for every non-blank line; undecodable bytes stay lone surrogates."""
    for number, line in enumerate(_decoded(stream), start=1):
        if line.strip():
            yield number, line


def parse_jsonl_line(line: str) -> dict[str, Any] | str:
    """The line's JSON object, or the reason it is not one."""
    if not _valid_utf8(line):
        return "not valid UTF-8"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        return f"not valid JSON ({exc.msg} at column {exc.colno})"
    except RecursionError:
        return "not valid JSON (nested too deeply)"
    if not isinstance(record, dict):
        return "not a JSON object"
    return record


def csv_rows(stream: BinaryIO) -> tuple[list[str], Iterator[tuple[int, list[str]]]]:
    """The header row and an iterator of (first line number, cells) for every other row.

    Raises:
        UnreadableFile: The file has no header row.
    """
    text = _decoded(stream)
    reader = csv.reader(text, strict=False)
    try:
        header = next(reader)
    except StopIteration:
        raise UnreadableFile("the file is empty; a CSV needs a header row") from None
    except csv.Error as exc:
        raise UnreadableFile(f"the header row is not valid CSV ({exc})") from None

    def rows() -> Iterator[tuple[int, list[str]]]:
        end = reader.line_num
        while True:
            start = end + 1
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:  # e.g. a NUL byte; the reader moves on to the next line
                end = reader.line_num
                yield start, [f"\0csv error: {exc}"]
                continue
            end = reader.line_num
            if cells and any(c.strip() for c in cells):
                yield start, cells

    return [h.strip() for h in header], rows()


def csv_record(header: list[str], cells: list[str]) -> dict[str, str] | str:
    """The row as ``{column: cell}``, or the reason it cannot be read."""
    if len(cells) == 1 and cells[0].startswith("\0csv error: "):
        return cells[0].removeprefix("\0csv error: ")
    if not all(_valid_utf8(c) for c in cells):
        return "not valid UTF-8"
    if len(cells) != len(header):
        return f"{len(cells)} cells; the header row has {len(header)} columns"
    return dict(zip(header, cells, strict=True))
